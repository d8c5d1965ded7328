//! The three roles as real processes with the run config's `cluster.token_file` and `cluster.tls`
//! (mutual TLS, certificates made at test time): the run completes over TLS, every prompt
//! trained exactly once; meanwhile the coordinator and the learner (its weight stream included)
//! refuse a client without a certificate, one without the token and a plaintext one, and no
//! role's log shows the token.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Cluster, Spec, finish};
use medrl_proto::v1::{GetRunStateRequest, GetWeightInfoRequest};
use medrl_proto::{ClientOptions, SecuritySection, TlsSettings, connect};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use tonic::Code;

const TOKEN: &str = "medrl-secure-cluster-test-token-7d1f";

/// The run's PEM files: a CA and one leaf (server and client identity of every role).
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    token: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "medrl test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("self-sign CA");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
    leaf.distinguished_name.push(DnType::CommonName, "medrl");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("leaf key");
    let cert = leaf.signed_by(&key, &*ca).expect("sign leaf");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        cert: write("tls.pem", &cert.pem()),
        key: write("tls.key", &key.serialize_pem()),
        token: write("token", &format!("{TOKEN}\n")),
    }
}

/// Client options trusting the run's CA, with the token and a client certificate when asked.
fn client(pki: &Pki, token: bool, certificate: bool) -> ClientOptions {
    let tls = TlsSettings {
        ca: Some(pki.ca.clone()),
        cert: certificate.then(|| pki.cert.clone()),
        key: certificate.then(|| pki.key.clone()),
        ..TlsSettings::default()
    };
    let section = SecuritySection { token_file: token.then(|| pki.token.clone()), tls: Some(tls) };
    let security = section.resolve_with(|_| None).expect("client security");
    let base = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Some(Duration::from_secs(5)), ..ClientOptions::default() };
    base.with_security(&security).expect("client options")
}

/// The coordinator's GetRunState over `options`: its status code.
async fn coordinator_call(endpoint: &str, options: &ClientOptions) -> Code {
    match connect(endpoint, options).await {
        Ok(channel) => match options.coordinator(channel).get_run_state(GetRunStateRequest {}).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
        Err(_) => Code::Unavailable,
    }
}

/// The learner's GetWeightInfo (the weight stream's service) over `options`: its status code.
async fn weights_call(endpoint: &str, options: &ClientOptions) -> Code {
    match connect(endpoint, options).await {
        Ok(channel) => match options.weights(channel).get_weight_info(GetWeightInfoRequest {}).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
        Err(_) => Code::Unavailable,
    }
}

/// Waits until the learner serves the run's own client (it starts after the coordinator).
async fn wait_learner(endpoint: &str, options: &ClientOptions) {
    let start = std::time::Instant::now();
    while weights_call(endpoint, options).await != Code::Ok {
        assert!(start.elapsed() < common::LIMIT, "the learner never served over TLS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_mutual_tls_refuses_strangers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(tmp.path());
    let spec = Spec {
        // A short run: the point is the transport, the fault tests cover the accounting.
        prompts: 6,
        cluster_extra: format!(
            "token_file: {token}, tls: {{cert: {cert}, key: {key}, ca: {ca}, client_ca: {ca}}}",
            token = pki.token.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
            ca = pki.ca.display(),
        ),
        ..Spec::default()
    };
    let c = Cluster::with(tmp.path(), spec);
    let coordinator = c.spawn("coordinator", "coordinator");
    c.wait_for_port();
    let learner = c.spawn("learner", "learner");
    let coordinator_ep = format!("http://127.0.0.1:{}", c.coordinator_port);
    let learner_ep = format!("http://127.0.0.1:{}", c.learner_port);
    let good = client(&pki, true, true);
    wait_learner(&learner_ep, &good).await;

    // Strangers are refused by both servers while the run goes on.
    for (what, options) in [("no client certificate", client(&pki, true, false)), ("no token", client(&pki, false, true))] {
        assert_eq!(coordinator_call(&coordinator_ep, &options).await, Code::Unauthenticated, "coordinator, {what}");
        assert_eq!(weights_call(&learner_ep, &options).await, Code::Unauthenticated, "weights, {what}");
    }
    let mut plaintext = ClientOptions { request_timeout: Some(Duration::from_secs(5)), ..ClientOptions::default() };
    plaintext.auth = medrl_proto::ClientAuth::with_token(TOKEN).expect("ascii token");
    assert_ne!(coordinator_call(&coordinator_ep, &plaintext).await, Code::Ok, "a plaintext client reaches the coordinator");
    assert_ne!(weights_call(&learner_ep, &plaintext).await, Code::Ok, "a plaintext client reaches the weights");
    assert_eq!(coordinator_call(&coordinator_ep, &good).await, Code::Ok, "the run's own client");

    let w1 = c.spawn("worker", "worker-a");
    let w2 = c.spawn("worker", "worker-b");
    tokio::task::spawn_blocking(move || {
        finish(&c, vec![(learner, "learner"), (w1, "worker-a"), (w2, "worker-b"), (coordinator, "coordinator")]);
        for name in ["coordinator", "learner"] {
            let log = c.log(name);
            assert!(log.contains("tls=true mutual_tls=true token=true"), "{name} did not serve with mutual TLS and the token: {log}");
        }
        for name in ["coordinator", "learner", "worker-a", "worker-b"] {
            assert!(!c.log(name).contains(TOKEN), "{name} logged the token");
        }
    })
    .await
    .expect("the run completes");
}

#[test]
fn a_bad_tls_file_stops_each_role_at_start_naming_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(tmp.path());
    let spec = Spec {
        cluster_extra: format!("tls: {{cert: {cert}, key: {key}, ca: {ca}}}", cert = pki.cert.display(), key = pki.key.display(), ca = pki.ca.display()),
        ..Spec::default()
    };
    let c = Cluster::with(tmp.path(), spec);
    let missing = tmp.path().join("absent-ca.pem");
    // The coordinator serves: its certificate is checked. The others dial: the CA is checked.
    let cases = [
        ("coordinator", format!("cluster.tls.cert={}", pki.key.display()), pki.key.display().to_string()),
        ("learner", format!("cluster.tls.ca={}", missing.display()), missing.display().to_string()),
        ("worker", format!("cluster.tls.ca={}", missing.display()), missing.display().to_string()),
    ];
    for (role, set, path) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_medrl"))
            .args([role, "--config", c.config.to_str().expect("utf-8"), "--set", &set])
            .env("RUST_LOG", "warn")
            .output()
            .expect("medrl runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{role} with {set}: {err}");
        assert!(err.contains("cluster.tls") && err.contains(&path), "{role} with {set} does not name the setting and file: {err}");
    }
}
