//! (being written) pgrelay-bench: load generator.
fn main() {}
