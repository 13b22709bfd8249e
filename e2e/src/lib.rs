//! weft e2e harness.
