//! A database target: where to connect (a `tokio_postgres::Config`) and how
//! to secure the connection (libpq's `sslmode` and `sslrootcert`), with the
//! one `connect` that every pgrelay connection goes through: the pool, the
//! LISTEN connection, `install`, the demo's seeding.
//!
//! Why this exists: tokio-postgres knows `sslmode` only as disable, prefer or
//! require, rejects `verify-ca`, `verify-full` and `sslrootcert`, reads no
//! `PG*` variable, and leaves certificate checks to the TLS connector. So
//! those two parameters are taken out of the connection string here (URL or
//! key=value), from `PGSSLMODE`/`PGSSLROOTCERT` when the string has none,
//! and interpreted as libpq does; everything else goes through
//! tokio-postgres's own parser untouched.
//!
//! libpq's semantics, kept:
//! - `disable`: plain text. `prefer` (the default, as in libpq): TLS when the
//!   server offers it, else plain text. `require`: TLS or no connection.
//! - `prefer` and `require` check no certificate, unless a root certificate
//!   is given (or `~/.postgresql/root.crt` exists): then the chain is checked
//!   against it, as with `verify-ca`.
//! - `verify-ca`: the chain must lead to the root certificate; the host name
//!   is not checked. `verify-full`: the chain, and the certificate must name
//!   the host (`host`, not `hostaddr`). Both need a root certificate.
//!
//! Invariant: the root certificate file is read and checked when the target
//! is parsed (at configuration time), so a missing or invalid file is a
//! configuration error naming the file, never a failure at the first connect.
//! TLS is rustls with the ring provider, chosen explicitly (no process-wide
//! default provider to race over).
//!
//! Not here: the pool and its queries (`db`), reconnecting (`listen`).

use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid connection string: {0}")]
    Invalid(#[source] tokio_postgres::Error),
    #[error("sslmode {0:?}: expected disable, prefer, require, verify-ca or verify-full")]
    SslMode(String),
    #[error("sslmode=allow is not supported (it tries plain text first): use prefer or disable")]
    Allow,
    #[error("sslrootcert=system is not supported: name a CA file instead, e.g. /etc/ssl/certs/ca-certificates.crt")]
    SystemRoots,
    #[error("sslmode={mode} needs a root certificate: set sslrootcert (or PGSSLROOTCERT)")]
    NoRootCert { mode: SslMode },
    #[error("sslrootcert {}: {source}", .path.display())]
    ReadRootCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sslrootcert {}: {source}", .path.display())]
    BadPem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert {}: no PEM certificate in the file", .path.display())]
    EmptyRootCert { path: PathBuf },
    #[error("sslrootcert {}: {source}", .path.display())]
    BadRootCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// libpq's `sslmode` values that pgrelay supports (`allow` is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, TargetError> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(TargetError::Allow),
            other => Err(TargetError::SslMode(other.to_owned())),
        }
    }

    /// What tokio-postgres itself enforces: whether TLS is tried or required.
    /// The certificate checks are the connector's (see [`Checks`]).
    fn wire(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// A database to connect to: tokio-postgres's settings plus the TLS policy.
///
/// It derefs to the `tokio_postgres::Config`, so callers tune connection
/// settings (application name, timeouts) as before; the TLS policy is fixed
/// when the target is made.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    mode: SslMode,
    root_cert: Option<PathBuf>,
    tls: MakeRustlsConnect,
}

/// The stream type of every pgrelay database connection.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

impl Target {
    /// Parses a connection string (URL or key=value). `sslmode` and
    /// `sslrootcert` come from it, else from `env` (`PGSSLMODE`,
    /// `PGSSLROOTCERT`, and `HOME` for libpq's `~/.postgresql/root.crt`),
    /// else libpq's defaults. Reads the root certificate file, if any.
    pub fn parse(conn: &str, env: impl Fn(&str) -> Option<String>) -> Result<Target, TargetError> {
        let set = |v: &String| !v.is_empty();
        let (rest, params) = take_tls_params(conn);
        let mode = match params.sslmode.or_else(|| env("PGSSLMODE")).filter(set) {
            Some(mode) => SslMode::parse(&mode)?,
            None => SslMode::Prefer,
        };
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(TargetError::Invalid)?;
        config.ssl_mode(mode.wire());
        let named = params
            .sslrootcert
            .or_else(|| env("PGSSLROOTCERT"))
            .filter(set);
        if named.as_deref() == Some("system") {
            return Err(TargetError::SystemRoots);
        }
        let root_cert = match (mode, named) {
            (SslMode::Disable, _) => None,
            (_, Some(path)) => Some(PathBuf::from(path)),
            // libpq's default root certificate, used when it exists.
            (_, None) => env("HOME")
                .map(|home| Path::new(&home).join(".postgresql/root.crt"))
                .filter(|path| path.exists()),
        };
        let checks = match (&root_cert, mode) {
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(TargetError::NoRootCert { mode })
            }
            (None, _) => Checks::None,
            (Some(path), SslMode::VerifyFull) => Checks::ChainAndName(read_roots(path)?),
            (Some(path), _) => Checks::Chain(read_roots(path)?),
        };
        Ok(Target {
            config,
            mode,
            root_cert,
            tls: connector(checks),
        })
    }

    /// Opens one connection (TLS as the target says); the caller drives the
    /// returned `Connection`.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, TlsStream>), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    /// The settings and the TLS connector, for a pool that connects by itself.
    pub fn into_parts(self) -> (tokio_postgres::Config, MakeRustlsConnect) {
        (self.config, self.tls)
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }
}

impl FromStr for Target {
    type Err = TargetError;

    /// [`Target::parse`] with this process's environment.
    fn from_str(conn: &str) -> Result<Target, TargetError> {
        Target::parse(conn, |name| std::env::var(name).ok())
    }
}

impl Deref for Target {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl DerefMut for Target {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's Debug redacts the password.
        f.debug_struct("Target")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Target {
    /// One line for `--print-config`: where, as whom, how secured; no password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        write!(
            f,
            "host={} port={:?} dbname={} user={} sslmode={}",
            hosts.join(","),
            self.config.get_ports(),
            self.config.get_dbname().unwrap_or("-"),
            self.config.get_user().unwrap_or("-"),
            self.mode,
        )?;
        if let Some(path) = &self.root_cert {
            write!(f, " sslrootcert={}", path.display())?;
        }
        Ok(())
    }
}

/// The TLS parameters found in a connection string (the last of each wins,
/// as in libpq).
#[derive(Debug, Default, PartialEq)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

impl TlsParams {
    /// Keeps `value` if `key` is one of ours; says whether it was.
    fn take(&mut self, key: &str, value: String) -> bool {
        match key {
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            _ => return false,
        }
        true
    }
}

/// Splits `sslmode` and `sslrootcert` out of a connection string, leaving the
/// rest for tokio-postgres. A string this scanner cannot read is returned as
/// it is, for tokio-postgres's parser to report.
fn take_tls_params(conn: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let url_body = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| conn.strip_prefix(prefix));
    let rest = match url_body {
        Some(body) => {
            // As tokio-postgres reads a URL: credentials run to the first
            // `@`, the query starts at the first `?` after them.
            let after_credentials = body.find('@').map_or(0, |at| at + 1);
            let Some(q) = body[after_credentials..].find('?') else {
                return (conn.to_owned(), params);
            };
            let query_start = conn.len() - body.len() + after_credentials + q;
            let kept: Vec<&str> = conn[query_start + 1..]
                .split('&')
                .filter(|pair| {
                    let Some((key, value)) = pair.split_once('=') else {
                        return true;
                    };
                    match (
                        percent_decode_str(key).decode_utf8(),
                        percent_decode_str(value).decode_utf8(),
                    ) {
                        (Ok(key), Ok(value)) => !params.take(&key, value.into_owned()),
                        _ => true,
                    }
                })
                .collect();
            let mut rest = conn[..query_start].to_owned();
            if !kept.is_empty() {
                rest.push('?');
                rest.push_str(&kept.join("&"));
            }
            rest
        }
        None => {
            let Some(pairs) = keyword_pairs(conn) else {
                return (conn.to_owned(), TlsParams::default());
            };
            let mut rest = String::with_capacity(conn.len());
            let mut from = 0;
            for (key, value, span) in pairs {
                if params.take(key, value) {
                    rest.push_str(&conn[from..span.start]);
                    rest.push(' ');
                    from = span.end;
                }
            }
            rest.push_str(&conn[from..]);
            rest
        }
    };
    (rest, params)
}

/// The `key = value` pairs of a key=value connection string with their byte
/// spans, read as tokio-postgres reads them (values plain or single-quoted,
/// backslash escapes); `None` if it is malformed.
fn keyword_pairs(s: &str) -> Option<Vec<(&str, String, Range<usize>)>> {
    let mut pairs = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key_end = chars.peek().map_or(s.len(), |&(i, _)| i);
        if key_end == start {
            return None;
        }
        skip_ws(&mut chars);
        chars.next_if(|&(_, c)| c == '=')?;
        skip_ws(&mut chars);
        let quoted = chars.next_if(|&(_, c)| c == '\'').is_some();
        let mut value = String::new();
        loop {
            match chars.peek() {
                Some(&(_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some(&(_, c)) if !quoted && c.is_whitespace() => break,
                None if quoted => return None,
                None => break,
                Some(&(_, c)) => {
                    chars.next();
                    if c == '\\' {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    } else {
                        value.push(c);
                    }
                }
            }
        }
        if !quoted && value.is_empty() {
            return None;
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        pairs.push((&s[start..key_end], value, start..end));
    }
}

/// Every certificate in a PEM file, as trust anchors.
fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TargetError> {
    let pem = std::fs::read(path).map_err(|source| TargetError::ReadRootCert {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TargetError::BadPem {
            path: path.to_owned(),
            source,
        })?;
        roots.add(cert).map_err(|source| TargetError::BadRootCert {
            path: path.to_owned(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(TargetError::EmptyRootCert {
            path: path.to_owned(),
        });
    }
    Ok(Arc::new(roots))
}

/// What the server's certificate must pass.
enum Checks {
    /// Nothing (the handshake's signatures are still checked): TLS against
    /// eavesdroppers, not against an impostor, as libpq's `require`.
    None,
    /// A chain to one of the roots; any host name.
    Chain(Arc<RootCertStore>),
    /// A chain to one of the roots, naming the host.
    ChainAndName(Arc<RootCertStore>),
}

fn connector(checks: Checks) -> MakeRustlsConnect {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (roots, check_name) = match checks {
        Checks::None => (None, false),
        Checks::Chain(roots) => (Some(roots), false),
        Checks::ChainAndName(roots) => (Some(roots), true),
    };
    let chain = roots.map(|roots| {
        WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .unwrap_or_else(|_| unreachable!("a non-empty root store always builds"))
    });
    let verifier = Verifier {
        chain,
        check_name,
        provider: Arc::clone(&provider),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default TLS versions"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}

/// One verifier for the three levels of checks, so that they differ only in
/// what they skip: webpki checks the chain before the name, so a name error
/// means the chain was good (`verify-ca` accepts it).
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `conn` and checks what is left for tokio-postgres and what was taken.
    #[track_caller]
    fn check(conn: &str, rest: &str, sslmode: Option<&str>, sslrootcert: Option<&str>) {
        let (got_rest, params) = take_tls_params(conn);
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(words(&got_rest), rest, "rest of {conn:?}");
        assert_eq!(
            params,
            TlsParams {
                sslmode: sslmode.map(str::to_owned),
                sslrootcert: sslrootcert.map(str::to_owned),
            },
            "params of {conn:?}"
        );
    }

    #[test]
    fn tls_params_are_taken_out_of_urls() {
        check("postgres://u@h/db", "postgres://u@h/db", None, None);
        check(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem",
            "postgres://u@h/db",
            Some("verify-full"),
            Some("/tmp/ca.pem"),
        );
        check(
            "postgresql://h1,h2:5433/db?application_name=x&sslmode=require&connect_timeout=3",
            "postgresql://h1,h2:5433/db?application_name=x&connect_timeout=3",
            Some("require"),
            None,
        );
        // A `?` in the password is not the query.
        check(
            "postgres://u:p?w@h/db?sslmode=disable",
            "postgres://u:p?w@h/db",
            Some("disable"),
            None,
        );
        // The last value wins, as in libpq.
        check(
            "postgres://h/db?sslmode=disable&sslmode=require",
            "postgres://h/db",
            Some("require"),
            None,
        );
        // Malformed pieces are left for tokio-postgres to report.
        check("postgres://h/db?junk", "postgres://h/db?junk", None, None);
    }

    #[test]
    fn tls_params_are_taken_out_of_keyword_strings() {
        check("host=h dbname=d", "host=h dbname=d", None, None);
        check(
            "host=h sslmode=verify-ca sslrootcert='/a b/c\\'s.pem' dbname=d",
            "host=h dbname=d",
            Some("verify-ca"),
            Some("/a b/c's.pem"),
        );
        check("sslmode = require host=h", "host=h", Some("require"), None);
        // Unterminated quote: left as it is for tokio-postgres's error.
        check(
            "host=h sslmode='require",
            "host=h sslmode='require",
            None,
            None,
        );
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn sslmode_defaults_to_prefer_and_the_string_beats_the_environment() {
        let target = Target::parse("host=h", env(&[])).expect("parses");
        assert_eq!(target.ssl_mode(), SslMode::Prefer);
        assert_eq!(
            target.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let target = Target::parse("host=h", env(&[("PGSSLMODE", "disable")])).expect("parses");
        assert_eq!(target.ssl_mode(), SslMode::Disable);
        let target = Target::parse(
            "postgres://h/d?sslmode=require",
            env(&[("PGSSLMODE", "disable")]),
        )
        .expect("parses");
        assert_eq!(target.ssl_mode(), SslMode::Require);
        assert_eq!(
            target.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert!(target.to_string().ends_with("sslmode=require"), "{target}");
    }

    #[test]
    fn bad_tls_settings_are_one_line_errors_naming_them() {
        let cases = [
            ("host=h sslmode=bogus", "sslmode \"bogus\""),
            ("host=h sslmode=allow", "sslmode=allow is not supported"),
            ("host=h sslmode=verify-full", "sslmode=verify-full needs"),
            (
                "host=h sslmode=require sslrootcert=/nonexistent/ca.pem",
                "sslrootcert /nonexistent/ca.pem: No such file",
            ),
            ("host=h sslrootcert=system", "sslrootcert=system"),
            ("host=h bogus=1", "invalid connection string"),
        ];
        for (conn, wanted) in cases {
            let err = Target::parse(conn, env(&[])).expect_err(conn).to_string();
            assert!(err.contains(wanted), "{conn}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").expect("write");
        let conn = format!("host=h sslmode=verify-ca sslrootcert={}", not_pem.display());
        let err = Target::parse(&conn, env(&[]))
            .expect_err("not PEM")
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn disable_ignores_the_root_certificate() {
        let target = Target::parse(
            "host=h sslmode=disable sslrootcert=/nonexistent/ca.pem",
            env(&[]),
        )
        .expect("disable reads no certificate");
        assert_eq!(
            target.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    proptest::proptest! {
        /// Never panics, and whatever it keeps is exactly the input minus our
        /// parameters: tokio-postgres sees the other settings unchanged.
        #[test]
        fn keyword_split_keeps_every_other_parameter(
            pairs in proptest::collection::vec(
                ("(host|dbname|user|sslmode|sslrootcert|application_name)", "[a-z/ '\\\\]{1,8}"),
                0..6,
            ),
            junk in ".{0,40}",
        ) {
            let _ = take_tls_params(&junk);
            let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
            let conn: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
            let conn = conn.join(" ");
            let (rest, params) = take_tls_params(&conn);
            let ours = |k: &str| k == "sslmode" || k == "sslrootcert";
            let others: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| !ours(k))
                .map(|(k, v)| format!("{k}={}", quote(v)))
                .collect();
            proptest::prop_assert_eq!(rest.split_whitespace().collect::<Vec<_>>().join(" "),
                others.join(" ").split_whitespace().collect::<Vec<_>>().join(" "));
            let last = |key: &str| pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            proptest::prop_assert_eq!(params.sslmode, last("sslmode"));
            proptest::prop_assert_eq!(params.sslrootcert, last("sslrootcert"));
        }
    }
}
