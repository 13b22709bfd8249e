//! Link flags of the proxy's binaries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // The sidecar is a position-independent executable: the dynamic
        // loader applies some 16,000 relative relocations at start, read
        // from a 380 KB table that then stays resident in every meshed
        // pod. Packed (DT_RELR, glibc 2.36 and later: the image's Debian
        // 12 has 2.36), the table is a few KB (docs/architecture.md).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
