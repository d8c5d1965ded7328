//! Secrets and TLS for every medrl gRPC server and client: the `security:` section of a run
//! config, the shared token from a file or the environment, and the PEM files of TLS.
//!
//! What is guaranteed (docs/security.md has the operator's view):
//! - The token is never printed: [`Token`]'s `Debug` is redacted, and every error names the
//!   file, variable or field it came from, never the value.
//! - Every PEM file is parsed here, so a wrong path or a file of the wrong kind is an error that
//!   names the file and the setting, before any socket is opened.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::ProtoError;

/// Environment variable naming a file that holds the shared token.
pub const TOKEN_FILE_ENV: &str = "MEDRL_TOKEN_FILE";
/// Environment variable holding the shared token itself (a file is preferred: environments leak
/// into `/proc/<pid>/environ`, crash reports and `kubectl describe`).
pub const TOKEN_ENV: &str = "MEDRL_TOKEN";

/// A token file larger than this is refused: a token is a few dozen bytes, and a bigger file is
/// almost certainly the wrong path (a checkpoint, a log), which must not be read into memory.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A PEM file larger than this is refused for the same reason (a long chain is a few KiB).
const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// The `security:` section of a run config. Every field is optional; nothing set means a
/// plaintext, unauthenticated run (fine on loopback, documented as unsafe anywhere else).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// File holding the shared token (surrounding whitespace ignored). Takes precedence over
    /// `MEDRL_TOKEN_FILE`, which takes precedence over `MEDRL_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// TLS on every gRPC endpoint; `null` (default) for plaintext.
    pub tls: Option<TlsSettings>,
}

/// Paths of the PEM files of TLS. Servers use `cert`, `key` and `client_ca`; clients use `ca`,
/// `domain` and (for mutual TLS) `cert` and `key`, so one section serves every role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Certificate chain of this process (server identity; client identity for mutual TLS).
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Servers: CA that signs client certificates; set, it turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Clients: CA that signs the servers' certificates (required to connect over TLS).
    pub ca: Option<PathBuf>,
    /// Clients: name to verify in the server certificate, when it differs from the endpoint's
    /// host (e.g. connecting by IP to a certificate issued for a service name).
    pub domain: Option<String>,
}

/// The shared token. Cloning is cheap; `Debug` never shows the value.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// Checks a token read from `source` (a file path or variable name, used in errors only):
    /// surrounding whitespace is dropped; what remains must be non-empty visible ASCII, because
    /// it travels in an HTTP/2 header.
    pub fn new(value: &str, source: &str) -> Result<Token, ProtoError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(ProtoError::Security { setting: source.to_string(), problem: "the token is empty".into() });
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            // Say what is wrong without echoing any of it.
            return Err(ProtoError::Security {
                setting: source.to_string(),
                problem: "the token must be printable ASCII without spaces".into(),
            });
        }
        Ok(Token(value.into()))
    }

    /// The secret itself, for the auth hooks only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A [`SecuritySection`] with its token read: what servers and clients are built from.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The shared token, when one is configured.
    pub token: Option<Token>,
    /// Where the token came from (a path or a variable name), for logs.
    pub token_source: Option<String>,
    /// TLS files, when TLS is on.
    pub tls: Option<TlsSettings>,
}

impl SecuritySection {
    /// Reads the token from the section's file or the process environment.
    pub fn resolve(&self) -> Result<Security, ProtoError> {
        self.resolve_with(|name| std::env::var_os(name))
    }

    /// Like [`resolve`](Self::resolve) with an explicit environment (tests; editing the process
    /// environment is unsafe in edition 2024).
    pub fn resolve_with(&self, env: impl Fn(&str) -> Option<OsString>) -> Result<Security, ProtoError> {
        let from_file = |path: &Path, setting: &str| -> Result<(Token, String), ProtoError> {
            let text = read_small(path, MAX_TOKEN_FILE_BYTES, setting)?;
            let text = String::from_utf8(text).map_err(|_| ProtoError::Security {
                setting: format!("{setting} ({})", path.display()),
                problem: "the token file is not UTF-8 text".into(),
            })?;
            let source = format!("{setting} ({})", path.display());
            Ok((Token::new(&text, &source)?, path.display().to_string()))
        };
        let found = if let Some(path) = &self.token_file {
            Some(from_file(path, "security.token_file")?)
        } else if let Some(path) = env(TOKEN_FILE_ENV).filter(|p| !p.is_empty()) {
            Some(from_file(Path::new(&path), TOKEN_FILE_ENV)?)
        } else if let Some(value) = env(TOKEN_ENV).filter(|v| !v.is_empty()) {
            let value = value.into_string().map_err(|_| ProtoError::Security {
                setting: TOKEN_ENV.into(),
                problem: "the token is not valid Unicode".into(),
            })?;
            Some((Token::new(&value, TOKEN_ENV)?, TOKEN_ENV.to_string()))
        } else {
            None
        };
        if let Some(tls) = &self.tls {
            tls.check_pairs()?;
        }
        let (token, token_source) = match found {
            Some((token, source)) => (Some(token), Some(source)),
            None => (None, None),
        };
        Ok(Security { token, token_source, tls: self.tls.clone() })
    }
}

/// Reads a file refusing anything over `max` bytes; errors name the setting and the path.
fn read_small(path: &Path, max: u64, setting: &str) -> Result<Vec<u8>, ProtoError> {
    let what = || format!("{setting} ({})", path.display());
    let meta = std::fs::metadata(path).map_err(|cause| ProtoError::Secret { what: what(), cause })?;
    if !meta.is_file() {
        return Err(ProtoError::Security { setting: what(), problem: "not a regular file".into() });
    }
    if meta.len() > max {
        return Err(ProtoError::Security { setting: what(), problem: format!("{} bytes, at most {max} expected", meta.len()) });
    }
    std::fs::read(path).map_err(|cause| ProtoError::Secret { what: what(), cause })
}

/// Reads a PEM file and checks that it holds at least one certificate.
fn read_certs(path: &Path, setting: &str) -> Result<Vec<u8>, ProtoError> {
    let pem = read_small(path, MAX_PEM_FILE_BYTES, setting)?;
    let bad = |problem: String| ProtoError::Security { setting: format!("{setting} ({})", path.display()), problem };
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(format!("not a valid PEM certificate file: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("no `BEGIN CERTIFICATE` block found".into()));
    }
    Ok(pem)
}

/// Reads a PEM file and checks that it holds a private key.
fn read_key(path: &Path, setting: &str) -> Result<Vec<u8>, ProtoError> {
    let pem = read_small(path, MAX_PEM_FILE_BYTES, setting)?;
    // The parse error is about the file's structure, never its contents, so it may be shown.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ProtoError::Security {
        setting: format!("{setting} ({})", path.display()),
        problem: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
    })?;
    Ok(pem)
}

fn missing(setting: &str, why: &str) -> ProtoError {
    ProtoError::Security { setting: setting.into(), problem: format!("not set; {why}") }
}

impl TlsSettings {
    /// `cert` and `key` come together or not at all.
    fn check_pairs(&self) -> Result<(), ProtoError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(missing("security.tls.key", "security.tls.cert is set and needs its private key")),
            (None, Some(_)) => Err(missing("security.tls.cert", "security.tls.key is set and needs its certificate")),
            _ => Ok(()),
        }
    }

    /// True when servers built from these settings require client certificates.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The server side: identity from `cert` and `key`, and with `client_ca` a verifier of client
    /// certificates. Clients without a certificate still complete the handshake (so health
    /// probes work); the medrl services then refuse them (see `AuthInterceptor`). A client
    /// certificate that does not chain to `client_ca` fails the handshake itself.
    pub fn server_config(&self, handshake_timeout: std::time::Duration) -> Result<ServerTlsConfig, ProtoError> {
        self.check_pairs()?;
        let need = "a TLS server needs its certificate and key";
        let cert_path = self.cert.as_deref().ok_or_else(|| missing("security.tls.cert", need))?;
        let key_path = self.key.as_deref().ok_or_else(|| missing("security.tls.key", need))?;
        let identity = Identity::from_pem(read_certs(cert_path, "security.tls.cert")?, read_key(key_path, "security.tls.key")?);
        let mut config = ServerTlsConfig::new().identity(identity).timeout(handshake_timeout);
        if let Some(ca) = &self.client_ca {
            let ca = Certificate::from_pem(read_certs(ca, "security.tls.client_ca")?);
            config = config.client_ca_root(ca).client_auth_optional(true);
        }
        Ok(config)
    }

    /// The client side: trust `ca`, verify `domain` (else the endpoint's host), and present
    /// `cert` and `key` when set (mutual TLS).
    pub fn client_config(&self) -> Result<ClientTlsConfig, ProtoError> {
        self.check_pairs()?;
        let ca = self.ca.as_deref().ok_or_else(|| missing("security.tls.ca", "a TLS client needs the CA of the servers it connects to"))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_certs(ca, "security.tls.ca")?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(read_certs(cert, "security.tls.cert")?, read_key(key, "security.tls.key")?));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn token_precedence_file_then_file_env_then_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, "from-section\n").expect("write");
        std::fs::write(&b, "  from-env-file  ").expect("write");
        let b_str = b.display().to_string();
        let env = env_of(&[(TOKEN_FILE_ENV, &b_str), (TOKEN_ENV, "from-env")]);

        let section = SecuritySection { token_file: Some(a.clone()), tls: None };
        let s = section.resolve_with(&env).expect("resolves");
        assert_eq!(s.token.as_ref().map(Token::expose), Some("from-section"));
        let s = SecuritySection::default().resolve_with(&env).expect("resolves");
        assert_eq!(s.token.as_ref().map(Token::expose), Some("from-env-file"));
        let s = SecuritySection::default().resolve_with(env_of(&[(TOKEN_ENV, "from-env")])).expect("resolves");
        assert_eq!(s.token.as_ref().map(Token::expose), Some("from-env"));
        assert_eq!(s.token_source.as_deref(), Some(TOKEN_ENV));
        let s = SecuritySection::default().resolve_with(env_of(&[])).expect("resolves");
        assert!(s.token.is_none());
    }

    #[test]
    fn secrets_never_reach_debug_or_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "hunter2-very-secret").expect("write");
        let section = SecuritySection { token_file: Some(path.clone()), tls: Some(TlsSettings::default()) };
        let security = section.resolve_with(env_of(&[(TOKEN_ENV, "other-secret")])).expect("resolves");
        for text in [format!("{security:?}"), format!("{section:?}"), format!("{:?}", security.token)] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("other-secret"), "{text}");
        }
        let server = crate::ServerOptions::default().with_security(&security);
        let client = crate::ClientOptions::default().with_security(&security).expect("ascii token");
        assert!(!format!("{server:?}{client:?}").contains("hunter2"));

        // A token with a space: the error names the file, not the value.
        std::fs::write(&path, "hunter2 with space").expect("write");
        let err = section.resolve_with(env_of(&[])).expect_err("space").to_string();
        assert!(err.contains("security.token_file") && err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = SecuritySection::default().resolve_with(env_of(&[(TOKEN_ENV, "bad\u{7}token")])).expect_err("control char");
        assert!(err.to_string().contains(TOKEN_ENV) && !err.to_string().contains("bad"), "{err}");
        std::fs::write(&path, "\n\n").expect("write");
        assert!(section.resolve_with(env_of(&[])).expect_err("empty").to_string().contains("empty"));
    }

    #[test]
    fn missing_and_wrong_files_name_the_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("nope");
        let err = SecuritySection { token_file: Some(gone.clone()), tls: None }.resolve_with(env_of(&[])).expect_err("missing");
        assert!(err.to_string().contains("security.token_file") && err.to_string().contains("nope"), "{err}");
        let err = SecuritySection::default().resolve_with(env_of(&[(TOKEN_FILE_ENV, "/definitely/not/here")])).expect_err("missing");
        assert!(err.to_string().contains(TOKEN_FILE_ENV), "{err}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 10_000]).expect("write");
        let err = SecuritySection { token_file: Some(big), tls: None }.resolve_with(env_of(&[])).expect_err("too big");
        assert!(err.to_string().contains("at most 4096"), "{err}");

        let not_pem = dir.path().join("cert.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let tls = TlsSettings { cert: Some(not_pem.clone()), key: Some(not_pem.clone()), ..TlsSettings::default() };
        let err = tls.server_config(std::time::Duration::from_secs(1)).expect_err("not pem").to_string();
        assert!(err.contains("security.tls.cert") && err.contains("cert.pem"), "{err}");
        let err = TlsSettings { cert: Some(not_pem), ..TlsSettings::default() }.check_pairs().expect_err("pair");
        assert!(err.to_string().contains("security.tls.key"), "{err}");
        let err = TlsSettings::default().client_config().expect_err("no ca").to_string();
        assert!(err.contains("security.tls.ca"), "{err}");
    }

    #[test]
    fn section_parses_and_rejects_unknown_keys() {
        let s: SecuritySection =
            serde_json::from_str(r#"{"token_file": "/run/secrets/token", "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"}}"#)
                .expect("parses");
        assert!(s.tls.as_ref().is_some_and(TlsSettings::mutual));
        let err = serde_json::from_str::<SecuritySection>(r#"{"tls": {"cafile": "x"}}"#).expect_err("typo");
        assert!(err.to_string().contains("cafile"), "{err}");
        let err = serde_json::from_str::<SecuritySection>(r#"{"token": "inline-secret"}"#).expect_err("inline tokens are not a setting");
        assert!(err.to_string().contains("token"), "{err}");
    }
}
