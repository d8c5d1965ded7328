//! The roles as separate processes on loopback: 1 coordinator, 2 rollout workers, 1 learner.
//! A worker killed mid-run, the learner killed mid-step and mid-checkpoint (stopped at that point
//! by the `MEDRL_TEST_PAUSE` test hook, then SIGKILLed) and restarted from its newest complete
//! checkpoint, the coordinator killed and restarted from its journal: each run completes with
//! every prompt of the epoch trained exactly once (checked against the learner's consumed log,
//! rewinds applied), and each step trains the prompts the coordinator's data order gives it
//! (after a mid-checkpoint kill, up to the checkpoint resumed from).

mod common;

use std::process::Child;

use common::{Cluster, finish, kill};

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
    kill(&mut doomed, "the worker");
    finish(&c, vec![(learner, "learner"), (survivor, "worker-b"), (coordinator, "coordinator")]);
    c.assert_data_order(usize::MAX);
}

/// The `step` values of `metrics.jsonl` in file order (a step redone after a restart repeats).
fn logged_steps(c: &Cluster) -> Vec<u64> {
    let text = std::fs::read_to_string(c.dir.join("run/learner/metrics.jsonl")).expect("metrics.jsonl");
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["step"].as_u64().expect("step")).collect()
}

/// Starts the coordinator, a learner paused by the test hook at `pause` (`point:step`), and two
/// workers; returns them once the learner has reached the pause.
fn run_until_paused(c: &Cluster, pause: &str) -> (Child, Child, Child, Child) {
    let coordinator = c.spawn("coordinator", "coordinator");
    c.wait_for_port();
    let learner = c.command(&[], "learner", "learner-1").env("MEDRL_TEST_PAUSE", pause).spawn().expect("learner starts");
    let w1 = c.spawn("worker", "worker-a");
    let w2 = c.spawn("worker", "worker-b");
    c.wait_log("learner-1", "test hook MEDRL_TEST_PAUSE: pausing", 1);
    (coordinator, learner, w1, w2)
}

#[test]
fn a_learner_killed_mid_step_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = Cluster::new(tmp.path());
    // Step 3 is computed (its groups taken, the weights updated in memory) but not yet recorded.
    let (coordinator, mut learner, w1, w2) = run_until_paused(&c, "step:3");
    kill(&mut learner, "the learner");
    assert!(c.checkpoint_dirs().contains("step-000002"), "{:?}", c.checkpoint_dirs());
    let learner = c.spawn("learner", "learner-2");
    finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
    assert!(c.log("learner-2").contains("step-000002"), "the new learner resumes from step 2's checkpoint");
    // The lost step left no trace: no rewind needed, and step 3 is logged once, by the new learner.
    assert!(!std::fs::read_to_string(c.dir.join("run/learner/consumed.jsonl")).expect("log").contains("rewind"));
    assert_eq!(logged_steps(&c), vec![1, 2, 3, 4, 5, 6]);
    // Step 3's prompts went back to the front of the queue: every step trains what it would have.
    c.assert_data_order(usize::MAX);
}

#[test]
fn a_learner_killed_mid_checkpoint_resumes_from_the_previous_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = Cluster::new(tmp.path());
    // Step 3 is trained, recorded and reported; its checkpoint is written but not yet renamed.
    let (coordinator, mut learner, w1, w2) = run_until_paused(&c, "checkpoint:3");
    kill(&mut learner, "the learner");
    let dirs = c.checkpoint_dirs();
    assert!(dirs.contains(".step-000003.tmp") && !dirs.contains("step-000003") && dirs.contains("step-000002"), "{dirs:?}");
    let learner = c.spawn("learner", "learner-2");
    c.wait_log("learner-2", "resuming the learner", 1);
    let log = c.log("learner-2");
    assert!(log.contains("removed a partial checkpoint") && log.contains(".step-000003.tmp"), "{log}");
    assert!(log.contains("step-000002") && !c.checkpoint_dirs().contains(".step-000003.tmp"), "{log}");
    finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
    // Step 3 was lost with its weights: the log forgets it and the new learner redoes it.
    assert!(std::fs::read_to_string(c.dir.join("run/learner/consumed.jsonl")).expect("log").contains(r#"{"kind":"rewind","to":2}"#));
    assert_eq!(logged_steps(&c), vec![1, 2, 3, 3, 4, 5, 6]);
    assert!(!c.checkpoint_dirs().iter().any(|d| d.ends_with(".tmp")), "{:?}", c.checkpoint_dirs());
    // The checkpoint's steps keep their data. After it the order is best effort: prompts of step
    // 4 leased or delivered before the kill may be trained in the redone step 3 (see README).
    c.assert_data_order(2);
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
    kill(&mut coordinator, "the coordinator");
    let coordinator = c.spawn("coordinator", "coordinator-2");
    finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
    c.assert_data_order(usize::MAX);
}
