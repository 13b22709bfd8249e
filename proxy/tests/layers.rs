//! The proxy's layering (decision 22 of `docs/architecture.md`): no file of
//! `proxy/src` imports a file that imports it back, directly or through
//! others. Read from the source text: every `crate::…`, `super::…` and
//! child-module path outside comments and test modules is an import of
//! the deepest file that path names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["client", "connect"]`) → file.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            if parts == ["main"] {
                continue;
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The code of a file that imports: no comments, no `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths starting with `root::` in `code`, as segment lists, with brace
/// groups (`root::a::{b, c::d}`) expanded one level.
fn paths(code: &str, root: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let needle = format!("{root}::");
    let mut from = 0;
    while let Some(i) = code[from..].find(&needle) {
        let at = from + i;
        from = at + needle.len();
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| ident(c) || c == ':')
        {
            continue;
        }
        let mut segs = Vec::new();
        let rest = &code[from..];
        let mut pos = 0;
        loop {
            let seg: String = rest[pos..].chars().take_while(|c| ident(*c)).collect();
            if seg.is_empty() {
                break;
            }
            pos += seg.len();
            segs.push(seg);
            if rest[pos..].starts_with("::") {
                pos += 2;
            } else {
                break;
            }
        }
        if rest[pos..].starts_with('{') {
            let close = rest[pos..].find('}').map_or(rest.len(), |c| pos + c);
            for item in rest[pos + 1..close].split(',') {
                let first: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.chars().take_while(|c| ident(*c)).collect::<String>())
                    .filter(|s| !s.is_empty())
                    .collect();
                let mut p = segs.clone();
                p.extend(first);
                out.push(p);
            }
        } else {
            out.push(segs);
        }
    }
    out
}

/// The deepest known module a path names.
fn target(mods: &BTreeMap<Vec<String>, PathBuf>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| mods.contains_key(p))
}

#[test]
fn no_file_of_the_proxy_imports_a_file_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &mods {
        let text = std::fs::read_to_string(file).expect("read source");
        let code = code(&text);
        let is_dir_module = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        // `super` of a `mod.rs` is its directory's parent; of `a/b.rs`, `a`.
        let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
        let mut imports: Vec<Vec<String>> = paths(&code, "crate");
        for p in paths(&code, "super") {
            let mut full = parent.clone();
            full.extend(p);
            imports.push(full);
        }
        // A directory module naming its children (`routes::RouteTable`).
        if is_dir_module {
            for child in mods
                .keys()
                .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
            {
                let name = child.last().expect("child name");
                for p in paths(&code, name) {
                    let mut full = child.clone();
                    full.extend(p);
                    imports.push(full);
                }
            }
        }
        for p in imports {
            if let Some(t) = target(&mods, &p).filter(|t| t != module && !t.is_empty()) {
                edges.entry(module.clone()).or_default().insert(t);
            }
        }
    }
    // Sanity: the reader sees the imports the layering is about.
    let sees = |a: &[&str], b: &[&str]| {
        let a: Vec<String> = a.iter().map(|s| (*s).to_owned()).collect();
        let b: Vec<String> = b.iter().map(|s| (*s).to_owned()).collect();
        edges.get(&a).is_some_and(|e| e.contains(&b))
    };
    assert!(sees(&["app"], &["outbound"]), "{edges:#?}");
    assert!(sees(
        &["outbound", "http", "endpoint"],
        &["client", "connect"]
    ));
    assert!(sees(&["snapshot"], &["snapshot", "routes"]));

    // Any cycle: a path from a file back to itself.
    let mut cycles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(Vec<String>, Vec<Vec<String>>)> =
            vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    cycles.push(
                        trail
                            .iter()
                            .chain([start])
                            .map(|m| m.join("::"))
                            .collect::<Vec<_>>()
                            .join(" -> "),
                    );
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
