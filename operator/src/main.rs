//! weft operator.
fn main() {}
