//! NOTIFY payloads: anyone who can connect to the database can NOTIFY any
//! text on a channel pgrelay listens to. Decoding must never panic, and
//! whatever decodes is a positive id whose text is exactly the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::parse::parse_wakeup;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = std::str::from_utf8(data) else { return };
    if let Ok(id) = parse_wakeup(payload) {
        assert!(id > 0);
        assert_eq!(id.to_string(), payload);
    }
});
