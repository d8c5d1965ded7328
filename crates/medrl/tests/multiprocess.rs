//! The roles as separate processes on loopback: 1 coordinator, 2 rollout workers, 1 learner.
//! A worker killed mid-run, the learner killed and restarted from its checkpoint, the coordinator
//! killed and restarted from its journal: each run completes with every prompt of the epoch
//! trained exactly once (checked against the learner's consumed log, rewinds applied).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMPTS: usize = 12;
const LIMIT: Duration = Duration::from_secs(240);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    coordinator: u16,
}

impl Cluster {
    fn new(dir: &Path) -> Cluster {
        let model = dir.join("tiny");
        let out = Command::new(env!("CARGO_BIN_EXE_medrl")).args(["tiny-model", "--out", model.to_str().expect("utf-8")]).output().expect("tiny-model runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (coordinator, learner) = (free_port(), free_port());
        let config = dir.join("run.yaml");
        std::fs::write(
            &config,
            format!(
                "run: {{output_dir: {run}}}\n\
                 model: {{path: {model}}}\n\
                 data: {{train: synthetic, sft: null, eval: null, synthetic: {{rl_size: {PROMPTS}}}}}\n\
                 rollout: {{group_size: 2, max_new_tokens: 6}}\n\
                 algorithm: {{name: grpo}}\n\
                 learner: {{optimizer: {{lr: 1.0e-4}}, total_steps: 6, save_every: 1, gradient_checkpointing: false}}\n\
                 coordinator: {{listen: 127.0.0.1:{coordinator}, metrics_listen: null, prompts_per_step: 2, epochs: 1, lease_ttl_s: 3.0, heartbeat_interval_s: 0.5}}\n\
                 cluster: {{coordinator: http://127.0.0.1:{coordinator}, learner: http://127.0.0.1:{learner}, learner_listen: 127.0.0.1:{learner}, learner_metrics_listen: null, worker_health_listen: null, worker_metrics_listen: null}}\n",
                run = dir.join("run").display(),
                model = model.display(),
            ),
        )
        .expect("config written");
        Cluster { dir: dir.to_path_buf(), config, coordinator }
    }

    fn spawn(&self, role: &str, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        Command::new(env!("CARGO_BIN_EXE_medrl"))
            .args([role, "--config", self.config.to_str().expect("utf-8")])
            .env("HOSTNAME", name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("role starts")
    }

    fn wait_for_port(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.coordinator)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "the coordinator never listened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn steps_done(&self) -> usize {
        std::fs::read_to_string(self.dir.join("run/learner/metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
    }

    fn wait_steps(&self, n: usize) {
        let start = Instant::now();
        while self.steps_done() < n {
            assert!(start.elapsed() < LIMIT, "fewer than {n} learner steps in time; logs in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every prompt trained exactly once in the consumed log (after rewinds).
    fn assert_exactly_once(&self) {
        let text = std::fs::read_to_string(self.dir.join("run/learner/consumed.jsonl")).expect("consumed log");
        let mut steps: Vec<(u64, Vec<(u64, String)>)> = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("log line is JSON");
            match v["kind"].as_str() {
                Some("step") => {
                    let groups = v["groups"].as_array().expect("groups").iter().map(|g| (g["epoch"].as_u64().expect("epoch"), g["prompt_id"].as_str().expect("id").to_string())).collect();
                    steps.push((v["version"].as_u64().expect("version"), groups));
                }
                Some("rewind") => {
                    let to = v["to"].as_u64().expect("to");
                    steps.retain(|(version, _)| *version <= to);
                }
                other => panic!("unknown consumed-log line kind {other:?}"),
            }
        }
        let mut counts: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for (_, groups) in &steps {
            for g in groups {
                *counts.entry(g.clone()).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), PROMPTS, "every prompt of the epoch was trained: {counts:?}");
        assert!(counts.values().all(|&c| c == 1), "a prompt was trained twice: {counts:?}");
    }
}

fn wait_exit(child: &mut Child, what: &str, dir: &Path) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "{what} failed ({status}); logs in {}", dir.display());
            return;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("{what} did not finish in time; logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn finish(cluster: &Cluster, mut procs: Vec<(Child, &str)>) {
    // The learner ends the run; the coordinator lingers briefly; workers exit on `done`.
    for (child, what) in procs.iter_mut() {
        wait_exit(child, what, &cluster.dir);
    }
    cluster.assert_exactly_once();
}

#[test]
fn a_killed_worker_loses_no_prompt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = Cluster::new(tmp.path());
    let coordinator = c.spawn("coordinator", "coordinator");
    c.wait_for_port();
    let learner = c.spawn("learner", "learner");
    let mut doomed = c.spawn("worker", "worker-a");
    let survivor = c.spawn("worker", "worker-b");
    c.wait_steps(1);
    doomed.kill().expect("SIGKILL the worker");
    let _ = doomed.wait();
    finish(&c, vec![(learner, "learner"), (survivor, "worker-b"), (coordinator, "coordinator")]);
}

#[test]
fn a_restarted_learner_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = Cluster::new(tmp.path());
    let coordinator = c.spawn("coordinator", "coordinator");
    c.wait_for_port();
    let mut learner = c.spawn("learner", "learner-1");
    let w1 = c.spawn("worker", "worker-a");
    let w2 = c.spawn("worker", "worker-b");
    c.wait_steps(2);
    learner.kill().expect("SIGKILL the learner");
    let _ = learner.wait();
    let learner = c.spawn("learner", "learner-2");
    finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
}

#[test]
fn a_restarted_coordinator_resumes_from_its_journal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = Cluster::new(tmp.path());
    let mut coordinator = c.spawn("coordinator", "coordinator-1");
    c.wait_for_port();
    let learner = c.spawn("learner", "learner");
    let w1 = c.spawn("worker", "worker-a");
    let w2 = c.spawn("worker", "worker-b");
    c.wait_steps(2);
    coordinator.kill().expect("SIGKILL the coordinator");
    let _ = coordinator.wait();
    let coordinator = c.spawn("coordinator", "coordinator-2");
    finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
}
