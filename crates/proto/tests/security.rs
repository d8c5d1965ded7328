//! Token and TLS on a real server over loopback, with certificates made at test time: strangers
//! are refused (no token, wrong token, no client certificate, a certificate from another CA, a
//! plaintext client, a client trusting another CA), the right client gets through on the weight
//! stream, health stays reachable for probes, and the server keeps serving after every refusal.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use medrl_proto::v1::weights_server::Weights;
use medrl_proto::v1::{FetchWeightsRequest, GetWeightInfoRequest, WeightChunk, WeightInfo};
use medrl_proto::{ClientOptions, SecuritySection, TlsSettings, connect, service_names};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TOKEN: &str = "s3cret-token-for-tests";

/// Every test finishes within this time or fails.
async fn bounded<F: std::future::Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(60), body).await.expect("test exceeded its time bound");
}

/// A two-chunk weight blob of version 3: enough to exercise unary and server-streaming calls.
struct FakeWeights;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Weights for FakeWeights {
    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(&self, _request: Request<FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        let chunk = |offset: u64, data: &'static [u8]| WeightChunk {
            version: 3,
            offset,
            data: bytes::Bytes::from_static(data),
            total_size: 8,
            sha256: "0".repeat(64),
            format: "safetensors".into(),
        };
        let chunks = vec![Ok(chunk(0, b"abcd")), Ok(chunk(4, b"efgh"))];
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn get_weight_info(&self, _request: Request<GetWeightInfoRequest>) -> Result<Response<WeightInfo>, Status> {
        Ok(Response::new(WeightInfo { version: 3, total_size: 8, sha256: "0".repeat(64), format: "safetensors".into() }))
    }
}

/// A CA able to sign leaf certificates.
fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca cert")
}

/// A leaf for `localhost` / 127.0.0.1, usable as server and client (one file per pod, as in
/// docs/security.md); returns (cert PEM, key PEM).
fn make_leaf(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, &**ca).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

/// PEM files of a run's CA, server and client, plus a rogue CA and a client it signed.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_ca: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
    token_file: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = make_ca("medrl test CA");
    let rogue = make_ca("somebody else's CA");
    let (server_cert, server_key) = make_leaf(&ca, "coordinator");
    let (client_cert, client_key) = make_leaf(&ca, "worker");
    let (rogue_cert, rogue_key) = make_leaf(&rogue, "intruder");
    let d = dir.path();
    Pki {
        ca: write(d, "ca.pem", &ca.pem()),
        server_cert: write(d, "server.pem", &server_cert),
        server_key: write(d, "server.key", &server_key),
        client_cert: write(d, "client.pem", &client_cert),
        client_key: write(d, "client.key", &client_key),
        rogue_ca: write(d, "rogue-ca.pem", &rogue.pem()),
        rogue_cert: write(d, "rogue.pem", &rogue_cert),
        rogue_key: write(d, "rogue.key", &rogue_key),
        token_file: write(d, "token", &format!("{TOKEN}\n")),
        _dir: dir,
    }
}

fn no_env(_: &str) -> Option<OsString> {
    None
}

/// A running server and the means to stop it.
struct Running {
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), medrl_proto::ProtoError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("server task").expect("server ran cleanly");
    }
}

async fn start(security: &SecuritySection) -> Running {
    let resolved = security.resolve_with(no_env).expect("security resolves");
    let options = ServerOptions::default().with_security(&resolved);
    let server = GrpcServer::new(&options).expect("server builds");
    server.health().set_service_status(service_names::WEIGHTS, tonic_health::ServingStatus::Serving).await;
    let server = server.with_weights(FakeWeights);
    let (listener, addr) = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    Running { endpoint: format!("http://{addr}"), stop: Some(stop), task }
}

/// Client options for `security` with short timeouts (a refused handshake must fail fast).
fn client_options(security: &SecuritySection) -> ClientOptions {
    let resolved = security.resolve_with(no_env).expect("client security resolves");
    let base = ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(5)),
        ..ClientOptions::default()
    };
    base.with_security(&resolved).expect("client options")
}

/// Calls GetWeightInfo and streams FetchWeights; the first error status, or the version.
async fn call_weights(endpoint: &str, options: &ClientOptions) -> Result<u64, Status> {
    let channel = connect(endpoint, options).await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = options.weights(channel);
    let info = client.get_weight_info(GetWeightInfoRequest {}).await?.into_inner();
    let mut stream = client.fetch_weights(FetchWeightsRequest { min_version: 1 }).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(bytes, b"abcdefgh", "the whole blob arrives");
    Ok(info.version)
}

/// Asks the health service about the Weights service, over a channel built from `options`.
async fn health(endpoint: &str, options: &ClientOptions) -> Result<i32, Status> {
    let channel = connect(endpoint, options).await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = HealthClient::new(channel);
    let response = client.check(HealthCheckRequest { service: service_names::WEIGHTS.into() }).await?;
    Ok(response.into_inner().status)
}

/// Client TLS settings trusting `ca`, presenting `identity` (cert, key) when given.
fn tls_client(ca: &Path, identity: Option<(&Path, &Path)>) -> TlsSettings {
    TlsSettings {
        ca: Some(ca.to_path_buf()),
        cert: identity.map(|(c, _)| c.to_path_buf()),
        key: identity.map(|(_, k)| k.to_path_buf()),
        domain: Some("localhost".into()),
        ..TlsSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_token_refuse_strangers_and_admit_the_run() {
    bounded(async {
        let pki = make_pki();
        let server_security = SecuritySection {
            token_file: Some(pki.token_file.clone()),
            tls: Some(TlsSettings {
                cert: Some(pki.server_cert.clone()),
                key: Some(pki.server_key.clone()),
                client_ca: Some(pki.ca.clone()),
                ..TlsSettings::default()
            }),
        };
        let server = start(&server_security).await;
        let ep = server.endpoint.clone();
        let good_tls = tls_client(&pki.ca, Some((&pki.client_cert, &pki.client_key)));
        let good = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: Some(good_tls.clone()) });

        // The run's own client: certificate from the run's CA, right token.
        assert_eq!(call_weights(&ep, &good).await.expect("good client admitted"), 3);

        // Right certificate, no token.
        let no_token = client_options(&SecuritySection { token_file: None, tls: Some(good_tls.clone()) });
        let err = call_weights(&ep, &no_token).await.expect_err("no token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("authorization"), "{}", err.message());

        // Right certificate, wrong token.
        let mut wrong = no_token.clone();
        wrong.auth = medrl_proto::ClientAuth::with_token("s3cret-token-for-tests-not").expect("ascii");
        let err = call_weights(&ep, &wrong).await.expect_err("wrong token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

        // Right token, no client certificate: the handshake completes (for probes), the medrl
        // service refuses, and health answers on the very same kind of channel.
        let certless_tls = tls_client(&pki.ca, None);
        let certless = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: Some(certless_tls) });
        let err = call_weights(&ep, &certless).await.expect_err("no client certificate");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("client certificate"), "{}", err.message());
        assert_eq!(health(&ep, &certless).await.expect("health without cert or token"), ServingStatus::Serving as i32);

        // Right token, certificate from another CA: refused in the TLS handshake itself.
        let rogue_tls = tls_client(&pki.ca, Some((&pki.rogue_cert, &pki.rogue_key)));
        let rogue = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: Some(rogue_tls) });
        let err = call_weights(&ep, &rogue).await.expect_err("certificate from another CA");
        // The call is refused; how the client learns it (the server's UnknownCA alert, a broken
        // pipe, a cancelled stream) depends on which side closes first, so only refusal is checked.
        assert_ne!(err.code(), Code::Ok, "{err:?}");
        let err = health(&ep, &rogue).await.expect_err("a bad certificate reaches nothing, not even health");
        assert_ne!(err.code(), Code::Ok);

        // A client that trusts another CA does not accept the server (nothing is sent to it).
        let distrustful_tls = tls_client(&pki.rogue_ca, Some((&pki.client_cert, &pki.client_key)));
        let distrustful = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: Some(distrustful_tls) });
        assert!(call_weights(&ep, &distrustful).await.is_err(), "server certificate not trusted");

        // Plaintext against the TLS listener.
        let mut plain = ClientOptions { request_timeout: Some(Duration::from_secs(5)), ..ClientOptions::default() };
        plain.auth = medrl_proto::ClientAuth::with_token(TOKEN).expect("ascii");
        assert!(call_weights(&ep, &plain).await.is_err(), "plaintext refused");

        // After every refusal the server still serves the run.
        assert_eq!(call_weights(&ep, &good).await.expect("still serving"), 3);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_tls_needs_only_the_token() {
    bounded(async {
        let pki = make_pki();
        let server = start(&SecuritySection {
            token_file: Some(pki.token_file.clone()),
            tls: Some(TlsSettings { cert: Some(pki.server_cert.clone()), key: Some(pki.server_key.clone()), ..TlsSettings::default() }),
        })
        .await;
        let tls = TlsSettings { ca: Some(pki.ca.clone()), ..TlsSettings::default() };
        // No `domain`: the certificate's 127.0.0.1 address is verified against the endpoint.
        let good = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: Some(tls.clone()) });
        assert_eq!(call_weights(&server.endpoint, &good).await.expect("token over TLS"), 3);
        let anonymous = client_options(&SecuritySection { token_file: None, tls: Some(tls) });
        assert_eq!(call_weights(&server.endpoint, &anonymous).await.expect_err("no token").code(), Code::Unauthenticated);
        assert_eq!(health(&server.endpoint, &anonymous).await.expect("health"), ServingStatus::Serving as i32);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_tls_refuses_strangers_and_leaves_health_open() {
    bounded(async {
        let pki = make_pki();
        let server = start(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: None }).await;
        let ep = server.endpoint.clone();
        let anonymous = client_options(&SecuritySection::default());
        let err = call_weights(&ep, &anonymous).await.expect_err("no token");
        assert_eq!(err.code(), Code::Unauthenticated);
        let mut wrong = anonymous.clone();
        wrong.auth = medrl_proto::ClientAuth::with_token("guess").expect("ascii");
        assert_eq!(call_weights(&ep, &wrong).await.expect_err("wrong token").code(), Code::Unauthenticated);
        assert_eq!(health(&ep, &anonymous).await.expect("health is open"), ServingStatus::Serving as i32);
        let good = client_options(&SecuritySection { token_file: Some(pki.token_file.clone()), tls: None });
        assert_eq!(call_weights(&ep, &good).await.expect("token admitted"), 3);
        // A client configured for TLS refuses an https endpoint it cannot verify rather than
        // falling back to plaintext; one without TLS refuses an https endpoint outright.
        let err = connect(&ep.replace("http://", "https://"), &anonymous).await.expect_err("https without TLS settings");
        assert!(err.to_string().contains("security.tls"), "{err}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_tls_fails_at_start_naming_the_file() {
    bounded(async {
        let pki = make_pki();
        // Key and certificate swapped: each file is checked for the kind it must hold.
        let swapped = SecuritySection {
            token_file: None,
            tls: Some(TlsSettings { cert: Some(pki.server_key.clone()), key: Some(pki.server_cert.clone()), ..TlsSettings::default() }),
        };
        let options = ServerOptions::default().with_security(&swapped.resolve_with(no_env).expect("resolves"));
        let err = GrpcServer::new(&options).err().expect("swapped files refused").to_string();
        assert!(err.contains("security.tls.cert") && err.contains("server.key"), "{err}");
        let missing = SecuritySection {
            token_file: None,
            tls: Some(TlsSettings {
                cert: Some(pki.server_cert.clone()),
                key: Some(pki.server_key.clone()),
                client_ca: Some(pki.ca.with_file_name("absent-ca.pem")),
                ..TlsSettings::default()
            }),
        };
        let options = ServerOptions::default().with_security(&missing.resolve_with(no_env).expect("resolves"));
        let err = GrpcServer::new(&options).err().expect("missing CA refused").to_string();
        assert!(err.contains("security.tls.client_ca") && err.contains("absent-ca.pem"), "{err}");
        // Mutual TLS asked for with TLS off is refused instead of serving a server nobody can use.
        let options = ServerOptions { auth: medrl_proto::AuthInterceptor::open().require_client_cert(true), ..ServerOptions::default() };
        assert!(GrpcServer::new(&options).is_err());
    })
    .await;
}
