//! Shared by the multi-process tests: a run config for the three roles, the roles started as
//! real processes (optionally through a wrapper such as `nsenter`) with their logs in the test's
//! directory, and the checks on what the learner trained (its consumed log).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every wait of these tests gives up after this long.
pub const LIMIT: Duration = Duration::from_secs(240);

/// Prompts per learner step in every run config written here.
pub const PROMPTS_PER_STEP: usize = 2;

/// `coordinator.linger_s` of every run config written here: four of the default heartbeat
/// intervals, enough for idle workers to hear `done` (the 10 s default only slows each run).
pub const LINGER_S: f64 = 2.0;

/// A port free on the host's loopback now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// What differs between the runs of the tests.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Prompts of the one epoch (a multiple of [`PROMPTS_PER_STEP`]).
    pub prompts: usize,
    /// Seconds a lease lives without a heartbeat.
    pub lease_ttl_s: f64,
    /// Seconds between worker heartbeats (a worker is dead after 3 missed ones).
    pub heartbeat_interval_s: f64,
    /// Where the servers listen (`127.0.0.1`, or `0.0.0.0` to be reachable from other namespaces).
    pub listen_ip: String,
    /// Host name or address the roles dial (must match the server certificate with TLS).
    pub dial_host: String,
    /// Fixed (coordinator, learner) ports, e.g. inside a namespace of the test's own; else free ones.
    pub ports: Option<(u16, u16)>,
    /// Extra keys of the `cluster:` section, e.g. `token_file: /x, tls: {...}`.
    pub cluster_extra: String,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            prompts: 12,
            lease_ttl_s: 3.0,
            heartbeat_interval_s: 0.5,
            listen_ip: "127.0.0.1".into(),
            dial_host: "127.0.0.1".into(),
            ports: None,
            cluster_extra: String::new(),
        }
    }
}

/// A run directory with a tiny model and one config for every role.
pub struct Cluster {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub coordinator_port: u16,
    pub learner_port: u16,
    pub spec: Spec,
}

/// One trained step of the consumed log: its version and (epoch, prompt id) per group.
pub type TrainedStep = (u64, Vec<(u64, String)>);

impl Cluster {
    /// The default run (12 prompts, 6 steps, loopback) in `dir`.
    pub fn new(dir: &Path) -> Cluster {
        Cluster::with(dir, Spec::default())
    }

    /// A run described by `spec` in `dir`.
    pub fn with(dir: &Path, spec: Spec) -> Cluster {
        assert_eq!(spec.prompts % PROMPTS_PER_STEP, 0, "whole steps only");
        let model = dir.join("tiny");
        let out = Command::new(env!("CARGO_BIN_EXE_medrl")).args(["tiny-model", "--out", model.to_str().expect("utf-8")]).output().expect("tiny-model runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (coordinator, learner) = spec.ports.unwrap_or_else(|| (free_port(), free_port()));
        let config = dir.join("run.yaml");
        let extra = if spec.cluster_extra.is_empty() { String::new() } else { format!(", {}", spec.cluster_extra) };
        std::fs::write(
            &config,
            format!(
                "run: {{output_dir: {run}}}\n\
                 model: {{path: {model}}}\n\
                 data: {{train: synthetic, sft: null, eval: null, synthetic: {{rl_size: {prompts}}}}}\n\
                 rollout: {{group_size: 2, max_new_tokens: 6}}\n\
                 algorithm: {{name: grpo}}\n\
                 learner: {{optimizer: {{lr: 1.0e-4}}, total_steps: {steps}, save_every: 1, gradient_checkpointing: false}}\n\
                 coordinator: {{listen: '{ip}:{coordinator}', metrics_listen: null, prompts_per_step: {PROMPTS_PER_STEP}, epochs: 1, lease_ttl_s: {ttl}, heartbeat_interval_s: {hb}, linger_s: {LINGER_S}}}\n\
                 cluster: {{coordinator: 'http://{host}:{coordinator}', learner: 'http://{host}:{learner}', learner_listen: '{ip}:{learner}', learner_metrics_listen: null, worker_health_listen: null, worker_metrics_listen: null{extra}}}\n",
                run = dir.join("run").display(),
                model = model.display(),
                prompts = spec.prompts,
                steps = spec.prompts / PROMPTS_PER_STEP,
                ip = spec.listen_ip,
                host = spec.dial_host,
                ttl = spec.lease_ttl_s,
                hb = spec.heartbeat_interval_s,
            ),
        )
        .expect("config written");
        Cluster { dir: dir.to_path_buf(), config, coordinator_port: coordinator, learner_port: learner, spec }
    }

    /// The command starting `role` as `name` (its log is `name.log`), run through `wrapper` (a
    /// program and its arguments, e.g. `nsenter ...`) when one is given. Callers may add
    /// arguments (`--set`) and environment before spawning.
    pub fn command(&self, wrapper: &[String], role: &str, name: &str) -> Command {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        let medrl = env!("CARGO_BIN_EXE_medrl");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(medrl);
                c
            }
            None => Command::new(medrl),
        };
        cmd.args([role, "--config", self.config.to_str().expect("utf-8")])
            .env("HOSTNAME", name)
            .env("RUST_LOG", "info")
            // Plain log lines, so tests can read fields.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts `role` as `name` on the host.
    pub fn spawn(&self, role: &str, name: &str) -> Child {
        self.command(&[], role, name).spawn().expect("role starts")
    }

    /// Waits until the coordinator accepts connections on the host's loopback.
    pub fn wait_for_port(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.coordinator_port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "the coordinator never listened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log of the process started as `name` (empty before it wrote anything).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until `name`'s log holds `needle` at least `count` times.
    pub fn wait_log(&self, name: &str, needle: &str, count: usize) {
        let start = Instant::now();
        while self.log(name).matches(needle).count() < count {
            assert!(start.elapsed() < LIMIT, "{name} never logged {needle:?} {count} times; logs in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Learner steps logged so far (a redone step counts again).
    pub fn steps_done(&self) -> usize {
        std::fs::read_to_string(self.dir.join("run/learner/metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// Waits until the learner has logged `n` steps.
    pub fn wait_steps(&self, n: usize) {
        let start = Instant::now();
        while self.steps_done() < n {
            assert!(start.elapsed() < LIMIT, "fewer than {n} learner steps in time; logs in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The learner's checkpoint folders (complete or not), by name.
    pub fn checkpoint_dirs(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.dir.join("run/learner/checkpoints"))
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// The steps of the consumed log that count (rewinds applied), in version order.
    pub fn trained_steps(&self) -> Vec<TrainedStep> {
        let text = std::fs::read_to_string(self.dir.join("run/learner/consumed.jsonl")).expect("consumed log");
        let mut steps: Vec<TrainedStep> = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("log line is JSON");
            match v["kind"].as_str() {
                Some("step") => {
                    let groups = v["groups"]
                        .as_array()
                        .expect("groups")
                        .iter()
                        .map(|g| (g["epoch"].as_u64().expect("epoch"), g["prompt_id"].as_str().expect("id").to_string()))
                        .collect();
                    steps.push((v["version"].as_u64().expect("version"), groups));
                }
                Some("rewind") => {
                    let to = v["to"].as_u64().expect("to");
                    steps.retain(|(version, _)| *version <= to);
                }
                other => panic!("unknown consumed-log line kind {other:?}"),
            }
        }
        let versions: Vec<u64> = steps.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=steps.len() as u64).collect::<Vec<_>>(), "the steps that count are versions 1, 2, ... without gaps");
        steps
    }

    /// Every prompt of the epoch trained exactly once in the consumed log (after rewinds).
    pub fn assert_exactly_once(&self) {
        let mut counts: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for (_, groups) in &self.trained_steps() {
            for g in groups {
                *counts.entry(g.clone()).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), self.spec.prompts, "every prompt of the epoch was trained: {counts:?}");
        assert!(counts.values().all(|&c| c == 1), "a prompt was trained twice: {counts:?}");
    }

    /// The prompt ids of each step of the coordinator's data order: its seeded shuffle of the
    /// prompt file cut into steps (with `max_staleness: 0`, at most one step of prompts is out).
    pub fn planned_steps(&self) -> Vec<BTreeSet<String>> {
        let prompts = medrl_coordinator::PromptSet::from_jsonl(&self.dir.join("run/data/train.jsonl")).expect("the run's prompt file");
        let seed = medrl_coordinator::CoordinatorConfig::default().seed;
        let order = medrl_coordinator::order::epoch_order(prompts.len(), seed, 0);
        order
            .chunks(PROMPTS_PER_STEP)
            .map(|chunk| chunk.iter().map(|&i| prompts.get(i).expect("index in range").id.clone()).collect())
            .collect()
    }

    /// Steps `1..=up_to` trained exactly the prompts the data order put in them.
    pub fn assert_data_order(&self, up_to: usize) {
        let planned = self.planned_steps();
        let trained = self.trained_steps();
        for (i, (version, groups)) in trained.iter().take(up_to).enumerate() {
            let ids: BTreeSet<String> = groups.iter().map(|(_, id)| id.clone()).collect();
            assert_eq!(ids, planned[i], "step {version} trained other prompts than the data order's step {}", i + 1);
        }
    }
}

/// Waits for `child` to exit successfully.
pub fn wait_exit(child: &mut Child, what: &str, dir: &Path) {
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

/// Waits for every process to end cleanly, then checks the epoch was trained exactly once.
pub fn finish(cluster: &Cluster, mut procs: Vec<(Child, &str)>) {
    // The learner ends the run; the coordinator lingers `LINGER_S`; workers exit on `done`.
    for (child, what) in procs.iter_mut() {
        wait_exit(child, what, &cluster.dir);
    }
    cluster.assert_exactly_once();
}

/// SIGKILLs `child` and reaps it.
pub fn kill(child: &mut Child, what: &str) {
    child.kill().unwrap_or_else(|e| panic!("SIGKILL {what}: {e}"));
    let _ = child.wait();
}
