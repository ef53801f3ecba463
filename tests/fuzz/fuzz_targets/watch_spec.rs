//! `--watch` values: parsing never panics, and what parses prints back to
//! the same spec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::install::WatchSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = text.parse::<WatchSpec>() {
        let again: WatchSpec = spec.to_string().parse().expect("printed spec parses");
        assert_eq!(again, spec);
    }
});
