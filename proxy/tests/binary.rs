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
