//! What a client controls at a stream's door and what an operator writes
//! in `--stream`: the request path (stream name and percent-encoded key)
//! and an SSE `Last-Event-ID`. None of it may panic; a path names an
//! endpoint only with a key of 1 to `MAX_KEY_BYTES` bytes; a stream spec
//! that parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::route::Stream;
use pgrelay::wire::{Endpoint, Resume, MAX_KEY_BYTES};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let spec = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let last_event_id = parts.next().unwrap_or_default();
    let streams: Vec<Stream> = match spec.parse::<Stream>() {
        Ok(stream) => {
            let again: Stream = stream.to_string().parse().expect("printed stream parses");
            assert_eq!(again, stream);
            vec![stream]
        }
        Err(_) => vec!["businesses=business_events:id".parse().expect("stream")],
    };
    if let Some((_, Endpoint::Stream { key, .. })) = Endpoint::from_path(path, &streams) {
        assert!(!key.is_empty() && key.len() <= MAX_KEY_BYTES);
    }
    if let Ok(resume) = Resume::from_last_event_id(last_event_id) {
        assert!(resume.last_id >= 0);
    }
});
