//! The sidecar binary as built: what its link flags (`proxy/build.rs`)
//! promise is in the file.

use std::process::Command;

/// The dynamic section as `readelf -d` prints it (binutils).
fn dynamic_section(bin: &str) -> String {
    let out = Command::new("readelf")
        .args(["-d", "-W", bin])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -d {bin}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A number `readelf -d` prints for `tag`, such as `(RELASZ) 3672 (bytes)`.
fn entry(dynamic: &str, tag: &str) -> Option<u64> {
    dynamic
        .lines()
        .find(|l| l.contains(&format!("({tag})")))
        .and_then(|l| l.split(')').nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        })
}

/// The relative relocations the loader applies at start are packed
/// (DT_RELR): without it the table is about 380 KB, resident in every
/// pod; with it, a few KB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn relative_relocations_are_packed() {
    let bin = env!("CARGO_BIN_EXE_weft-proxy");
    let dynamic = dynamic_section(bin);
    let relr =
        entry(&dynamic, "RELRSZ").unwrap_or_else(|| panic!("no DT_RELR in {bin}:\n{dynamic}"));
    let rela = entry(&dynamic, "RELASZ").unwrap_or(0);
    eprintln!("{bin}: RELRSZ {relr} bytes, RELASZ {rela} bytes");
    assert!(
        rela < 64 * 1024,
        "{rela} bytes of RELA relocations left beside the packed ones"
    );
}

/// The sidecar reads `proxy.json.gz` with flate2's zlib-rs back end, which
/// flate2 takes without its `std` feature; without `std`, zlib-rs never
/// detects the CPU's vector instructions and runs CRC-32, inflate and
/// deflate on their portable paths (gunzip of a 20 MiB config 8.5 ms
/// instead of 4.8). The build the workspace resolves has it on.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn zlib_rs_is_built_with_std_for_its_vector_paths() {
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(&cargo)
        .args(["metadata", "--offline", "--format-version", "1"])
        .args(["--manifest-path", manifest, "--filter-platform", &platform])
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {out:?}");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let nodes = meta["resolve"]["nodes"]
        .as_array()
        .expect("a resolve graph");
    let zlib = nodes
        .iter()
        .find(|n| {
            n["id"]
                .as_str()
                .is_some_and(|id| id.contains("zlib-rs@") || id.contains("zlib-rs "))
        })
        .expect("zlib-rs is in the build");
    let features: Vec<&str> = zlib["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(features.contains(&"std"), "zlib-rs features: {features:?}");
}
