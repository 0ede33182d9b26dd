//! TLS for the connections pgkeep opens itself, with libpq's meaning of the settings.
//!
//! The settings come from the conninfo (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
//! `sslsni`, `ssl_min_protocol_version`, `ssl_max_protocol_version`) or the environment
//! (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGSSLSNI`,
//! `PGSSLMINPROTOCOLVERSION`, `PGSSLMAXPROTOCOLVERSION`), and mean what they mean to libpq
//! (PostgreSQL 16's libpq documentation, "SSL Support"):
//!
//! - `disable`: plaintext only. `allow`: plaintext first; if the server rejects it (an error
//!   during start-up, e.g. a `hostssl`-only pg_hba.conf), once more with TLS. `prefer` (the
//!   default): TLS when the server offers it; plaintext when it does not, or when the TLS
//!   handshake or the start-up over TLS fails. `require`: TLS or nothing.
//!   `verify-ca`: TLS, and the server's certificate chains to a trusted root.
//!   `verify-full`: that, and the certificate names the host connected to.
//! - The trusted roots are read from `sslrootcert`, by default `~/.postgresql/root.crt`. When
//!   that file exists, every mode that uses TLS checks the chain (libpq's rule for
//!   compatibility: `require` then acts as `verify-ca`); when it does not, `verify-ca` and
//!   `verify-full` refuse to connect and the weaker modes do not verify. `sslrootcert=system`
//!   trusts the system's roots and makes `verify-full` the default (a weaker mode is an error).
//! - A client certificate is sent when `sslcert` (default `~/.postgresql/postgresql.crt`)
//!   exists; its key (`sslkey`, default `~/.postgresql/postgresql.key`) must then exist and
//!   must not be readable by group or others (0600; 0640 when owned by root).
//! - `sslmode` is ignored on unix sockets, as libpq does.
//!
//! Differences to libpq (OpenSSL): certificates are checked by webpki, which matches host
//! names against the subjectAltName only (no fallback to the common name) and needs X.509 v3
//! certificates; keys and certificates are PEM files; encrypted keys (`sslpassword`) and
//! revocation lists (`sslcrl`, `sslcrldir`) are not supported and are refused rather than
//! ignored. The one crypto provider is aws-lc-rs.

use crate::client::ConnParams;
use crate::error::{PgError, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first, TLS if the server rejects plaintext.
    Allow,
    /// TLS when possible, else plaintext (libpq's default).
    #[default]
    Prefer,
    /// TLS only; the certificate is checked only when a root certificate file exists.
    Require,
    /// TLS, and the certificate chains to a trusted root.
    VerifyCa,
    /// TLS, a trusted chain, and the certificate names the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Conninfo keys handled here, with their environment variables.
const SUPPORTED: [(&str, &str); 7] = [
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslsni", "PGSSLSNI"),
    ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
    ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION"),
];

/// libpq TLS settings pgkeep does not implement: refused, because ignoring them would
/// connect with less protection than the user asked for (or fail later, less clearly).
const UNSUPPORTED: [(&str, &str); 5] = [
    ("sslcrl", "PGSSLCRL"),
    ("sslcrldir", "PGSSLCRLDIR"),
    ("sslpassword", ""),
    ("sslcertmode", "PGSSLCERTMODE"),
    ("sslkeylogfile", ""),
];

/// Whether a conninfo key is a TLS setting taken out before tokio-postgres parses the rest.
pub(crate) fn is_ssl_key(key: &str) -> bool {
    SUPPORTED.iter().chain(&UNSUPPORTED).any(|(k, _)| *k == key) || key == "sslcompression"
}

/// The TLS settings of a connection, resolved from the conninfo and the environment.
#[derive(Debug, Clone, Default)]
pub struct SslParams {
    /// The effective mode.
    pub mode: SslMode,
    /// Settings given in the conninfo or the environment (key, value), for child tools.
    given: Vec<(&'static str, String)>,
    /// `~/.postgresql`, where the default file names live.
    home_dir: Option<PathBuf>,
}

fn config_err(message: String, hint: &str) -> PgError {
    PgError::SslConfig {
        message,
        hint: hint.to_string(),
    }
}

impl SslParams {
    /// Resolves the settings: `pairs` from the conninfo (keys per [`is_ssl_key`]) win over the
    /// environment. `home` is the user's home directory (for `~/.postgresql`).
    pub(crate) fn resolve(
        pairs: &[(String, String)],
        env: &dyn Fn(&str) -> Option<String>,
        home: Option<PathBuf>,
    ) -> Result<SslParams> {
        let value = |key: &str, var: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| (!var.is_empty()).then(|| env(var)).flatten())
                .filter(|v| !v.is_empty())
        };
        for (key, var) in UNSUPPORTED {
            if value(key, var).is_some() {
                let via = if var.is_empty() {
                    String::new()
                } else {
                    format!(" (or {var})")
                };
                return Err(config_err(
                    format!("the connection setting {key}{via} is not supported by pgkeep"),
                    "remove it; pgkeep supports sslmode, sslrootcert, sslcert, sslkey (an unencrypted PEM key), sslsni and ssl_min/max_protocol_version",
                ));
            }
        }
        let mut given = Vec::new();
        for (key, var) in SUPPORTED {
            if let Some(v) = value(key, var) {
                given.push((key, v));
            }
        }
        let mut p = SslParams {
            mode: SslMode::Prefer,
            given,
            home_dir: home.map(|h| h.join(".postgresql")),
        };
        p.mode = p.resolve_mode()?;
        p.check_values()?;
        Ok(p)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.given
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    fn resolve_mode(&self) -> Result<SslMode> {
        let system = self.get("sslrootcert") == Some("system");
        match self.get("sslmode") {
            None if system => Ok(SslMode::VerifyFull),
            None => Ok(SslMode::Prefer),
            Some(s) => {
                let mode = SslMode::parse(s).ok_or_else(|| {
                    config_err(
                        format!("invalid sslmode value: {s:?}"),
                        "use disable, allow, prefer, require, verify-ca or verify-full",
                    )
                })?;
                if system && mode != SslMode::VerifyFull {
                    return Err(config_err(
                        format!("weak sslmode {s:?} may not be used with sslrootcert=system"),
                        "use sslmode=verify-full: anyone can get a certificate from a public CA for a host name they control",
                    ));
                }
                Ok(mode)
            }
        }
    }

    fn check_values(&self) -> Result<()> {
        if let Some(v) = self.get("sslsni") {
            if v != "0" && v != "1" {
                return Err(config_err(
                    format!("invalid sslsni value: {v:?}"),
                    "use 1 (send the host name in the TLS handshake, the default) or 0",
                ));
            }
        }
        let (min, max) = self.protocol_range()?;
        if min > max {
            return Err(config_err(
                "ssl_min_protocol_version is above ssl_max_protocol_version".into(),
                "choose a minimum at or below the maximum",
            ));
        }
        Ok(())
    }

    /// The allowed TLS versions as (min, max), 2 = TLS 1.2, 3 = TLS 1.3. rustls speaks only
    /// these two: an older minimum changes nothing, an older maximum cannot be met.
    fn protocol_range(&self) -> Result<(u8, u8)> {
        let parse = |key: &str, default: u8| -> Result<u8> {
            match self.get(key) {
                None => Ok(default),
                Some("TLSv1") | Some("TLSv1.1") if key == "ssl_min_protocol_version" => Ok(2),
                Some("TLSv1.2") => Ok(2),
                Some("TLSv1.3") => Ok(3),
                Some(v) => Err(config_err(
                    format!("invalid or unsupported {key} value: {v:?}"),
                    "use TLSv1.2 or TLSv1.3 (pgkeep speaks no older TLS)",
                )),
            }
        };
        Ok((
            parse("ssl_min_protocol_version", 2)?,
            parse("ssl_max_protocol_version", 3)?,
        ))
    }

    /// libpq environment variables that give a child tool (pg_dump, pg_basebackup, ...) the
    /// same settings: the effective mode and every other setting given.
    pub(crate) fn libpq_env(&self) -> Vec<(String, String)> {
        let mut v = vec![("PGSSLMODE".to_string(), self.mode.as_str().to_string())];
        for (key, value) in &self.given {
            let var = SUPPORTED.iter().find(|(k, _)| k == key).map(|(_, e)| *e);
            if let Some(var) = var.filter(|_| *key != "sslmode") {
                v.push((var.to_string(), value.clone()));
            }
        }
        v
    }

    /// The root certificate file: `sslrootcert` or `~/.postgresql/root.crt`.
    fn rootcert_path(&self) -> Option<PathBuf> {
        self.file("sslrootcert", "root.crt")
    }

    fn file(&self, key: &str, default: &str) -> Option<PathBuf> {
        match self.get(key) {
            Some(v) => Some(PathBuf::from(v)),
            None => self.home_dir.as_ref().map(|d| d.join(default)),
        }
    }

    /// What certificates are trusted, per libpq's rules (see the module documentation).
    fn trust(&self) -> Result<Trust> {
        if self.get("sslrootcert") == Some("system") {
            return system_roots().map(Trust::Roots);
        }
        match self.rootcert_path() {
            Some(path) if path.exists() => load_roots(&path).map(Trust::Roots),
            path if self.mode.verifies() => {
                let shown = path
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.postgresql/root.crt".into());
                Err(config_err(
                    format!(
                        "root certificate file \"{shown}\" does not exist, and sslmode={} needs it to verify the server",
                        self.mode.as_str()
                    ),
                    "give the CA certificate (PEM) that signed the server's certificate with sslrootcert (or PGSSLROOTCERT), use the system's trusted roots with sslrootcert=system, or choose an sslmode that does not verify the server",
                ))
            }
            Some(path) => {
                if self.get("sslrootcert").is_some() {
                    tracing::warn!(
                        "sslrootcert file {} does not exist; with sslmode={} the server's certificate is not verified (libpq's rule)",
                        path.display(),
                        self.mode.as_str()
                    );
                }
                Ok(Trust::Anything)
            }
            None => Ok(Trust::Anything),
        }
    }

    /// The client certificate and key to present, when `sslcert` exists.
    fn client_cert(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
        let Some(cert_path) = self.file("sslcert", "postgresql.crt") else {
            return Ok(None);
        };
        match std::fs::metadata(&cert_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(config_err(
                    format!(
                        "could not open certificate file \"{}\": {e}",
                        cert_path.display()
                    ),
                    "check sslcert (or PGSSLCERT) and the file's permissions",
                ))
            }
            Ok(_) => {}
        }
        let chain = read_pem_certs(&cert_path, "certificate file")?;
        let key_path = self
            .file("sslkey", "postgresql.key")
            .unwrap_or_else(|| PathBuf::from("postgresql.key"));
        let key = read_private_key(&key_path)?;
        Ok(Some((chain, key)))
    }

    /// The rustls configuration for this connection. Errors are configuration mistakes
    /// (missing or unreadable files, bad settings).
    pub(crate) fn client_config(&self) -> Result<(ClientConfig, bool)> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let trust = self.trust()?;
        let verifies = matches!(trust, Trust::Roots(_));
        let verifier = PgVerifier {
            roots: match trust {
                Trust::Roots(r) => Some(Arc::new(r)),
                Trust::Anything => None,
            },
            check_name: self.mode == SslMode::VerifyFull,
            algs: provider.signature_verification_algorithms,
        };
        let (min, max) = self.protocol_range()?;
        let versions: Vec<&'static rustls::SupportedProtocolVersion> =
            [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
                .into_iter()
                .filter(|(v, _)| (min..=max).contains(v))
                .map(|(_, p)| p)
                .collect();
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| {
                config_err(
                    format!("TLS settings: {e}"),
                    "check ssl_min/max_protocol_version",
                )
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match self.client_cert()? {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                config_err(
                    format!("the client certificate and key cannot be used: {e}"),
                    "check that sslkey (or PGSSLKEY) is the key of the certificate in sslcert (or PGSSLCERT)",
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = self.get("sslsni") != Some("0");
        // What libpq 17 sends; PostgreSQL 17 servers check it, older ones ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok((config, verifies))
    }

    /// A one-line description of what the TLS failure `e` means for these settings, and a
    /// hint; for messages.
    fn explain(&self, host: &str, e: &rustls::Error) -> (String, String) {
        let mode = self.mode.as_str();
        let roots = match self.get("sslrootcert") {
            Some(r) => format!("sslrootcert {r}"),
            None => self
                .rootcert_path()
                .map(|p| {
                    format!(
                        "{} (sslmode={mode} verifies because this file exists)",
                        p.display()
                    )
                })
                .unwrap_or_else(|| "the root certificate file".into()),
        };
        match e {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            }) => (
                format!(
                    "server certificate does not match host name \"{host}\" (sslmode={mode}); it names {}",
                    if presented.is_empty() { "no host".to_string() } else { presented.join(", ") }
                ),
                "connect with a host name the certificate lists in its subjectAltName (host=...), or have the certificate reissued for this name; sslmode=verify-ca checks the chain without the name".into(),
            ),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => (
                format!("server certificate does not match host name \"{host}\" (sslmode={mode})"),
                "connect with a host name the certificate lists in its subjectAltName (host=...), or have the certificate reissued for this name; sslmode=verify-ca checks the chain without the name".into(),
            ),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => (
                format!("server certificate is not signed by a CA trusted in {roots} (sslmode={mode})"),
                "give the CA certificate that signed the server's certificate with sslrootcert (or PGSSLROOTCERT)".into(),
            ),
            other => (
                format!("TLS handshake with the server failed (sslmode={mode}): {other}"),
                "check the server's certificate and ssl settings, and sslmode, sslrootcert, sslcert and sslkey here".into(),
            ),
        }
    }
}

/// Which server certificates are accepted.
enum Trust {
    /// Those chaining to these roots.
    Roots(RootCertStore),
    /// Any (libpq without a root certificate file and without verify-*).
    Anything,
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(config_err(
            "sslrootcert=system: no trusted root certificates were found on this system".into(),
            "install the system's CA certificates (e.g. the ca-certificates package), set SSL_CERT_FILE, or give a file with sslrootcert",
        ));
    }
    Ok(roots)
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let certs = read_pem_certs(path, "root certificate file")?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            config_err(
                format!("root certificate file \"{}\": {e}", path.display()),
                "sslrootcert must hold the PEM certificates of the CAs to trust",
            )
        })?;
    }
    Ok(roots)
}

fn read_pem_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            config_err(
                format!("could not read {what} \"{}\": {e}", path.display()),
                "give a readable PEM file (-----BEGIN CERTIFICATE-----)",
            )
        })?;
    if certs.is_empty() {
        return Err(config_err(
            format!("{what} \"{}\" holds no PEM certificate", path.display()),
            "give a PEM file (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// Reads the client's private key after libpq's checks: it must exist, and must not be open
/// to group or others (0600 when owned by the user, 0640 when owned by root).
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        config_err(
            format!("certificate present, but not private key file \"{}\": {e}", path.display()),
            "give the key of the client certificate with sslkey (or PGSSLKEY), or remove the certificate",
        )
    })?;
    let mode = meta.mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(config_err(
            format!(
                "private key file \"{}\" has group or world access",
                path.display()
            ),
            "chmod 0600 it (or 0640 or less if owned by root)",
        ));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        config_err(
            format!("could not load private key file \"{}\": {e}", path.display()),
            "give an unencrypted PEM key (pgkeep does not support sslpassword; `openssl pkey -in KEY -out KEY.plain` decrypts one)",
        )
    })
}

/// Checks server certificates as the resolved settings say: nothing, the chain, or the chain
/// and the host name. The handshake signatures are always checked.
#[derive(Debug)]
struct PgVerifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Splits a conninfo (key/value or URI) into the TLS settings handled here and the rest, for
/// tokio-postgres (which knows only sslmode disable/prefer/require and no certificate files).
pub(crate) fn split_conninfo(conninfo: &str) -> Result<(Vec<(String, String)>, String)> {
    let s = conninfo.trim();
    if crate::client::is_uri(s) {
        return Ok(split_uri(s));
    }
    let pairs = crate::client::parse_keyvalue(s)?;
    let (ssl, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| is_ssl_key(k));
    let rest = rest
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((ssl, rest))
}

fn split_uri(s: &str) -> (Vec<(String, String)>, String) {
    let Some((base, query)) = s.split_once('?') else {
        return (Vec::new(), s.to_string());
    };
    let mut ssl = Vec::new();
    let mut keep = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decode(k);
        if is_ssl_key(&key) {
            ssl.push((key, percent_decode(v)));
        } else {
            keep.push(part);
        }
    }
    let rest = if keep.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", keep.join("&"))
    };
    (ssl, rest)
}

/// `%XX` decoding of a URI query component (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS connector that records whether a TLS handshake was started, which tells libpq's
/// fallbacks apart: an error before it (the server answered the SSLRequest with "no") or
/// after it (handshake or start-up over TLS failed).
#[derive(Clone)]
struct Tracked<T> {
    inner: T,
    started: Arc<AtomicBool>,
}

impl<S, T: tokio_postgres::tls::MakeTlsConnect<S>> tokio_postgres::tls::MakeTlsConnect<S>
    for Tracked<T>
{
    type Stream = T::Stream;
    type TlsConnect = Tracked<T::TlsConnect>;
    type Error = T::Error;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<Self::TlsConnect, T::Error> {
        Ok(Tracked {
            inner: self.inner.make_tls_connect(domain)?,
            started: self.started.clone(),
        })
    }
}

impl<S, T: tokio_postgres::tls::TlsConnect<S>> tokio_postgres::tls::TlsConnect<S> for Tracked<T> {
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = T::Future;

    fn connect(self, stream: S) -> T::Future {
        self.started.store(true, Ordering::SeqCst);
        self.inner.connect(stream)
    }
}

type Connected = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

/// One connection attempt; the connection runs on a spawned task.
async fn attempt<T>(
    config: &tokio_postgres::Config,
    mode: tokio_postgres::config::SslMode,
    tls: T,
) -> std::result::Result<Connected, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let mut config = config.clone();
    config.ssl_mode(mode);
    let (client, conn) = config.connect(tls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection ended: {e}");
        }
    });
    Ok((client, task))
}

/// Whether tokio-postgres failed in its TLS step (its message for that kind of error; the
/// kind itself is not public).
fn is_tls_step(e: &tokio_postgres::Error) -> bool {
    e.to_string().starts_with("error performing TLS handshake")
}

/// The rustls error somewhere in the chain of `e`, if the TLS handshake failed on one.
fn rustls_cause(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
        cur = c.source();
    }
    None
}

/// Connects as libpq would with these parameters' `sslmode` (see the module documentation).
pub(crate) async fn connect(params: &ConnParams) -> Result<Connected> {
    use tokio_postgres::config::SslMode as Wire;
    let config = params.to_config();
    let ssl = &params.ssl;
    if params.is_unix_socket() || ssl.mode == SslMode::Disable {
        return attempt(&config, Wire::Disable, tokio_postgres::NoTls)
            .await
            .map_err(|e| connect_error(params, &e, false));
    }
    let (tls_config, verifies) = ssl.client_config()?;
    let tls = Tracked {
        inner: tokio_postgres_rustls::MakeRustlsConnect::new(tls_config),
        started: Arc::new(AtomicBool::new(false)),
    };
    let started = tls.started.clone();
    let result = match ssl.mode {
        SslMode::Allow => match attempt(&config, Wire::Disable, tokio_postgres::NoTls).await {
            // Rejected during start-up (e.g. pg_hba.conf wants hostssl): once more with TLS.
            Err(e) if e.as_db_error().is_some() => {
                tracing::debug!("plaintext connection rejected ({e}); retrying with TLS");
                attempt(&config, Wire::Require, tls).await
            }
            other => other,
        },
        SslMode::Prefer => match attempt(&config, Wire::Prefer, tls).await {
            Err(e)
                if started.load(Ordering::SeqCst)
                    && (is_tls_step(&e) || e.as_db_error().is_some()) =>
            {
                tracing::debug!("connection over TLS failed ({e}); retrying without TLS");
                started.store(false, Ordering::SeqCst);
                attempt(&config, Wire::Disable, tokio_postgres::NoTls).await
            }
            other => other,
        },
        _ => attempt(&config, Wire::Require, tls).await,
    };
    match result {
        Ok(c) => {
            tracing::debug!(
                "connected to {} (sslmode={}, TLS {}, certificate {})",
                params.describe(),
                ssl.mode.as_str(),
                if started.load(Ordering::SeqCst) {
                    "on"
                } else {
                    "off"
                },
                if verifies { "verified" } else { "not verified" }
            );
            Ok(c)
        }
        Err(e) => Err(connect_error(params, &e, started.load(Ordering::SeqCst))),
    }
}

/// The error of a failed connection: TLS failures get their own message and hint.
fn connect_error(params: &ConnParams, e: &tokio_postgres::Error, tls_started: bool) -> PgError {
    let target = params.describe();
    let mode = params.ssl.mode.as_str();
    if is_tls_step(e) && !tls_started {
        return PgError::Tls {
            target,
            reason: format!("server does not support SSL, but SSL was required (sslmode={mode})"),
            hint: "turn TLS on in the server (ssl = on with ssl_cert_file and ssl_key_file in postgresql.conf), or connect with sslmode=prefer or disable over a network you trust or a unix socket".into(),
        };
    }
    if let Some(r) = rustls_cause(e) {
        let (reason, hint) = params.ssl.explain(&params.host, r);
        return PgError::Tls {
            target,
            reason,
            hint,
        };
    }
    PgError::Connect {
        target,
        reason: crate::client::error_text(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn resolve(ci: &str, vars: &'static [(&'static str, &'static str)]) -> Result<SslParams> {
        let (pairs, _) = split_conninfo(ci)?;
        SslParams::resolve(&pairs, &env_of(vars), Some(PathBuf::from("/home/u")))
    }

    #[test]
    fn keyvalue_conninfo_loses_only_the_tls_settings() {
        let (ssl, rest) = split_conninfo(
            "host=db port=5433 sslmode=verify-full sslrootcert='/etc/my ca.pem' application_name='it\\'s'",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ssl,
            vec![
                ("sslmode".to_string(), "verify-full".to_string()),
                ("sslrootcert".to_string(), "/etc/my ca.pem".to_string())
            ]
        );
        let cfg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(cfg.get_application_name(), Some("it's"));
        assert_eq!(cfg.get_ports(), &[5433]);
    }

    #[test]
    fn uri_query_tls_settings_are_taken_out_and_decoded() {
        let (ssl, rest) =
            split_uri("postgresql://u@db:5433/app?sslmode=verify-ca&sslrootcert=%2Ftmp%2Fca.pem&application_name=x");
        assert_eq!(
            ssl,
            vec![
                ("sslmode".to_string(), "verify-ca".to_string()),
                ("sslrootcert".to_string(), "/tmp/ca.pem".to_string())
            ]
        );
        assert_eq!(rest, "postgresql://u@db:5433/app?application_name=x");
        let (ssl, rest) = split_uri("postgresql://db/app?sslmode=require");
        assert_eq!(ssl.len(), 1);
        assert_eq!(rest, "postgresql://db/app");
    }

    #[test]
    fn default_mode_is_prefer_and_conninfo_beats_environment() {
        assert_eq!(resolve("host=db", &[]).unwrap().mode, SslMode::Prefer);
        let vars: &[(&str, &str)] = &[("PGSSLMODE", "require"), ("PGSSLROOTCERT", "/ca.pem")];
        let p = resolve("host=db", vars).unwrap();
        assert_eq!(p.mode, SslMode::Require);
        assert_eq!(p.rootcert_path(), Some(PathBuf::from("/ca.pem")));
        let p = resolve("host=db sslmode=verify-ca", vars).unwrap();
        assert_eq!(p.mode, SslMode::VerifyCa);
        assert_eq!(
            p.libpq_env(),
            vec![
                ("PGSSLMODE".to_string(), "verify-ca".to_string()),
                ("PGSSLROOTCERT".to_string(), "/ca.pem".to_string())
            ]
        );
    }

    #[test]
    fn default_files_are_under_home_dot_postgresql() {
        let p = resolve("host=db", &[]).unwrap();
        assert_eq!(
            p.rootcert_path(),
            Some(PathBuf::from("/home/u/.postgresql/root.crt"))
        );
        assert_eq!(
            p.file("sslkey", "postgresql.key"),
            Some(PathBuf::from("/home/u/.postgresql/postgresql.key"))
        );
    }

    #[test]
    fn sslrootcert_system_defaults_to_verify_full_and_refuses_weaker_modes() {
        assert_eq!(
            resolve("sslrootcert=system", &[]).unwrap().mode,
            SslMode::VerifyFull
        );
        let e = resolve("sslrootcert=system sslmode=require", &[]).unwrap_err();
        assert!(matches!(e, PgError::SslConfig { .. }), "{e}");
        assert!(e.to_string().contains("weak sslmode \"require\""), "{e}");
    }

    #[test]
    fn bad_values_and_unsupported_settings_are_configuration_errors() {
        for ci in [
            "sslmode=verify",
            "sslsni=2",
            "ssl_max_protocol_version=TLSv1.1",
            "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
            "sslcrl=/x.crl",
            "sslpassword=x",
        ] {
            let e = resolve(ci, &[]).unwrap_err();
            assert!(matches!(e, PgError::SslConfig { .. }), "{ci}: {e}");
        }
        let e = resolve("host=db", &[("PGSSLCRLDIR", "/crl")]).unwrap_err();
        assert!(e.to_string().contains("PGSSLCRLDIR"), "{e}");
    }

    #[test]
    fn verify_modes_without_a_root_file_are_refused_weaker_modes_do_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let ci = format!("sslmode=verify-full sslrootcert={}", missing.display());
        let (pairs, _) = split_conninfo(&ci).unwrap();
        let p = SslParams::resolve(&pairs, &|_| None, None).unwrap();
        let e = p.client_config().unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let (pairs, _) = split_conninfo("sslmode=require").unwrap();
        let p = SslParams::resolve(&pairs, &|_| None, Some(dir.path().into())).unwrap();
        let (_, verifies) = p.client_config().unwrap();
        assert!(!verifies);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2Fa%20b"), "/a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
