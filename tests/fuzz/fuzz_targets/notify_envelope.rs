//! NOTIFY payloads: anyone who can connect to the database can NOTIFY any
//! text on a channel pgrelay listens to. Decoding must never panic, and
//! whatever decodes must route and render without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::parse::{parse_notification, Notice};
use pgrelay::route::Routes;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (channel, payload) = text.split_once('\n').unwrap_or(("business_events", text));
    if let Ok(Notice::Full(event)) = parse_notification(channel, payload) {
        let routes = Routes::parse::<&str>(&[]).expect("default routes");
        let _ = routes.route(&event);
        let frame = event.frame();
        assert!(serde_json_is_object(&frame));
    }
});

fn serde_json_is_object(frame: &str) -> bool {
    frame.starts_with('{') && frame.ends_with('}')
}
