//! weft injector.
fn main() {}
