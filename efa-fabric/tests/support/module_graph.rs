//! The module graph of a crate, read from its sources, and a check that it has no cycles.
//!
//! Shared by `efa-fabric/tests/module_graph.rs` and `efa-core/tests/module_graph.rs`
//! (included with `#[path]`). A module is a top-level file `src/x.rs` or directory
//! `src/x/` (its submodules belong to it); `lib.rs`, `main.rs` and `src/bin` are not modules.
//! An edge `a -> b` is any `crate::b...` path in `a`'s code outside comments and its
//! `#[cfg(test)]` module: `use` lines, grouped `use crate::{b::X, c}` and fully qualified
//! paths in expressions or attributes alike. A path through a crate-root re-export
//! (`crate::Error`, with `pub use error::Error` in `lib.rs`) counts as an edge to the module
//! that defines it.

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

/// The first path segment of `item` (`b` of `b::{X, Y}`, `Delta` of `Delta as D`).
fn head(item: &str) -> String {
    item.split("::")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The names `crate::` paths in `code` start with, with their line numbers.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
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
                    found.push((head(&item), n + 1));
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((name, n + 1));
                }
            }
        }
    }
    found
}

/// Reads the module graph of the crate whose sources are in `src`.
pub fn read(src: &Path) -> Graph {
    // Modules: src/x.rs and src/x/ (with mod.rs), except the crate root and binaries.
    let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("reading src/") {
        let path = entry.expect("reading src/").path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name == "bin" {
                continue;
            }
            let mut all = Vec::new();
            let mut stack = vec![path];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).expect("reading a module directory") {
                    let p = e.expect("reading a module directory").path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        all.push(p);
                    }
                }
            }
            files.entry(name).or_default().extend(all);
        } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            files.entry(name).or_default().push(path);
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
            reexport.insert(name, module.to_string());
        }
    }

    let mut graph = Graph::new();
    for (module, paths) in &files {
        let deps = graph.entry(module.clone()).or_default();
        for path in paths {
            let code = code_of(&std::fs::read_to_string(path).expect("reading a source file"));
            let file = path.strip_prefix(src).unwrap_or(path).display().to_string();
            for (head, line) in crate_paths(&code) {
                let target = if files.contains_key(&head) {
                    head
                } else if let Some(m) = reexport.get(&head) {
                    m.clone()
                } else {
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
