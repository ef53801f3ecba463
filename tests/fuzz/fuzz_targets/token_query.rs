//! What a client controls before the upgrade: the query string, the
//! Authorization and Sec-WebSocket-Protocol headers, and the token itself.
//! None of it may panic, and a random token must never verify.
#![no_main]

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use libfuzzer_sys::fuzz_target;
use pgrelay::auth::{presented_token, AuthConfig, KeySource, Verifier};
use pgrelay::server::query_params;
use pgrelay::wire::Resume;
use std::sync::OnceLock;
use std::time::Duration;

static VERIFIER: OnceLock<Verifier> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let verifier = VERIFIER.get_or_init(|| {
        Verifier::new(&AuthConfig {
            key: KeySource::Secret("fuzz-secret".into()),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            admin_claims: vec!["role=super_admin".parse().expect("claim")],
        })
        .expect("verifier")
    });
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let query = parts.next().unwrap_or_default();
    let authorization = parts.next().unwrap_or_default();
    let protocol = parts.next().unwrap_or_default();
    let query = query_params(Some(query));
    let _ = Resume::from_query(&query);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(authorization) {
        headers.insert(AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(protocol) {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, v);
    }
    if let Some(presented) = presented_token(&headers, &query) {
        assert!(verifier.verify(&presented.token).is_err(), "a fuzzed token verified");
    }
});
