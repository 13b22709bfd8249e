//! weft proxy (placeholder until the proxy core lands).
fn main() {}
