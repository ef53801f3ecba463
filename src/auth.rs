//! JWT validation -> [`Identity`], token extraction from a request, minting.
//!
//! Pure: no I/O once the key is loaded, so unit tests cover it. The algorithm
//! list is fixed by the key type (an HMAC secret allows HS256 only, an RSA key
//! RS256, an EC key ES256), never taken from the token, so `none` and HS/RS key
//! confusion cannot pass. `exp` is always required. Tokens never reach a log:
//! errors here name what was wrong with a token, not the token.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::route::user_id;

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user id as text (claim `sub`, else `user_id`).
    pub user: String,
    pub admin: bool,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// A claim that makes a token's holder a super admin: `NAME=VALUE`, the claim's
/// value compared as text (`role=super_admin`, `is_superuser=true`), or
/// contained in it when the claim is an array (`roles=[..., "super_admin"]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminClaim {
    pub name: String,
    pub value: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("expired token")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token has no user id (claim sub or user_id)")]
    NoUser,
    #[error("could not sign token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("--jwt-public-key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--jwt-secret-file {path}: {reason}")]
    SecretFile { path: String, reason: String },
    #[error("--jwt-public-key {path}: not an RSA or EC public key in PEM format")]
    Pem { path: String },
    #[error("--admin-claim {0:?} is not NAME=VALUE")]
    AdminClaim(String),
}

impl std::str::FromStr for AdminClaim {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() && !value.trim().is_empty() => {
                Ok(AdminClaim {
                    name: name.trim().to_owned(),
                    value: value.trim().to_owned(),
                })
            }
            _ => Err(KeyError::AdminClaim(s.to_owned())),
        }
    }
}

/// Checks tokens. Built once from the configuration.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    admin_claims: Vec<AdminClaim>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("admin_claims", &self.admin_claims)
            .finish_non_exhaustive()
    }
}

/// Where the verification key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Secret(String),
    /// A file holding the HS256 secret (surrounding whitespace ignored).
    SecretFile(std::path::PathBuf),
    PublicKeyFile(std::path::PathBuf),
}

/// Everything [`Verifier::new`] needs.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub admin_claims: Vec<AdminClaim>,
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Verifier, KeyError> {
        let (key, algorithm) = match &config.key {
            KeySource::Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            KeySource::SecretFile(path) => {
                let shown = path.display().to_string();
                let secret = std::fs::read_to_string(path).map_err(|e| KeyError::SecretFile {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
                let secret = secret.trim();
                if secret.is_empty() {
                    return Err(KeyError::SecretFile {
                        path: shown,
                        reason: "file is empty".into(),
                    });
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Algorithm::HS256,
                )
            }
            KeySource::PublicKeyFile(path) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: shown.clone(),
                    source,
                })?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(KeyError::Pem { path: shown });
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = config.audience.is_some();
        if let Some(aud) = &config.audience {
            validation.set_audience(&[aud]);
            validation.set_required_spec_claims(&["exp", "aud"]);
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            let mut required: Vec<&str> = vec!["exp", "iss"];
            if config.audience.is_some() {
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
        }
        Ok(Verifier {
            key,
            validation,
            admin_claims: config.admin_claims.clone(),
        })
    }

    /// Validates a token and says whose it is.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::MissingRequiredClaim(claim) => {
                AuthError::Invalid(format!("missing required claim {claim}"))
            }
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        // SimpleJWT issues refresh tokens signed with the same key: only an
        // access token opens a socket.
        if let Some(kind) = claims.get("token_type") {
            if kind.as_str() != Some("access") {
                return Err(AuthError::Invalid("token_type is not access".into()));
            }
        }
        let user = ["sub", "user_id"]
            .iter()
            .find_map(|name| {
                let raw = serde_json::value::to_raw_value(claims.get(*name)?).ok()?;
                user_id(&raw)
            })
            .ok_or(AuthError::NoUser)?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .map(|exp| exp.max(0.0) as u64)
            .ok_or_else(|| AuthError::Invalid("exp is not a number".into()))?;
        let admin = self.admin_claims.iter().any(|c| {
            claims
                .get(&c.name)
                .is_some_and(|v| claim_matches(v, &c.value))
        });
        Ok(Identity { user, admin, exp })
    }
}

fn claim_matches(claim: &Value, want: &str) -> bool {
    match claim {
        Value::String(s) => s == want,
        Value::Bool(b) => b.to_string() == want,
        Value::Number(n) => n.to_string() == want,
        Value::Array(items) => items.iter().any(|item| claim_matches(item, want)),
        _ => false,
    }
}

/// A token presented with a request, and whether it came as the `bearer`
/// subprotocol (the 101 must then answer `Sec-WebSocket-Protocol: bearer`).
#[derive(Debug, PartialEq)]
pub struct Presented {
    pub token: String,
    pub via_subprotocol: bool,
}

/// Finds the token: `Authorization: Bearer`, then the subprotocol pair
/// `bearer, JWT`, then the `token` query parameter.
pub fn presented_token(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<Presented> {
    let from_header = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    if let Some(token) = from_header.filter(|t| !t.is_empty()) {
        return Some(Presented {
            token,
            via_subprotocol: false,
        });
    }
    let from_protocol = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .skip_while(|p| !p.eq_ignore_ascii_case("bearer"))
        .nth(1)
        .filter(|t| !t.is_empty());
    if let Some(token) = from_protocol {
        return Some(Presented {
            token: token.to_owned(),
            via_subprotocol: true,
        });
    }
    query
        .get("token")
        .filter(|t| !t.is_empty())
        .map(|token| Presented {
            token: token.clone(),
            via_subprotocol: false,
        })
}

/// Signs an HS256 token for `pgrelay token` and the demo.
pub fn mint(
    secret: &str,
    sub: &str,
    role: Option<&str>,
    ttl: Duration,
) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(sub.to_owned()));
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs()).into());
    claims.insert("token_type".into(), "access".into());
    if let Some(role) = role {
        claims.insert("role".into(), role.into());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(AuthError::Sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret";

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig {
            key: KeySource::Secret(SECRET.into()),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            admin_claims: vec![
                "role=super_admin".parse().expect("claim"),
                "is_superuser=true".parse().expect("claim"),
            ],
        })
        .expect("verifier")
    }

    fn sign(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    fn in_an_hour() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600
    }

    fn check(claims: Value, want: Result<(&str, bool), &str>) {
        let got = verifier().verify(&sign(claims.clone()));
        match (got, want) {
            (Ok(id), Ok((user, admin))) => {
                assert_eq!((id.user.as_str(), id.admin), (user, admin), "{claims}")
            }
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{claims}: {e}"),
            (got, want) => panic!("{claims}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn claims() {
        let exp = in_an_hour();
        check(
            serde_json::json!({"sub": "42", "exp": exp}),
            Ok(("42", false)),
        );
        check(
            serde_json::json!({"sub": 42, "exp": exp}),
            Ok(("42", false)),
        );
        check(
            serde_json::json!({"user_id": 7, "exp": exp, "token_type": "access", "jti": "x"}),
            Ok(("7", false)),
        );
        check(
            serde_json::json!({"sub": "1", "exp": exp, "role": "super_admin"}),
            Ok(("1", true)),
        );
        check(
            serde_json::json!({"sub": "1", "exp": exp, "is_superuser": true}),
            Ok(("1", true)),
        );
        check(
            serde_json::json!({"sub": "1", "exp": exp, "role": "owner"}),
            Ok(("1", false)),
        );
        check(
            serde_json::json!({"sub": "1"}),
            Err("missing required claim exp"),
        );
        check(serde_json::json!({"sub": "1", "exp": 1000}), Err("expired"));
        check(serde_json::json!({"exp": exp}), Err("no user id"));
        check(
            serde_json::json!({"user_id": 7, "exp": exp, "token_type": "refresh"}),
            Err("token_type"),
        );
    }

    #[test]
    fn wrong_key_and_none_are_refused() {
        let exp = in_an_hour();
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "1", "exp": exp}),
            &EncodingKey::from_secret(b"other"),
        )
        .expect("sign");
        assert!(verifier().verify(&other).is_err());
        // alg "none": header {"alg":"none"}, empty signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIxIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(verifier().verify(none).is_err());
        assert!(verifier().verify("garbage").is_err());
    }

    #[test]
    fn minted_tokens_verify() {
        let token = mint(SECRET, "9", Some("super_admin"), Duration::from_secs(60)).expect("mint");
        let id = verifier().verify(&token).expect("valid");
        assert_eq!((id.user.as_str(), id.admin), ("9", true));
    }

    #[test]
    fn token_sources() {
        let mut headers = HeaderMap::new();
        let mut query = HashMap::new();
        assert_eq!(presented_token(&headers, &query), None);
        query.insert("token".to_owned(), "q".to_owned());
        assert_eq!(
            presented_token(&headers, &query).map(|p| p.token),
            Some("q".into())
        );
        headers.insert(SEC_WEBSOCKET_PROTOCOL, "bearer, p".parse().expect("header"));
        assert_eq!(
            presented_token(&headers, &query),
            Some(Presented {
                token: "p".into(),
                via_subprotocol: true
            })
        );
        headers.insert(AUTHORIZATION, "Bearer h".parse().expect("header"));
        assert_eq!(
            presented_token(&headers, &query).map(|p| p.token),
            Some("h".into())
        );
        headers.insert(AUTHORIZATION, "Basic x".parse().expect("header"));
        assert_eq!(
            presented_token(&headers, &query).map(|p| p.token),
            Some("p".into())
        );
    }
}
