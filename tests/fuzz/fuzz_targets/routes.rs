//! `--route` values: parsing never panics, and what parses prints back to
//! the same routes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::route::Routes;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let specs: Vec<&str> = text.split('\n').collect();
    if let Ok(routes) = Routes::parse(&specs) {
        let printed: Vec<String> = routes.to_string().split(' ').map(str::to_owned).collect();
        let again = Routes::parse(&printed).expect("printed routes parse");
        assert_eq!(again, routes);
    }
});
