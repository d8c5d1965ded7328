//! Load: 64 simulated workers (light clients that skip the model) and a simulated learner against
//! one coordinator on loopback, for a bounded time. Nothing is lost or doubled (every prompt of
//! every epoch leased, delivered and trained exactly once, by the coordinator's own counts) and
//! lease latency stays bounded.

mod common;

use std::time::Duration;

use common::bounded;
use medrl_coordinator::CoordinatorConfig;
use medrl_coordinator::loadgen::{LoadSpec, run_load, synthetic_prompts};
use medrl_proto::ClientOptions;

const WORKERS: usize = 64;
const PROMPTS: usize = 4096;
const EPOCHS: u32 = 2;
/// Hard stop for the generator; the run normally finishes in a few seconds.
const RUN_BOUND: Duration = Duration::from_secs(40);
/// Generous: 2 shared cores run the coordinator, 64 workers and the learner together, in a
/// debug build. A regression to, say, journalling under the lock with an fsync per call shows up
/// as seconds.
const P99_BOUND_MS: f64 = 1000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_workers_lose_no_lease_and_lease_latency_stays_bounded() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: None,
            // Long enough that no lease expires: a lease lost here would be a bug, not a timeout.
            lease_ttl_s: 60.0,
            lease_max_lifetime_s: 120.0,
            heartbeat_interval_s: 10.0,
            prompts_per_lease: 1,
            prompts_per_step: 64,
            max_staleness: 1,
            epochs: EPOCHS,
            retry_after_ms: 10,
            reaper_interval_s: 0.1,
            // The journal is on, as in a real run: every grant, ack and step is made durable.
            journal: Some(dir.path().join("journal.jsonl")),
            ..CoordinatorConfig::default()
        };
        let prompts = synthetic_prompts(dir.path(), PROMPTS).expect("prompt set");
        let handle = medrl_coordinator::serve(config, prompts).await.expect("coordinator starts");
        let spec = LoadSpec {
            workers: WORKERS,
            duration: RUN_BOUND,
            prompts_per_lease: 1,
            prompts_per_step: 64,
            max_calls_per_worker: 20_000,
            min_retry: Duration::from_millis(5),
        };
        let options = ClientOptions { request_timeout: Some(Duration::from_secs(10)), ..ClientOptions::default() };
        let report = run_load(&handle.endpoint(), &options, &spec).await.expect("workers connect");
        eprintln!("{}", serde_json::to_string(&report).expect("report json"));

        let total = PROMPTS as u64 * u64::from(EPOCHS);
        assert_eq!(report.errors, 0, "{:?}", report.first_errors);
        assert!(report.done, "the run finished within {RUN_BOUND:?}: {:?}", report.final_state);
        // Every prompt of every epoch went to exactly one worker, once.
        assert_eq!((report.leases, report.prompts_leased), (total, total), "one grant per prompt per epoch");
        assert_eq!(report.delivered_to_learner.len() as u64, total, "every (epoch, prompt) reached the learner");
        let doubled: Vec<_> = report.delivered_to_learner.iter().filter(|(_, n)| **n != 1).collect();
        assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
        // Acks: a group the learner trained before its ack arrived counts as a duplicate delivery,
        // never as a second one; nothing was sent back to the queue.
        assert_eq!(report.acked_delivered + report.acked_duplicate, total);
        assert_eq!(report.acked_requeued, 0);
        // The coordinator's own accounting: every prompt trained exactly once per epoch.
        assert_eq!((report.trained, report.trained_duplicate), (total, 0));
        let state = report.final_state.as_ref().expect("final state");
        assert!(state.done);
        assert_eq!(state.epoch_counts.len(), EPOCHS as usize);
        for e in &state.epoch_counts {
            assert_eq!(
                (e.total, e.trained, e.pending, e.leased, e.delivered, e.skipped, e.failed),
                (PROMPTS as u32, PROMPTS as u32, 0, 0, 0, 0, 0),
                "epoch {}",
                e.epoch
            );
        }
        let metrics = handle.metrics_text().expect("metrics");
        assert!(metrics.contains("medrl_coordinator_leases_expired_total 0"), "no lease expired:\n{metrics}");
        assert!(metrics.contains(&format!("medrl_coordinator_leases_granted_total {total}")), "{metrics}");

        // Bounded lease latency, over every LeasePrompts call (granted or empty).
        assert!(report.lease_latency.count as u64 >= total);
        assert!(
            report.lease_latency.p99_ms < P99_BOUND_MS,
            "lease p99 {:.1} ms over {P99_BOUND_MS} ms: {:?}",
            report.lease_latency.p99_ms,
            report.lease_latency
        );
        assert!(report.elapsed_s < RUN_BOUND.as_secs_f64());
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}
