//! The module graph of a crate, read from its sources, and a check that it has no cycles.
//!
//! Shared by `efa-fabric/tests/module_graph.rs` and `efa-core/tests/module_graph.rs`
//! (included with `#[path]`). A module is a file: `src/x.rs` (or `src/x/mod.rs`) is `x`,
//! `src/x/y.rs` is `x::y`; `lib.rs`, `main.rs` and `src/bin` are not modules. An edge
//! `a -> b` is any `crate::b...` path in `a`'s code outside comments and its
//! `#[cfg(test)]` module (the longest prefix that names a module: `crate::x::y::T` is an
//! edge to `x::y`): `use` lines, grouped `use crate::{b::X, c}` and fully qualified paths in
//! expressions or attributes alike. A path through a crate-root re-export (`crate::Error`,
//! with `pub use error::Error` in `lib.rs`) counts as an edge to the module that defines it.
//! `super::` paths (a submodule and its parent) are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// `module -> (module it uses -> lines where it does)`.
pub type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// The code of a file without comments, string literals and its `#[cfg(test)] mod tests`.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests") {
        Some(i) => &src[..i],
        None => src,
    };
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i < b.len() && !b[i..].starts_with(b"*/") {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A string literal: its text is not code (raw strings never contain `crate::`
            // in this codebase; a normal literal may hold escaped quotes).
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                } else if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal such as '"' or '\n' (not a lifetime).
            let end = src[i + 1..].find('\'').map_or(b.len(), |e| i + 2 + e);
            i = end;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The items of a `{ ... }` group starting at `s` (after the `{`), trimmed, e.g.
/// `b::{X, Y}` and `Delta as D`.
fn group_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut depth = 1;
    let mut item = String::new();
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    items
        .into_iter()
        .map(|i| i.trim().to_string())
        .filter(|i| !i.is_empty())
        .collect()
}

/// The leading module-like segments (`a`, `a::b`) of `path`, e.g. `coll::error` of
/// `coll::error::CollError`; an item's name may end it.
fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(|seg| {
            seg.trim()
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
                .to_string()
        })
        .take_while(|seg| !seg.is_empty())
        .collect()
}

/// The `crate::` paths in `code` (as segment lists), with their line numbers.
fn crate_paths(code: &str) -> Vec<(Vec<String>, usize)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            // `$crate::` in macros and identifiers ending in `crate` are not paths of this crate.
            let before = rest[..i].chars().last();
            let after = &rest[i + "crate::".len()..];
            rest = after;
            if matches!(before, Some(c) if c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            if after.starts_with('{') {
                // A group may span lines: read on through the whole code from here.
                let at = code.lines().take(n).map(|l| l.len() + 1).sum::<usize>()
                    + (line.len() - after.len())
                    + 1;
                for item in group_items(&code[at..]) {
                    found.push((segments(&item), n + 1));
                }
            } else {
                let path: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let segs = segments(&path);
                if !segs.is_empty() {
                    found.push((segs, n + 1));
                }
            }
        }
    }
    found
}

/// Reads the module graph of the crate whose sources are in `src`.
pub fn read(src: &Path) -> Graph {
    // Modules, one per file: src/x.rs or src/x/mod.rs is `x`, src/x/y.rs is `x::y`; the
    // crate root and binaries are none.
    let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading a source directory") {
            let path = entry.expect("reading a source directory").path();
            let rel = path.strip_prefix(src).unwrap_or(&path).with_extension("");
            let rel = rel.to_string_lossy().replace('/', "::");
            if path.is_dir() {
                if rel != "bin" {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|x| x == "rs") && rel != "lib" && rel != "main" {
                let name = rel.strip_suffix("::mod").unwrap_or(&rel).to_string();
                files.entry(name).or_default().push(path);
            }
        }
    }

    // Crate-root re-exports: `pub use m::{A, B};` and `pub use m::A;` map A and B to m.
    let lib = code_of(&std::fs::read_to_string(src.join("lib.rs")).expect("reading lib.rs"));
    let mut reexport: BTreeMap<String, String> = BTreeMap::new();
    for stmt in lib.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let path = path
            .trim_start_matches("crate::")
            .trim_start_matches("self::");
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        if !files.contains_key(module) {
            continue;
        }
        let module = module.to_string();
        let items = items.trim();
        let names: Vec<String> = match items.strip_prefix('{') {
            Some(g) => group_items(g),
            None => vec![items.to_string()],
        };
        for item in names {
            // The name the crate root gives it: `D` of `Delta as D`, `X` of `x::X`.
            let name = match item.split_once(" as ") {
                Some((_, alias)) => alias.trim().to_string(),
                None => item.rsplit("::").next().unwrap_or("").trim().to_string(),
            };
            reexport.insert(name, module.clone());
        }
    }

    let mut graph = Graph::new();
    for (module, paths) in &files {
        let deps = graph.entry(module.clone()).or_default();
        for path in paths {
            let code = code_of(&std::fs::read_to_string(path).expect("reading a source file"));
            let file = path.strip_prefix(src).unwrap_or(path).display().to_string();
            for (segs, line) in crate_paths(&code) {
                // The longest prefix that is a module; else a crate-root re-export.
                let target = (1..=segs.len())
                    .rev()
                    .map(|k| segs[..k].join("::"))
                    .find(|m| files.contains_key(m))
                    .or_else(|| reexport.get(&segs[0]).cloned());
                let Some(target) = target else {
                    continue;
                };
                if &target != module {
                    deps.entry(target)
                        .or_default()
                        .push(format!("src/{file}:{line}"));
                }
            }
        }
    }
    graph
}

/// The strongly connected components of more than one module (each one is a cycle or a knot
/// of cycles), each sorted, in sorted order.
pub fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    // Two modules are in one component when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for d in graph.get(&m).into_iter().flat_map(|d| d.keys()) {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for m in graph.keys() {
        let comp: BTreeSet<String> = graph
            .keys()
            .filter(|o| reaches[m].contains(*o) && reaches[*o].contains(m))
            .cloned()
            .collect();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

/// Panics, listing each cycle's edges with the lines that make them, unless every cycle of
/// the crate in `src` is one of `allowed`. Prints an allowed cycle that no longer exists so
/// that its entry can be removed.
pub fn assert_acyclic(src: &Path, allowed: &[&[&str]]) {
    let graph = read(src);
    let found = cycles(&graph);
    let allowed: Vec<BTreeSet<String>> = allowed
        .iter()
        .map(|c| c.iter().map(|s| s.to_string()).collect())
        .collect();
    let mut report = String::new();
    for comp in &found {
        if allowed.contains(comp) {
            continue;
        }
        let names: Vec<&str> = comp.iter().map(String::as_str).collect();
        writeln!(report, "cycle among {{{}}}:", names.join(", ")).unwrap();
        for a in comp {
            for (b, lines) in &graph[a] {
                if comp.contains(b) {
                    writeln!(report, "  {a} -> {b}  ({})", lines.join(", ")).unwrap();
                }
            }
        }
    }
    for a in &allowed {
        if !found.contains(a) {
            eprintln!("note: the allowed cycle {a:?} is gone; remove it from the list");
        }
    }
    assert!(
        report.is_empty(),
        "module cycles (move the shared types into a leaf module that imports nothing above \
         it):\n{report}"
    );
}
