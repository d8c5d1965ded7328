//! Restarts, bad input and the standard services over real gRPC on loopback: a coordinator
//! restarted from its journal resumes the same order with nothing lost or doubled and serves the
//! images leased before the restart; malformed, unknown and oversized requests are error statuses
//! that leave the server serving; health, reflection and /metrics respond; support-aware
//! scheduling skips prompts without signal.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use medrl_coordinator::order::epoch_order;
use medrl_coordinator::{CoordinatorConfig, SupportConfig, serve};
use medrl_proto::v1::{
    AckLeaseRequest, DeliveredPrompt, EpochPrompts, GetImageRequest, GetNcclIdRequest, LeasePromptsRequest, PublishNcclIdRequest,
    PublishVersionRequest, RegisterWorkerRequest, ReportConsumedRequest,
};
use medrl_proto::{ClientOptions, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_the_journal_resumes_the_same_order_without_loss_or_doubles() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 12u32;
        let config = CoordinatorConfig {
            journal: Some(dir.path().join("run/journal.jsonl")),
            prompts_per_lease: 1,
            prompts_per_step: 100,
            epochs: 2,
            seed: 7,
            ..fast_config()
        };
        let ids_of = |order: Vec<u32>| order.into_iter().map(|i| format!("synthetic/train/{i}")).collect::<Vec<_>>();
        let order0 = ids_of(epoch_order(n, 7, 0));
        let order1 = ids_of(epoch_order(n, 7, 1));

        // First life: 5 leases in epoch order; 3 delivered, 2 of them trained; 2 still out.
        let handle = start(config.clone(), prompt_set(dir.path(), n as usize)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let mut leases = Vec::new();
        for _ in 0..5 {
            leases.push(lease(&mut c, &w, 1, 0).await.expect("lease"));
        }
        let got: Vec<String> = leases.iter().map(|l| l.prompts[0].prompt_id.clone()).collect();
        assert_eq!(got, order0[..5].to_vec(), "leases follow the seeded order");
        for l in &leases[..3] {
            ack_all(&mut c, &w, l, Some(0.5)).await;
        }
        assert_eq!(train(&mut c, 0, got[..2].to_vec(), 1).await, 2);
        publish(&mut c, 1).await;
        let run_id = state(&mut c).await.run_id;
        handle.shutdown().await.expect("shutdown");

        // A different seed or prompt set cannot resume this journal.
        let wrong = serve(CoordinatorConfig { seed: 8, ..config.clone() }, prompt_set(dir.path(), n as usize)).await;
        assert!(wrong.err().expect("seed mismatch").to_string().contains("seed"));

        // Second life: same run, in-flight leases expired, accounting intact.
        let handle = start(config.clone(), prompt_set(dir.path(), n as usize)).await;
        let mut c = client(&handle).await;
        let st = state(&mut c).await;
        assert_eq!((st.run_id.as_str(), st.incarnation, st.published_version), (run_id.as_str(), 1, 1));
        let e = &st.epoch_counts[0];
        assert_eq!((e.trained, e.delivered, e.leased, e.pending), (2, 1, 0, 9));
        let err = c
            .ack_lease(AckLeaseRequest { lease_id: leases[3].lease_id.clone(), worker_id: w.clone(), delivered: vec![] })
            .await
            .expect_err("lease from before the restart");
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("lease_id") && err.message().contains("restarted"), "{}", err.message());
        let old_worker = c
            .lease_prompts(LeasePromptsRequest { worker_id: w.clone(), max_prompts: 1, policy_version: 1 })
            .await
            .expect_err("workers register again");
        assert_eq!(old_worker.code(), Code::NotFound);
        // A group sampled under a lease of the first life may reach the learner after the
        // restart; the image's name lets this life find it before leasing it again.
        // The name must be a prompt's image, and its bytes must hash to the address asked for.
        let old_image = &leases[3].prompts[0].images[0];
        for name in ["", "run/journal.jsonl", leases[4].prompts[0].images[0].name.as_str()] {
            let request = GetImageRequest { sha256: old_image.sha256.clone(), name: name.to_string() };
            expect(c.get_image(request).await, Code::NotFound, "sha256");
        }
        let served = c
            .get_image(GetImageRequest::from(old_image))
            .await
            .expect("an image leased before the restart")
            .into_inner();
        assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&served.data)), old_image.sha256);

        let w = register(&mut c, "w-again").await;
        let mut rest = Vec::new();
        while let Some(l) = lease(&mut c, &w, 1, 1).await {
            if l.epoch != 0 {
                // First lease of epoch 1: keep it for later.
                rest.push(l);
                break;
            }
            rest.push(l);
        }
        let resumed: Vec<String> = rest.iter().filter(|l| l.epoch == 0).map(|l| l.prompts[0].prompt_id.clone()).collect();
        let expected: Vec<String> = order0.iter().filter(|id| !got[..3].contains(id)).cloned().collect();
        assert_eq!(resumed, expected, "the rest of epoch 0 in the same order, in-flight ones first");
        // Epoch 1 only opened once epoch 0 had nothing pending, in its own seeded order.
        assert_eq!(rest.last().expect("epoch 1 lease").prompts[0].prompt_id, order1[0]);
        for l in &rest {
            ack_all(&mut c, &w, l, None).await;
        }
        let mut epoch0: Vec<String> = resumed.clone();
        epoch0.push(got[2].clone());
        let report = c
            .report_consumed(ReportConsumedRequest {
                new_version: 2,
                trained: vec![EpochPrompts { epoch: 0, prompt_ids: epoch0 }],
                requeue: vec![],
            })
            .await
            .expect("report")
            .into_inner();
        assert_eq!((report.trained, report.duplicate), (10, 0), "nothing trained twice");
        // A retried report is idempotent.
        let again = c
            .report_consumed(ReportConsumedRequest {
                new_version: 2,
                trained: vec![EpochPrompts { epoch: 0, prompt_ids: got[..2].to_vec() }],
                requeue: vec![],
            })
            .await
            .expect("report")
            .into_inner();
        assert_eq!((again.trained, again.duplicate), (0, 2));
        let st = state(&mut c).await;
        assert_eq!(st.epoch_counts[0].trained, n);
        assert_eq!(st.epoch_counts[1].delivered, 1);
        handle.shutdown().await.expect("shutdown");

        // Third life: the journal replays to the same counts.
        let handle = start(config, prompt_set(dir.path(), n as usize)).await;
        let st = handle.run_state().expect("state");
        assert_eq!((st.incarnation, st.epoch_counts[0].trained, st.epoch_counts[1].delivered), (2, n, 1));
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

/// Asserts a refusal with the code and a message naming the field.
fn expect<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(e.message().contains(needle), "{:?} does not name {needle}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_error_statuses_and_the_server_keeps_serving() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { max_message_bytes: 256 * 1024, max_image_bytes: 1024, prompts_per_lease: 2, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 4)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let l = lease(&mut c, &w, 2, 0).await.expect("lease");
        let before = state(&mut c).await;

        expect(
            c.lease_prompts(LeasePromptsRequest { worker_id: "w9-9".into(), max_prompts: 1, policy_version: 0 }).await,
            Code::NotFound,
            "worker_id",
        );
        expect(
            c.lease_prompts(LeasePromptsRequest { worker_id: String::new(), max_prompts: 1, policy_version: 0 }).await,
            Code::InvalidArgument,
            "worker_id",
        );
        expect(
            c.lease_prompts(LeasePromptsRequest { worker_id: w.clone(), max_prompts: 1, policy_version: 99 }).await,
            Code::FailedPrecondition,
            "policy_version",
        );
        expect(
            c.ack_lease(AckLeaseRequest { lease_id: "0-999".into(), worker_id: w.clone(), delivered: vec![] }).await,
            Code::NotFound,
            "lease_id",
        );
        expect(
            c.ack_lease(AckLeaseRequest { lease_id: "not a lease".into(), worker_id: w.clone(), delivered: vec![] }).await,
            Code::InvalidArgument,
            "lease_id",
        );
        expect(
            c.ack_lease(AckLeaseRequest {
                lease_id: l.lease_id.clone(),
                worker_id: w.clone(),
                delivered: vec![DeliveredPrompt { prompt_id: "synthetic/train/nope".into(), pass_rate: None }],
            })
            .await,
            Code::InvalidArgument,
            "delivered[0].prompt_id",
        );
        expect(
            c.ack_lease(AckLeaseRequest {
                lease_id: l.lease_id.clone(),
                worker_id: w.clone(),
                delivered: vec![
                    DeliveredPrompt { prompt_id: l.prompts[0].prompt_id.clone(), pass_rate: Some(0.5) },
                    DeliveredPrompt { prompt_id: l.prompts[1].prompt_id.clone(), pass_rate: Some(f32::NAN) },
                ],
            })
            .await,
            Code::InvalidArgument,
            "delivered[1].pass_rate",
        );
        expect(
            c.report_consumed(ReportConsumedRequest {
                new_version: 1,
                trained: vec![EpochPrompts { epoch: 0, prompt_ids: vec!["ghost".into()] }],
                requeue: vec![],
            })
            .await,
            Code::NotFound,
            "trained[0].prompt_ids[0]",
        );
        expect(
            c.report_consumed(ReportConsumedRequest {
                new_version: 1,
                trained: vec![EpochPrompts { epoch: 5, prompt_ids: vec![] }],
                requeue: vec![],
            })
            .await,
            Code::InvalidArgument,
            "trained[0].epoch",
        );
        expect(
            c.publish_version(PublishVersionRequest { version: 1, sha256: "xyz".into(), format: "safetensors".into() }).await,
            Code::InvalidArgument,
            "sha256",
        );
        expect(c.get_image(GetImageRequest { sha256: "../../etc/passwd".into(), ..Default::default() }).await, Code::InvalidArgument, "sha256");
        expect(c.get_image(GetImageRequest { sha256: "0".repeat(64), ..Default::default() }).await, Code::NotFound, "sha256");
        expect(
            c.publish_nccl_id(PublishNcclIdRequest { unique_id: vec![1u8; 5].into(), world_size: 2, members: vec![] }).await,
            Code::InvalidArgument,
            "unique_id",
        );
        expect(c.get_nccl_id(GetNcclIdRequest { min_generation: 1 }).await, Code::NotFound, "min_generation");

        // Oversized: a client allowed to send 1 MiB against a server that takes 256 KiB.
        let big = ClientOptions { max_message_bytes: 4 << 20, ..ClientOptions::default() };
        let mut bc = big.coordinator(connect(&handle.endpoint(), &big).await.expect("connect"));
        let e = bc
            .register_worker(RegisterWorkerRequest { worker_name: "x".repeat(1 << 20), capabilities: None })
            .await
            .expect_err("oversized");
        assert!(e.message().contains("too large"), "{:?}: {}", e.code(), e.message());
        // A long name under the limit is refused by the field check instead.
        expect(
            bc.register_worker(RegisterWorkerRequest { worker_name: "x".repeat(4096), capabilities: None }).await,
            Code::InvalidArgument,
            "worker_name",
        );

        // Nothing changed, and the server still works for everyone.
        let after = state(&mut c).await;
        assert_eq!(after.epoch_counts, before.epoch_counts);
        assert_eq!(ack_all(&mut c, &w, &l, Some(1.0)).await, 2);
        let gen_ = c
            .publish_nccl_id(PublishNcclIdRequest { unique_id: vec![7u8; 128].into(), world_size: 2, members: vec!["learner".into(), w.clone()] })
            .await
            .expect("nccl id")
            .into_inner()
            .generation;
        let rv = c.get_nccl_id(GetNcclIdRequest { min_generation: gen_ }).await.expect("get nccl").into_inner();
        assert_eq!((rv.unique_id.len(), rv.world_size, rv.generation), (128, 2, 1));
        let text = handle.metrics_text().expect("metrics");
        assert!(text.contains("medrl_coordinator_rpc_errors_total{rpc=\"AckLease\",code=\"InvalidArgument\"} 3"), "{text}");
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_respond_and_health_drops_when_done() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig { prompts_per_lease: 2, ..fast_config() };
        let handle = start(config, prompt_set(dir.path(), 2)).await;
        let channel = connect(&handle.endpoint(), &ClientOptions::default()).await.expect("connect");

        let mut health = HealthClient::new(channel.clone());
        let check = |service: &str| HealthCheckRequest { service: service.into() };
        let status = health.check(check("medrl.v1.Coordinator")).await.expect("health").into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32);

        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.expect("reflection").into_inner();
        let first = responses.next().await.expect("one answer").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else { panic!("not a service list") };
        let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains("medrl.v1.Coordinator") && names.contains("grpc.health.v1.Health"), "{names:?}");

        // Run the two prompts to the end: health turns NOT_SERVING.
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let l = lease(&mut c, &w, 2, 0).await.expect("lease");
        ack_all(&mut c, &w, &l, Some(0.25)).await;
        train(&mut c, 0, l.prompts.iter().map(|p| p.prompt_id.clone()).collect(), 1).await;
        let (reason, done) = wait_reason(&mut c, &w, 1).await;
        assert!(done && reason == medrl_proto::WaitReason::Done as i32);
        tokio::time::timeout(Duration::from_secs(5), handle.wait_done()).await.expect("done observed");
        let mut status = 0;
        for _ in 0..100 {
            status = health.check(check("medrl.v1.Coordinator")).await.expect("health").into_inner().status;
            if status == ServingStatus::NotServing as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, ServingStatus::NotServing as i32);

        let page = http_get(handle.metrics_addr().expect("metrics on"), "/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        for needle in [
            "medrl_coordinator_leases_granted_total 1",
            "medrl_coordinator_lease_latency_seconds_bucket",
            "medrl_coordinator_prompts{state=\"trained\"} 2",
            "medrl_coordinator_policy_version 0",
            "medrl_coordinator_learner_version 1",
            "medrl_coordinator_workers_alive 1",
            "medrl_coordinator_support_prompts{modality=\"ct\",class=\"partial\"} 1",
            "medrl_coordinator_modality_pass_rate{modality=\"mri\"} 0.25",
            "medrl_coordinator_delivered_staleness_versions_count 2",
        ] {
            assert!(page.contains(needle), "missing {needle} in\n{page}");
        }
        // What `medrl coordinator` runs: it returns by itself once the run is done.
        tokio::time::timeout(Duration::from_secs(5), handle.run_until_stopped(Duration::from_millis(50)))
            .await
            .expect("stops after the run is done")
            .expect("clean shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_aware_scheduling_skips_zero_support_and_saturated_prompts() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig {
            prompts_per_lease: 1,
            prompts_per_step: 100,
            epochs: 3,
            support: SupportConfig { enabled: true, recheck_every_epochs: 2, ..SupportConfig::default() },
            ..fast_config()
        };
        let handle = start(config, prompt_set(dir.path(), 4)).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        // Pass rates by prompt number: 0 all wrong, 1 all right, 2 and 3 mixed.
        let rate = |id: &str| match id.rsplit('/').next() {
            Some("0") => 0.0,
            Some("1") => 1.0,
            _ => 0.5,
        };
        let mut per_epoch = vec![Vec::new(); 3];
        let mut version = 0;
        while let Some(l) = lease(&mut c, &w, 1, version).await {
            let id = l.prompts[0].prompt_id.clone();
            let delivered = vec![DeliveredPrompt { prompt_id: id.clone(), pass_rate: Some(rate(&id)) }];
            c.ack_lease(AckLeaseRequest { lease_id: l.lease_id.clone(), worker_id: w.clone(), delivered }).await.expect("ack");
            version += 1;
            train(&mut c, l.epoch, vec![id.clone()], version).await;
            publish(&mut c, version).await;
            per_epoch[l.epoch as usize].push(id);
        }
        let st = state(&mut c).await;
        assert!(st.done);
        let sorted = |v: &Vec<String>| {
            let mut v = v.clone();
            v.sort();
            v
        };
        assert_eq!(per_epoch[0].len(), 4, "first epoch tries everything");
        assert_eq!(sorted(&per_epoch[1]), vec!["synthetic/train/2".to_string(), "synthetic/train/3".to_string()]);
        assert_eq!(per_epoch[2].len(), 4, "re-check after two epochs");
        assert_eq!((st.epoch_counts[1].skipped, st.epoch_counts[1].trained), (2, 2));
        let text = handle.metrics_text().expect("metrics");
        assert!(text.contains("medrl_coordinator_prompts_skipped_total{reason=\"zero_support\"} 1"), "{text}");
        assert!(text.contains("medrl_coordinator_prompts_skipped_total{reason=\"saturated\"} 1"), "{text}");
        assert!(text.contains("medrl_coordinator_support_prompts{modality=\"ct\",class=\"zero\"} 1"), "{text}");
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_images_and_poison_prompts_fail_loudly_without_stopping_the_run() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let prompts = prompt_set(dir.path(), 3);
        // Prompt 1's image disappears; prompt 2 will never be delivered (it crashes workers).
        std::fs::remove_file(dir.path().join("img/1.png")).expect("remove");
        let config = CoordinatorConfig { prompts_per_lease: 1, prompts_per_step: 100, max_attempts: 2, ..fast_config() };
        let handle = start(config, prompts).await;
        let mut c = client(&handle).await;
        let w = register(&mut c, "w").await;
        let mut trained = Vec::new();
        let mut version = 0;
        for _ in 0..20 {
            let Some(l) = lease(&mut c, &w, 1, version).await else {
                if state(&mut c).await.done {
                    break;
                }
                continue;
            };
            let id = l.prompts[0].prompt_id.clone();
            assert_ne!(id, "synthetic/train/1", "a prompt whose image cannot be read is never leased");
            if id == "synthetic/train/2" {
                // The worker gives up on it: acked with nothing delivered, so it goes back.
                c.ack_lease(AckLeaseRequest { lease_id: l.lease_id.clone(), worker_id: w.clone(), delivered: vec![] })
                    .await
                    .expect("ack");
                continue;
            }
            ack_all(&mut c, &w, &l, None).await;
            version += 1;
            train(&mut c, 0, vec![id.clone()], version).await;
            publish(&mut c, version).await;
            trained.push(id);
        }
        let st = state(&mut c).await;
        assert!(st.done, "{st:?}");
        assert_eq!(trained, vec!["synthetic/train/0".to_string()]);
        assert_eq!((st.epoch_counts[0].trained, st.epoch_counts[0].failed), (1, 2));
        handle.shutdown().await.expect("shutdown");
    })
    .await;
}
