//! Leases over real gRPC on loopback: expiry and re-lease, exactly-once accounting with two
//! workers one of which dies mid-lease, the staleness gate, and the learner's resync.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use medrl_coordinator::CoordinatorConfig;
use medrl_proto::v1::{AckLeaseRequest, DeliveredPrompt, GetImageRequest, HeartbeatRequest, SyncLearnerRequest, WaitReason};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_relet_and_late_ack_still_counts() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { lease_ttl_s: 0.3, lease_max_lifetime_s: 1.0, prompts_per_lease: 2, prompts_per_step: 8, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 6)).await;
        let mut c = client(&handle).await;
        let a = register(&mut c, "a").await;
        let b = register(&mut c, "b").await;

        let first = lease(&mut c, &a, 2, 0).await.expect("lease for a");
        assert_eq!(first.prompts.len(), 2);
        assert_eq!(first.policy_version, 0);
        assert!(first.ttl_ms > 0 && first.ttl_ms <= 300);

        // The image arrives by content address and matches it.
        let image = &first.prompts[0].images[0];
        let bytes = c.get_image(GetImageRequest::from(image)).await.expect("image").into_inner().data;
        assert_eq!(hex::encode(Sha256::digest(&bytes)), image.sha256);
        assert_eq!(bytes.len() as u64, image.size_bytes);

        // A heartbeat renews a lease past its ttl, up to the max lifetime.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let hb = c
            .heartbeat(HeartbeatRequest { worker_id: a.clone(), policy_version: 0, lease_ids: vec![first.lease_id.clone()] })
            .await
            .expect("heartbeat")
            .into_inner();
        assert_eq!(hb.valid_lease_ids, vec![first.lease_id.clone()]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(state(&mut c).await.epoch_counts[0].leased, 2, "renewed lease still out after 0.4 s");

        // Without renewal it expires and its prompts go to the next worker, first in line.
        tokio::time::sleep(Duration::from_millis(450)).await;
        let st = state(&mut c).await;
        assert_eq!((st.epoch_counts[0].leased, st.epoch_counts[0].pending), (0, 6));
        let hb = c
            .heartbeat(HeartbeatRequest { worker_id: a.clone(), policy_version: 0, lease_ids: vec![first.lease_id.clone()] })
            .await
            .expect("heartbeat")
            .into_inner();
        assert!(hb.valid_lease_ids.is_empty(), "expired lease is no longer valid");

        let second = lease(&mut c, &b, 2, 0).await.expect("lease for b");
        assert_ne!(second.lease_id, first.lease_id);
        let ids = |l: &medrl_proto::v1::Lease| l.prompts.iter().map(|p| p.prompt_id.clone()).collect::<HashSet<_>>();
        assert_eq!(ids(&second), ids(&first), "expired prompts are re-leased first");
        for (x, y) in first.prompts.iter().zip(&second.prompts) {
            if x.prompt_id == y.prompt_id {
                assert_ne!(x.attempt, y.attempt, "each grant has its own attempt, so group ids differ");
            }
        }

        // a's group did reach the learner: its late ack counts, and b's ack is then a duplicate.
        let late = c
            .ack_lease(AckLeaseRequest {
                lease_id: first.lease_id.clone(),
                worker_id: a.clone(),
                delivered: first.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate: Some(0.5) }).collect(),
            })
            .await
            .expect("late ack")
            .into_inner();
        assert!(late.late);
        assert_eq!(late.delivered, 2);
        let dup = c
            .ack_lease(AckLeaseRequest {
                lease_id: second.lease_id.clone(),
                worker_id: b.clone(),
                delivered: second.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate: None }).collect(),
            })
            .await
            .expect("ack")
            .into_inner();
        assert_eq!((dup.delivered, dup.duplicate, dup.late), (0, 2, false));
        let st = state(&mut c).await;
        assert_eq!((st.epoch_counts[0].delivered, st.epoch_counts[0].leased, st.epoch_counts[0].pending), (2, 0, 4));
        let text = handle.metrics_text().expect("metrics");
        assert!(text.contains("medrl_coordinator_leases_expired_total 1"), "{text}");
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

/// Simulated learner: trains a step when it holds `pps` groups, or when nothing else can come.
async fn learner_loop(
    endpoint_client: &mut medrl_proto::v1::coordinator_client::CoordinatorClient<medrl_proto::client::AuthedChannel>,
    inbox: Arc<Mutex<Vec<(u32, String, u64)>>>,
    pps: usize,
    max_staleness: u64,
) -> HashMap<(u32, String), u64> {
    let mut version = 0u64;
    let mut trained: HashMap<(u32, String), u64> = HashMap::new();
    loop {
        let st = state(endpoint_client).await;
        if st.done {
            return trained;
        }
        let nothing_else = st.epoch_counts.iter().all(|e| e.pending == 0 && e.leased == 0);
        let batch: Vec<(u32, String, u64)> = {
            let mut inbox = inbox.lock().expect("inbox");
            if inbox.len() >= pps || (nothing_else && !inbox.is_empty()) {
                inbox.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // The learner's own consumed log: never train a prompt twice in an epoch.
        let mut by_epoch: HashMap<u32, Vec<String>> = HashMap::new();
        for (epoch, prompt, sampled_with) in batch {
            assert!(version - sampled_with <= max_staleness, "group of version {sampled_with} trained at {version}");
            if trained.insert((epoch, prompt.clone()), version + 1).is_none() {
                by_epoch.entry(epoch).or_default().push(prompt);
            }
        }
        version += 1;
        for (epoch, prompts) in by_epoch {
            train(endpoint_client, epoch, prompts, version).await;
        }
        publish(endpoint_client, version).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_every_prompt_exactly_once_when_one_dies() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 10;
        let config = CoordinatorConfig {
            heartbeat_interval_s: 0.1,
            worker_timeout_heartbeats: 3,
            prompts_per_lease: 1,
            prompts_per_step: 2,
            max_staleness: 0,
            epochs: 2,
            journal: Some(dir.path().join("coordinator.journal")),
            ..fast_config()
        };
        let handle = start(config, prompt_set(dir.path(), n)).await;
        let inbox: Arc<Mutex<Vec<(u32, String, u64)>>> = Arc::default();

        // Worker "doomed" takes one prompt and vanishes: no heartbeat, no ack.
        let mut c = client(&handle).await;
        let doomed = register(&mut c, "doomed").await;
        let lost = lease(&mut c, &doomed, 1, 0).await.expect("doomed lease");

        let mut workers = Vec::new();
        for name in ["steady-1", "steady-2"] {
            let mut wc = client(&handle).await;
            let inbox = inbox.clone();
            workers.push(tokio::spawn(async move {
                let id = register(&mut wc, name).await;
                let mut held = 0u64;
                let mut delivered = 0;
                loop {
                    let r = wc
                        .lease_prompts(medrl_proto::v1::LeasePromptsRequest { worker_id: id.clone(), max_prompts: 1, policy_version: held })
                        .await
                        .expect("lease")
                        .into_inner();
                    if r.done {
                        return delivered;
                    }
                    let Some(l) = r.lease.filter(|l| !l.prompts.is_empty()) else {
                        // Idle: heartbeat (learning the new version) and retry.
                        let hb = wc
                            .heartbeat(HeartbeatRequest { worker_id: id.clone(), policy_version: held, lease_ids: vec![] })
                            .await
                            .expect("heartbeat")
                            .into_inner();
                        held = hb.policy_version;
                        tokio::time::sleep(Duration::from_millis(r.retry_after_ms.max(5))).await;
                        continue;
                    };
                    held = l.policy_version;
                    {
                        let mut inbox = inbox.lock().expect("inbox");
                        for p in &l.prompts {
                            inbox.push((l.epoch, p.prompt_id.clone(), l.policy_version));
                        }
                    }
                    let delivered_now = l.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate: Some(0.5) }).collect();
                    let r = wc
                        .ack_lease(AckLeaseRequest { lease_id: l.lease_id.clone(), worker_id: id.clone(), delivered: delivered_now })
                        .await
                        .expect("ack")
                        .into_inner();
                    // The learner may train a group before its ack arrives: then it counts as
                    // a duplicate delivery, never as a second one.
                    delivered += r.delivered + r.duplicate;
                }
            }));
        }
        let mut lc = client(&handle).await;
        let trained = learner_loop(&mut lc, inbox, 2, 0).await;
        let mut delivered = 0;
        for w in workers {
            delivered += w.await.expect("worker task");
        }
        let st = state(&mut c).await;
        assert!(st.done);
        assert_eq!(trained.len(), 2 * n, "every prompt of both epochs trained");
        for e in &st.epoch_counts {
            assert_eq!((e.trained, e.pending, e.leased, e.delivered), (n as u32, 0, 0, 0), "epoch {}", e.epoch);
        }
        assert_eq!(delivered, 2 * n as u32, "each prompt acked once per epoch by the steady workers");
        assert!(trained.contains_key(&(0, lost.prompts[0].prompt_id.clone())), "the dead worker's prompt was trained");
        let text = handle.metrics_text().expect("metrics");
        assert!(text.contains("medrl_coordinator_workers_lost_total 1"), "{text}");
        assert!(text.contains("medrl_coordinator_run_done 1"), "{text}");
        handle.shutdown().await.expect("shutdown");

        // One support snapshot per completed epoch beside the journal: every prompt acked at
        // pass rate 0.5 is `partial`, 5 per modality.
        let text = std::fs::read_to_string(dir.path().join(medrl_coordinator::support_log::SUPPORT_JSONL)).expect("support.jsonl");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        assert_eq!(lines.iter().map(|l| l["epoch"].as_u64()).collect::<Vec<_>>(), vec![Some(0), Some(1)], "{text}");
        let last = &lines[1];
        assert_eq!(last["classes"], serde_json::json!(["unseen", "zero", "partial", "saturated"]));
        assert_eq!(last["done"], serde_json::json!(true));
        for (m, modality) in ["ct", "mri"].iter().enumerate() {
            assert_eq!(last["modalities"][m]["modality"], serde_json::json!(modality), "{text}");
            assert_eq!(last["modalities"][m]["counts"], serde_json::json!([0, 0, 5, 0]), "{text}");
            assert_eq!(last["modalities"][m]["mean_pass_rate"].as_f64(), Some(0.5), "{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_on_policy_gates_leases_on_the_published_version() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { prompts_per_lease: 1, prompts_per_step: 2, max_staleness: 0, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 8)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let l1 = lease(&mut c, &w, 1, 0).await.expect("1");
        let l2 = lease(&mut c, &w, 1, 0).await.expect("2");
        assert_eq!(wait_reason(&mut c, &w, 0).await, (WaitReason::StalenessGate as i32, false));
        ack_all(&mut c, &w, &l1, None).await;
        ack_all(&mut c, &w, &l2, None).await;
        assert_eq!(wait_reason(&mut c, &w, 0).await.0, WaitReason::StalenessGate as i32, "delivered still counts");
        let step: Vec<String> = [&l1, &l2].iter().map(|l| l.prompts[0].prompt_id.clone()).collect();
        assert_eq!(train(&mut c, 0, step, 1).await, 2);
        // The learner is at 1 but has not published: leasing at 0 would be stale.
        assert_eq!(wait_reason(&mut c, &w, 0).await.0, WaitReason::StalenessGate as i32);
        publish(&mut c, 1).await;
        let l3 = lease(&mut c, &w, 1, 1).await.expect("after publish");
        assert_eq!(l3.policy_version, 1);
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_one_lets_two_steps_run_ahead() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { prompts_per_lease: 1, prompts_per_step: 2, max_staleness: 1, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 8)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(lease(&mut c, &w, 1, 0).await.expect("within two steps"));
        }
        assert!(leases.iter().all(|l| l.policy_version == 0));
        assert_eq!(wait_reason(&mut c, &w, 0).await.0, WaitReason::StalenessGate as i32);
        for l in &leases {
            ack_all(&mut c, &w, l, None).await;
        }
        let first_step: Vec<String> = leases[..2].iter().map(|l| l.prompts[0].prompt_id.clone()).collect();
        train(&mut c, 0, first_step, 1).await;
        // Learner at 1, published 0: one step of slack is used up by the lag.
        assert_eq!(wait_reason(&mut c, &w, 0).await.0, WaitReason::StalenessGate as i32);
        publish(&mut c, 1).await;
        let a = lease(&mut c, &w, 1, 1).await.expect("a");
        let b = lease(&mut c, &w, 1, 1).await.expect("b");
        assert_eq!((a.policy_version, b.policy_version), (1, 1));
        assert_eq!(wait_reason(&mut c, &w, 1).await.0, WaitReason::StalenessGate as i32);
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_sync_requeues_untrained_and_lost_steps() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { prompts_per_lease: 4, prompts_per_step: 4, max_staleness: 3, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 6)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let l = lease(&mut c, &w, 4, 0).await.expect("lease");
        assert_eq!(ack_all(&mut c, &w, &l, Some(1.0)).await, 4);
        let ids: Vec<String> = l.prompts.iter().map(|p| p.prompt_id.clone()).collect();
        train(&mut c, 0, ids[..2].to_vec(), 1).await;
        publish(&mut c, 1).await;
        train(&mut c, 0, ids[2..3].to_vec(), 2).await;
        publish(&mut c, 2).await;
        // The last two prompts are leased to be sampled with version 2.
        let late = lease(&mut c, &w, 4, 2).await.expect("lease at version 2");
        assert_eq!((late.policy_version, late.prompts.len()), (2, 2));
        // The learner crashes; its durable log ends at version 1.
        let sync = c.sync_learner(SyncLearnerRequest { high_water_version: 1 }).await.expect("sync").into_inner();
        assert_eq!((sync.requeued_delivered, sync.requeued_trained, sync.policy_version), (1, 1, 1));
        let st = state(&mut c).await;
        assert_eq!((st.published_version, st.learner_version), (1, 1));
        // Version 2 is gone, so is the lease granted at it: nothing waits on weights that will
        // not come, and the budget is free for the redone steps.
        let e = &st.epoch_counts[0];
        assert_eq!((e.trained, e.delivered, e.leased, e.pending), (2, 0, 0, 4));
        let beat = c
            .heartbeat(HeartbeatRequest { worker_id: w.clone(), policy_version: 1, lease_ids: vec![late.lease_id.clone()] })
            .await
            .expect("heartbeat")
            .into_inner();
        assert!(beat.valid_lease_ids.is_empty(), "{:?}", beat.valid_lease_ids);
        // The requeued prompts come back in the data order: the lost step's prompt (ids[2]), the
        // untrained delivery (ids[3]), then the expired lease's two.
        let again = lease(&mut c, &w, 4, 1).await.expect("re-lease");
        let got: Vec<String> = again.prompts.iter().map(|p| p.prompt_id.clone()).collect();
        let mut expected = ids[2..4].to_vec();
        expected.extend(late.prompts.iter().map(|p| p.prompt_id.clone()));
        assert_eq!(got, expected);
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}
