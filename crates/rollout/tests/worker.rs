//! The rollout worker over real gRPC on loopback, against the real coordinator and a fake learner:
//! a whole epoch, learner failures, weight updates between groups (including corrupt blobs),
//! reproducible resampling, health and shutdown, and a prompt whose image cannot be decoded.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{DType, Device};
use common::*;
use medrl_model::pipeline::Vlm;
use medrl_proto::v1::{ImageRef, LeasedPrompt, RolloutGroup};
use medrl_rollout::{GroupJob, GroupSettings, WorkerSettings, WorkerStats, run_worker, sample_group};
use medrl_vqa::VqaRecord;
use sha2::{Digest, Sha256};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Starts a worker that runs until the run is done or `stop` fires.
fn spawn_worker(settings: WorkerSettings) -> (tokio::task::JoinHandle<WorkerStats>, tokio::sync::oneshot::Sender<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run_worker(settings, async move {
            let _ = rx.await;
        })
        .await
        .expect("worker runs")
    });
    (task, tx)
}

/// Acts as the learner's step loop: once `n` more groups have been accepted and acked, reports
/// them trained as version `version` (waiting for the acks keeps the coordinator's counts exact).
async fn train_after(
    c: &mut medrl_proto::v1::coordinator_client::CoordinatorClient<medrl_proto::client::AuthedChannel>,
    learner: &LearnerHandle,
    total_accepted: usize,
    version: u64,
) -> Vec<RolloutGroup> {
    wait_until(|| learner.state.accepted().len() >= total_accepted).await;
    let groups = learner.state.accepted();
    let trained_before: u32 = run_state(c).await.epoch_counts.first().map_or(0, |e| e.trained);
    loop {
        let st = run_state(c).await;
        let e = &st.epoch_counts[0];
        if (e.delivered + e.trained) as usize >= total_accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh: Vec<String> = groups.iter().skip(trained_before as usize).map(|g| g.prompt_id.clone()).collect();
    report_trained(c, fresh, version).await;
    groups
}

async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

async fn scrape(addr: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        text
    })
    .await
    .expect("scrape task")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Re-samples a received group from scratch with `vlm` (the weights its version names).
fn resample(fx: &Fixture, vlm: &Vlm, settings: &GroupSettings, g: &RolloutGroup) -> RolloutGroup {
    let record: VqaRecord = serde_json::from_str(&g.record_json).expect("record json");
    let images = g.images.iter().map(|i| fx.image(&i.name)).collect();
    let prompt = LeasedPrompt { prompt_id: g.prompt_id.clone(), record_json: g.record_json.clone(), images: g.images.clone(), attempt: g.attempt };
    let job = GroupJob { epoch: g.epoch, lease_id: g.lease_id.clone(), worker_id: g.worker_id.clone(), prompt, record, images };
    sample_group(vlm, g.policy_version, job, settings).expect("resample").group
}

fn tokens(g: &RolloutGroup) -> Vec<Vec<u32>> {
    g.completions.iter().map(|c| c.token_ids.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_an_epoch_one_group_per_prompt_and_exits_when_done() {
    bounded(async {
        init_tracing();
        let fx = fixture(6);
        let coord = start_coordinator(coordinator_config(2, 6), fx.prompts()).await;
        let learner = start_learner().await;
        let mut settings = worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 2);
        let (health_addr, metrics_addr) = (free_addr(), free_addr());
        settings.health_listen = Some(health_addr);
        settings.metrics_listen = Some(metrics_addr);
        let (worker, _stop) = spawn_worker(settings.clone());
        let mut c = coordinator_client(&coord).await;

        // Every prompt delivered and acked; before training them the worker waits, alive.
        wait_until(|| learner.state.accepted().len() == 6).await;
        loop {
            if run_state(&mut c).await.epoch_counts[0].delivered == 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(health(health_addr).await, Some(ServingStatus::Serving));
        let text = scrape(metrics_addr).await;
        for needle in [
            "medrl_rollout_groups_sent_total{outcome=\"accepted\"} 6",
            "medrl_rollout_tokens_total",
            "medrl_rollout_tokens_per_second",
            "medrl_rollout_lease_latency_seconds_count",
            "medrl_rollout_policy_version 0",
            "medrl_rollout_staleness_versions 0",
            "medrl_rollout_weight_fetch_seconds_count 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let groups = learner.state.accepted();
        report_trained(&mut c, groups.iter().map(|g| g.prompt_id.clone()).collect(), 1).await;
        let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits when done").expect("join");

        // One group per prompt, each complete.
        let records: HashMap<String, VqaRecord> = fx.records.iter().map(|r| (r.id.clone(), r.clone())).collect();
        let mut seen = std::collections::HashSet::new();
        let vlm = Vlm::load_for_inference(&fx.model_dir, DType::F32, &Device::Cpu).expect("vlm");
        for g in &groups {
            assert!(seen.insert(g.prompt_id.clone()), "one group per prompt");
            assert_eq!(g.group_id, medrl_proto::group_id(g.epoch, &g.prompt_id, g.attempt));
            assert_eq!((g.epoch, g.policy_version), (0, 0));
            assert!(!g.lease_id.is_empty() && !g.worker_id.is_empty());
            let record = &records[&g.prompt_id];
            assert_eq!(&serde_json::from_str::<VqaRecord>(&g.record_json).expect("record json"), record);
            assert_eq!(g.images.len(), record.images.len());
            for (image, name) in g.images.iter().zip(&record.images) {
                assert_eq!(&image.name, name);
                assert_eq!(image.sha256, sha(&fx.image(name)));
            }
            // The prompt is the template's text through the chat template, image pads expanded.
            let processed = vlm.images.process_bytes(&fx.image(&record.images[0]), "x").expect("image");
            let text = settings.template.build(&record.question, &record.options);
            let expected = vlm.user_prompt(text.system.as_deref(), vec![processed], &text.user).expect("prompt");
            assert_eq!(g.prompt_token_ids, expected.ids);
            assert_eq!(g.completions.len(), 4, "group_size completions");
            for comp in &g.completions {
                assert!(!comp.token_ids.is_empty() && comp.token_ids.len() <= 6);
                assert_eq!(comp.token_ids.len(), comp.logprobs.len());
                assert!(comp.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
                assert!(["eos", "stop", "length"].contains(&comp.finish_reason.as_str()), "{}", comp.finish_reason);
                if comp.finish_reason == "length" {
                    assert_eq!(comp.token_ids.len(), 6);
                }
                let reward = comp.reward.as_ref().expect("reward");
                assert_eq!(reward.components.len(), 4);
                assert_eq!(reward.total, reward.components["format"] + reward.components["accuracy"], "default weights");
            }
        }
        assert_eq!(seen.len(), 6);
        let tokens_sent: u64 = groups.iter().flat_map(|g| &g.completions).map(|c| c.token_ids.len() as u64).sum();
        assert_eq!(
            (stats.registrations, stats.leases, stats.prompts, stats.groups_sampled, stats.groups_accepted),
            (1, 3, 6, 6, 6),
            "{stats:?}"
        );
        assert_eq!((stats.acks, stats.prompts_delivered, stats.ack_duplicates, stats.prompts_failed), (3, 6, 0, 0), "{stats:?}");
        assert_eq!(stats.completion_tokens, tokens_sent);
        assert!(stats.run_done);
        let st = run_state(&mut c).await;
        assert!(st.done);
        assert_eq!(st.epoch_counts[0].trained, 6);
        // The endpoints close with the worker.
        assert_eq!(health(health_addr).await, None);
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_failures_are_retried_with_the_same_group_and_acked_once() {
    bounded(async {
        init_tracing();
        let fx = fixture(4);
        let coord = start_coordinator(coordinator_config(1, 4), fx.prompts()).await;
        let learner = start_learner().await;
        learner.state.fail_next_submits.store(3, Ordering::SeqCst);
        let (worker, _stop) = spawn_worker(worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1));
        let mut c = coordinator_client(&coord).await;
        let groups = train_after(&mut c, &learner, 4, 1).await;
        let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits").expect("join");

        let all = learner.state.all();
        let failed: Vec<&Submission> = all.iter().filter(|s| !s.answered).collect();
        assert_eq!(failed.len(), 3);
        for f in failed {
            // A retry is the same group: same id, same tokens, so the learner can deduplicate it.
            let accepted = groups.iter().find(|g| g.group_id == f.group.group_id).expect("the failed group was retried and accepted");
            assert_eq!(tokens(accepted), tokens(&f.group));
            assert_eq!(accepted.prompt_token_ids, f.group.prompt_token_ids);
        }
        assert_eq!(groups.len(), 4);
        assert_eq!((stats.leases, stats.groups_accepted, stats.groups_duplicate, stats.groups_undelivered), (4, 4, 0, 0), "{stats:?}");
        assert_eq!((stats.acks, stats.prompts_delivered, stats.ack_duplicates), (4, 4, 0), "acked once per lease: {stats:?}");
        assert!(stats.run_done);
        let st = run_state(&mut c).await;
        assert_eq!((st.epoch_counts[0].trained, st.epoch_counts[0].leased, st.epoch_counts[0].pending), (4, 0, 0));
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_weights_apply_between_groups_and_corrupt_blobs_keep_the_old_ones() {
    bounded(async {
        init_tracing();
        let fx = fixture(6);
        // Strictly on-policy, two prompts per step: the coordinator leases two prompts per version.
        let coord = start_coordinator(coordinator_config(1, 2), fx.prompts()).await;
        let learner = start_learner().await;
        let mut settings = worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1);
        settings.tuning.weight_tries_per_group = 2;
        let (worker, _stop) = spawn_worker(settings.clone());
        let mut c = coordinator_client(&coord).await;

        // Step 1: version 1 is published; its first transfer arrives corrupted (checksum mismatch).
        let weights1 = fx.random_weights(1);
        let blob1 = medrl_weight_sync::encode_weights(&weights1, DType::F32).expect("encode");
        wait_until(|| learner.state.accepted().len() >= 2).await;
        learner.state.publish_blob(1, blob1.clone());
        learner.state.corrupt_next_fetches.store(1, Ordering::SeqCst);
        train_after(&mut c, &learner, 2, 1).await;
        publish_version(&mut c, 1, &blob1).await;

        // Step 2: version 2 is published, but its blob is not safetensors (checksum right).
        let garbage = Bytes::from_static(b"these bytes are not a safetensors file at all");
        wait_until(|| learner.state.accepted().len() >= 4).await;
        learner.state.publish_blob(2, garbage.clone());
        train_after(&mut c, &learner, 4, 2).await;
        publish_version(&mut c, 2, &garbage).await;

        let groups = train_after(&mut c, &learner, 6, 3).await;
        let stats = tokio::time::timeout(Duration::from_secs(30), worker).await.expect("worker exits").expect("join");

        let versions: Vec<u64> = groups.iter().map(|g| g.policy_version).collect();
        assert_eq!(versions, vec![0, 0, 1, 1, 1, 1], "v1 from the first group after its publication; v2 never applied");
        let fetches = learner.state.fetches.lock().expect("lock").clone();
        assert_eq!(fetches.iter().filter(|&&v| v == 1).count(), 2, "the corrupt transfer was refused and fetched again: {fetches:?}");
        assert!(fetches.contains(&2), "{fetches:?}");
        assert_eq!((stats.weight_updates, stats.policy_version), (1, 1), "{stats:?}");
        assert!(stats.weight_failures >= 2, "one corrupt transfer and at least one undecodable blob: {stats:?}");
        assert_eq!((stats.groups_accepted, stats.acks), (6, 6));

        // Each group was sampled wholly with the weights its version names: sampling it again
        // from scratch with those weights gives the same tokens and log-probs.
        let gs = settings.group_settings();
        let v0 = Vlm::load_for_inference(&fx.model_dir, DType::F32, &Device::Cpu).expect("v0");
        let v1 = fx.vlm_with(&weights1);
        for g in &groups {
            let vlm = if g.policy_version == 0 { &v0 } else { &v1 };
            let again = resample(&fx, vlm, &gs, g);
            assert_eq!(again.prompt_token_ids, g.prompt_token_ids);
            assert_eq!(tokens(&again), tokens(g), "group {} differs from version {}", g.group_id, g.policy_version);
            let lps = |g: &RolloutGroup| g.completions.iter().map(|c| c.logprobs.clone()).collect::<Vec<_>>();
            assert_eq!(lps(&again), lps(g));
        }
        // And version 1 does sample differently from version 0 (the check above has teeth).
        let first = &groups[0];
        assert_ne!(tokens(&resample(&fx, &v1, &gs, first)), tokens(first));
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

/// The groups of a whole run, by group id.
async fn run_once(fx: &Fixture) -> BTreeMap<String, Vec<Vec<u32>>> {
    let coord = start_coordinator(coordinator_config(1, 3), fx.prompts()).await;
    let learner = start_learner().await;
    let (worker, _stop) = spawn_worker(worker_settings(fx, &coord.endpoint(), &learner.endpoint, 1));
    let mut c = coordinator_client(&coord).await;
    let groups = train_after(&mut c, &learner, 3, 1).await;
    tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits").expect("join");
    learner.shutdown().await;
    coord.shutdown().await.expect("coordinator stops");
    groups.into_iter().map(|g| (g.group_id.clone(), tokens(&g))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_resamples_identically_and_a_new_attempt_resamples_fresh() {
    bounded(async {
        init_tracing();
        let fx = fixture(3);
        // A coordinator without a journal that restarts grants the same (epoch, prompt, attempt)
        // again: the worker resamples the same groups, so the learner sees them as duplicates.
        let first = run_once(&fx).await;
        let second = run_once(&fx).await;
        assert_eq!(first.len(), 3);
        assert_eq!(first, second);

        // Directly: the same key samples the same group; the next attempt samples another.
        let settings = worker_settings(&fx, "http://unused", "http://unused", 1);
        let gs = settings.group_settings();
        let vlm = Vlm::load_for_inference(&fx.model_dir, DType::F32, &Device::Cpu).expect("vlm");
        let record = fx.records[0].clone();
        let image = fx.image(&record.images[0]);
        let job = |attempt: u64| GroupJob {
            epoch: 0,
            lease_id: "1-1".into(),
            worker_id: "w1-1".into(),
            prompt: LeasedPrompt {
                prompt_id: record.id.clone(),
                record_json: serde_json::to_string(&record).expect("json"),
                images: vec![ImageRef { sha256: sha(&image), size_bytes: image.len() as u64, name: record.images[0].clone() }],
                attempt,
            },
            record: record.clone(),
            images: vec![image.clone()],
        };
        let a = sample_group(&vlm, 0, job(7), &gs).expect("sample");
        let b = sample_group(&vlm, 0, job(7), &gs).expect("sample");
        let c = sample_group(&vlm, 0, job(8), &gs).expect("sample");
        assert_eq!(a.group, b.group);
        assert_ne!(a.group.group_id, c.group.group_id);
        assert_ne!(tokens(&a.group), tokens(&c.group), "another attempt draws other samples");
        let distinct: std::collections::HashSet<_> = tokens(&a.group).into_iter().collect();
        assert!(distinct.len() > 1, "the K samples of a group differ from each other");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_a_failing_learner_and_shutdown_leaves_undelivered_work_unacked() {
    bounded(async {
        init_tracing();
        let fx = fixture(4);
        let coord = start_coordinator(coordinator_config(1, 4), fx.prompts()).await;
        let learner = start_learner().await;
        learner.state.fail_next_submits.store(u32::MAX, Ordering::SeqCst);
        let mut settings = worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1);
        settings.tuning.stall_after = Duration::from_millis(300);
        settings.tuning.drain_timeout = Duration::from_millis(500);
        let health_addr = free_addr();
        settings.health_listen = Some(health_addr);
        let (worker, stop) = spawn_worker(settings);

        // The learner refuses everything: after the stall window health says NOT_SERVING, and
        // the worker stops leasing once two leases wait for delivery (bounded memory).
        wait_until(|| learner.state.all().len() >= 3).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while health(health_addr).await != Some(ServingStatus::NotServing) {
            assert!(Instant::now() < deadline, "health never turned NOT_SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = coordinator_client(&coord).await;
        assert_eq!(run_state(&mut c).await.epoch_counts[0].leased, 2, "at most two leases in delivery");

        // The learner recovers: deliveries go through and health returns to SERVING.
        learner.state.fail_next_submits.store(0, Ordering::SeqCst);
        wait_until(|| !learner.state.accepted().is_empty()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while health(health_addr).await != Some(ServingStatus::Serving) {
            assert!(Instant::now() < deadline, "health never returned to SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Now the learner fails again and the worker is asked to stop: it exits within its drain
        // time, and whatever the learner did not take stays unacked (its lease will expire).
        learner.state.fail_next_submits.store(u32::MAX, Ordering::SeqCst);
        let accepted_before = learner.state.accepted().len();
        let asked = Instant::now();
        stop.send(()).expect("worker alive");
        let stats = tokio::time::timeout(Duration::from_secs(10), worker).await.expect("worker exits on shutdown").expect("join");
        assert!(asked.elapsed() < Duration::from_secs(5), "exited in {:?}", asked.elapsed());
        assert!(!stats.run_done);
        assert_eq!(stats.prompts_delivered, learner.state.accepted().len() as u64, "{stats:?}");
        assert!(stats.prompts_delivered >= accepted_before as u64);
        assert_eq!(stats.ack_duplicates, 0);
        let st = run_state(&mut c).await;
        assert_eq!(u64::from(st.epoch_counts[0].delivered), stats.prompts_delivered);
        assert!(!st.done);
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_whose_image_cannot_be_decoded_is_not_delivered_and_the_run_still_finishes() {
    bounded(async {
        init_tracing();
        let fx = fixture(3);
        let broken = fx.records[1].clone();
        overwrite(&fx.data_dir.join(&broken.images[0]), b"not an image");
        let mut config = coordinator_config(1, 3);
        config.max_attempts = 2;
        let coord = start_coordinator(config, fx.prompts()).await;
        let learner = start_learner().await;
        let (worker, _stop) = spawn_worker(worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1));
        let mut c = coordinator_client(&coord).await;
        let groups = train_after(&mut c, &learner, 2, 1).await;
        // As a learner would after its step: publish version 1, which opens the staleness gate
        // for the broken prompt's last grant (the one that marks it failed).
        let blob = fx.base_blob();
        learner.state.publish_blob(1, blob.clone());
        publish_version(&mut c, 1, &blob).await;
        let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits").expect("join");
        assert!(groups.iter().all(|g| g.prompt_id != broken.id));
        assert_eq!((stats.groups_accepted, stats.prompts_failed), (2, 2), "{stats:?}");
        assert!(stats.run_done);
        let st = run_state(&mut c).await;
        assert_eq!((st.epoch_counts[0].trained, st.epoch_counts[0].failed), (2, 1));
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_the_coordinator_no_longer_knows_is_replaced_by_the_learners_current_one() {
    bounded(async {
        init_tracing();
        let fx = fixture(4);
        let coord = start_coordinator(coordinator_config(1, 4), fx.prompts()).await;
        let learner = start_learner().await;
        let mut c = coordinator_client(&coord).await;
        // Version 1 is live before the worker starts: it fetches it first.
        let blob0 = fx.base_blob();
        let blob1 = medrl_weight_sync::encode_weights(&fx.random_weights(1), DType::F32).expect("encode");
        learner.state.publish_blob(1, blob1.clone());
        let step = medrl_proto::v1::ReportConsumedRequest { new_version: 1, trained: vec![], requeue: vec![] };
        c.report_consumed(step).await.expect("learner version 1");
        publish_version(&mut c, 1, &blob1).await;
        // The learner refuses groups for now, so the worker holds two sampled leases.
        learner.state.fail_next_submits.store(u32::MAX, Ordering::SeqCst);
        let (worker, _stop) = spawn_worker(worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1));
        wait_until(|| learner.state.all().len() >= 2).await;

        // The learner restarts from its version-0 checkpoint: the coordinator's clock goes back
        // to 0 and the learner serves only version 0. The worker's version 1 no longer exists.
        {
            let mut blobs = learner.state.blobs.lock().expect("lock");
            blobs.clear();
            blobs.insert(0, blob0);
        }
        c.sync_learner(medrl_proto::v1::SyncLearnerRequest { high_water_version: 0 }).await.expect("sync");
        // The two leases were granted at version 1: they expire with it, their prompts requeued.
        assert_eq!(run_state(&mut c).await.epoch_counts[0].leased, 0);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        learner.state.fail_next_submits.store(0, Ordering::SeqCst);

        let groups = train_after(&mut c, &learner, 4, 1).await;
        let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits").expect("join");
        // The v1 groups of the expired leases are dropped once a heartbeat (at v0) says so; one
        // retried before that still lands (this fake learner takes any version; the real one
        // refuses a version it does not have). The requeued prompts are sampled with v0.
        let v1 = groups.iter().filter(|g| g.policy_version == 1).count();
        let v0 = groups.iter().filter(|g| g.policy_version == 0).count();
        assert!(v1 <= 2 && v0 >= 2 && v0 + v1 == groups.len(), "sampled before the restart with v1, after it with the learner's v0: {v1} v1, {v0} v0 of {}", groups.len());
        assert_eq!(learner.state.fetches.lock().expect("lock").clone(), vec![1, 0]);
        assert_eq!((stats.weight_updates, stats.policy_version, stats.groups_accepted), (2, 0, 4), "{stats:?}");
        assert!(stats.run_done);
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_for_a_version_withdrawn_meanwhile_is_abandoned() {
    bounded(async {
        init_tracing();
        let fx = fixture(2);
        let coord = start_coordinator(coordinator_config(1, 2), fx.prompts()).await;
        let learner = start_learner().await;
        learner.state.hold_missing_versions.store(true, Ordering::SeqCst);
        learner.state.publish_blob(0, fx.base_blob());
        // Version 1 is announced, then lost with the learner before it served it.
        let mut c = coordinator_client(&coord).await;
        let blob1 = medrl_weight_sync::encode_weights(&fx.random_weights(1), DType::F32).expect("encode");
        c.report_consumed(medrl_proto::v1::ReportConsumedRequest { new_version: 1, trained: vec![], requeue: vec![] }).await.expect("learner version 1");
        publish_version(&mut c, 1, &blob1).await;
        let (worker, _stop) = spawn_worker(worker_settings(&fx, &coord.endpoint(), &learner.endpoint, 1));
        // The worker holds version 0 and is waiting for version 1's weights.
        wait_until(|| learner.state.fetch_calls.load(Ordering::SeqCst) >= 1).await;
        c.sync_learner(medrl_proto::v1::SyncLearnerRequest { high_water_version: 0 }).await.expect("sync");

        // The next heartbeat says version 1 is gone: the wait ends there, not at the fetch's
        // timeout, and counts as no failure; the prompts are sampled with version 0.
        let groups = train_after(&mut c, &learner, 2, 1).await;
        let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker exits").expect("join");
        assert!(groups.iter().all(|g| g.policy_version == 0), "{:?}", groups.iter().map(|g| g.policy_version).collect::<Vec<_>>());
        assert_eq!((stats.weight_updates, stats.weight_failures, stats.policy_version), (0, 0, 0), "{stats:?}");
        assert!(learner.state.fetches.lock().expect("lock").is_empty(), "version 1 was never served");
        assert!(stats.run_done);
        learner.shutdown().await;
        coord.shutdown().await.expect("coordinator stops");
    })
    .await;
}
