//! weftctl.
fn main() {}
