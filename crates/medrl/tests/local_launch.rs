//! deploy/README.md §9 tried as a new operator would: the CPU try-out block, run through
//! `deploy/local/run.sh` as written (only this test's binary, a temporary run directory and free
//! ports added), with the config file the base manifests mount. The job must exit 0 with every
//! prompt trained once, the learner's step log and final model in place, a plain log per role
//! showing it started, and no process left behind, on success or failure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The whole launch gives up after this long (it takes about 15 s on 2 cores).
const LIMIT: Duration = Duration::from_secs(180);

/// The marker line in deploy/README.md above the block this test runs.
const MARKER: &str = "<!-- crates/medrl/tests/local_launch.rs runs this block";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The `sh` block after the marker in deploy/README.md.
fn readme_block() -> String {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    let at = readme.find(MARKER).expect("deploy/README.md marks the block this test runs");
    let rest = &readme[at..];
    let open = rest.find("```sh\n").expect("an sh block after the marker") + "```sh\n".len();
    let len = rest[open..].find("```").expect("the block ends");
    rest[open..open + len].to_string()
}

/// The config file the base kustomization turns into the `medrl-config` ConfigMap, relative to
/// the repository root.
fn base_configmap_file() -> String {
    let k = std::fs::read_to_string(repo().join("deploy/k8s/base/kustomization.yaml")).expect("base kustomization");
    let line = k.lines().map(str::trim).find(|l| l.starts_with("- run.yaml=")).expect("a run.yaml entry in the configMapGenerator");
    let file = line.trim_start_matches("- run.yaml=");
    file.trim_start_matches("../").to_string()
}

/// `count` consecutive ports from `base` are all free on loopback now.
fn free_range(base: u16, count: u16) -> bool {
    let held: Vec<_> = (base..base + count).map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok()).collect();
    held.len() == usize::from(count)
}

/// Two disjoint ranges of `count` free ports below the ephemeral range (so a connection of
/// another test cannot take one between this check and the roles' bind).
fn two_free_ranges(count: u16) -> (u16, u16) {
    let mut candidate = 20_000 + (std::process::id() % 500) as u16 * 20;
    let mut found = Vec::new();
    while found.len() < 2 {
        assert!(candidate < 32_000, "no free port range");
        if free_range(candidate, count) {
            found.push(candidate);
        }
        candidate += 20;
    }
    (found[0], found[1])
}

/// Every live process whose process group is `pgid`, with its command line.
fn group_members(pgid: u32) -> Vec<String> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) && fields.first() != Some(&"Z") {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            members.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    members
}

/// The launch, in a process group of its own: dropping it SIGKILLs the whole group, so a failed
/// or timed-out test leaves no role running.
struct Launch {
    child: Child,
    pgid: u32,
    /// The group leader (bash) was reaped: its id names the group only while members live.
    reaped: bool,
}

impl Drop for Launch {
    fn drop(&mut self) {
        if !self.reaped || !group_members(self.pgid).is_empty() {
            let _ = Command::new("bash").args(["-c", "kill -KILL -- -\"$0\" 2>/dev/null", &self.pgid.to_string()]).status();
        }
        let _ = self.child.wait();
    }
}

/// Non-empty lines of a JSONL file, parsed.
fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))).collect()
}

#[test]
fn the_readme_one_machine_launch_runs_the_job_to_the_end() {
    let block = readme_block();
    let config = base_configmap_file();
    assert!(block.contains(&format!("--config {config}")), "the README's launch uses the base ConfigMap's file {config}:\n{block}");
    let workers: usize = block
        .split_whitespace()
        .skip_while(|w| *w != "--workers")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("the README's launch sets --workers");

    // The operator's commands, with this test's binary, run directory and ports.
    let mut script = String::from("set -euo pipefail\n");
    let mut launches = 0;
    for line in block.lines() {
        if line.starts_with("cargo build") {
            continue; // the test's binary is built already
        }
        let line = line.replace("target/release/medrl", "\"$MEDRL_BIN\"");
        let line = if line.starts_with("deploy/local/run.sh") {
            launches += 1;
            line.replacen(
                "deploy/local/run.sh",
                "\"$RUN_SH\" --bin \"$MEDRL_BIN\" --run-dir \"$RUN_DIR\" --base-port \"$BASE_PORT\" --metrics-port \"$METRICS_PORT\"",
                1,
            )
        } else {
            line
        };
        script.push_str(&line);
        script.push('\n');
    }
    assert_eq!(launches, 1, "one run.sh launch in the README block:\n{block}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // The block's relative paths: configs/ of the repository, runs/local/ of the operator.
    std::os::unix::fs::symlink(repo().join("configs"), cwd.join("configs")).expect("configs link");
    let run_dir = cwd.join("runs/local");
    let ports = u16::try_from(workers + 2).expect("few workers");
    let (base_port, metrics_port) = two_free_ranges(ports);
    let output = std::fs::File::create(cwd.join("launch.out")).expect("launch output file");

    let start = Instant::now();
    let child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(cwd)
        .env("MEDRL_BIN", env!("CARGO_BIN_EXE_medrl"))
        .env("RUN_SH", repo().join("deploy/local/run.sh"))
        .env("RUN_DIR", &run_dir)
        .env("BASE_PORT", base_port.to_string())
        .env("METRICS_PORT", metrics_port.to_string())
        // An operator's fresh shell: none of these set.
        .env_remove("MEDRL_TOKEN_FILE")
        .env_remove("MEDRL_TOKEN")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("output file"))
        .stderr(output)
        .process_group(0)
        .spawn()
        .expect("bash runs the README block");
    let pgid = child.id();
    let mut launch = Launch { child, pgid, reaped: false };
    let context = || {
        let out = std::fs::read_to_string(cwd.join("launch.out")).unwrap_or_default();
        let mut logs = String::new();
        for name in std::fs::read_dir(run_dir.join("logs")).into_iter().flatten().flatten().map(|e| e.path()) {
            let text = std::fs::read_to_string(&name).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            logs += &format!("\n--- {} (last lines)\n{}", name.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        format!("script:\n{script}\noutput:\n{out}{logs}")
    };
    let status = loop {
        if let Some(status) = launch.child.try_wait().expect("try_wait") {
            launch.reaped = true;
            break status;
        }
        assert!(start.elapsed() < LIMIT, "the launch did not finish in {LIMIT:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("the README launch took {:.1} s", start.elapsed().as_secs_f64());
    assert!(status.success(), "the launch failed ({status})\n{}", context());

    // run.sh stopped every role before it exited.
    let left = group_members(pgid);
    assert!(left.is_empty(), "processes left running: {left:?}");

    // One log per role, each showing the role came up (and plain text, not terminal colours).
    let logs: BTreeSet<String> = std::fs::read_dir(run_dir.join("logs")).expect("logs folder").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let mut expected: BTreeSet<String> = ["coordinator.log", "learner.log"].map(String::from).into();
    expected.extend((0..workers).map(|i| format!("worker-{i}.log")));
    assert_eq!(logs, expected, "{}", context());
    let started = [("coordinator", "coordinator serving"), ("learner", "learner serving")]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .chain((0..workers).map(|i| (format!("worker-{i}"), "registered with the coordinator")));
    for (name, needle) in started {
        let log = std::fs::read_to_string(run_dir.join(format!("logs/{name}.log"))).expect("role log");
        assert!(log.contains(needle), "{name}.log lacks {needle:?}\n{}", context());
        assert!(!log.contains('\u{1b}'), "{name}.log holds terminal escape codes");
    }
    let learner_log = std::fs::read_to_string(run_dir.join("logs/learner.log")).expect("learner log");
    assert!(learner_log.contains("run finished; final model written"), "{}", context());

    // The learner trained the whole epoch: every prompt of the run's file exactly once, in steps
    // 1..=n, each logged once in its step log.
    let prompts: BTreeSet<String> = jsonl(&run_dir.join("data/train.jsonl")).iter().map(|r| r["id"].as_str().expect("record id").to_string()).collect();
    assert!(!prompts.is_empty());
    let mut trained: BTreeMap<String, usize> = BTreeMap::new();
    let mut versions = Vec::new();
    for line in jsonl(&run_dir.join("learner/consumed.jsonl")) {
        assert_eq!(line["kind"], "step", "an uninterrupted run rewinds nothing: {line}");
        versions.push(line["version"].as_u64().expect("version"));
        for g in line["groups"].as_array().expect("groups") {
            *trained.entry(g["prompt_id"].as_str().expect("prompt id").to_string()).or_default() += 1;
        }
    }
    assert_eq!(trained.keys().cloned().collect::<BTreeSet<_>>(), prompts, "every prompt of the epoch trained");
    assert!(trained.values().all(|&n| n == 1), "a prompt trained twice: {trained:?}");
    let steps: Vec<u64> = jsonl(&run_dir.join("learner/metrics.jsonl")).iter().map(|l| l["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, versions, "one step-log line per trained step");
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert!(steps.len() >= 2, "the try-out makes more than one step: {steps:?}");

    // The final model, in the Hugging Face layout.
    let last = format!("step-{:06}", steps.len());
    assert!(run_dir.join("learner/checkpoints").join(&last).is_dir(), "the last step's checkpoint {last}");
    let final_dir = run_dir.join("learner/final");
    assert!(final_dir.join("config.json").is_file(), "final/config.json");
    let weights = std::fs::read_dir(&final_dir).expect("final model").flatten().any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    assert!(weights, "final/ holds safetensors weights");
}
