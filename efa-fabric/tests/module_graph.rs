//! The modules of efa-fabric form no import cycle: each module only uses modules below it,
//! and small shared types (such as sockaddr parsing) live in leaf modules.

#[path = "support/module_graph.rs"]
mod module_graph;

use std::path::Path;

#[test]
fn efa_fabric_modules_are_acyclic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    module_graph::assert_acyclic(&src, &[]);
}

/// The leaf modules import nothing of this crate; `remote` only the errors.
#[test]
fn shared_types_live_in_leaf_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph::read(&src);
    for (module, allowed) in [
        ("addr", &[][..]),
        ("error", &["addr"][..]),
        ("remote", &["error"][..]),
    ] {
        let deps: Vec<&String> = graph
            .get(module)
            .unwrap_or_else(|| panic!("no module {module}"))
            .keys()
            .collect();
        assert!(
            deps.iter().all(|d| allowed.contains(&d.as_str())),
            "{module} imports {deps:?}"
        );
    }
}

/// The checker itself finds cycles through grouped `use`, fully qualified paths and
/// crate-root re-exports, and ignores comments, strings and test modules.
#[test]
fn the_checker_sees_every_kind_of_path() {
    let dir = std::env::temp_dir().join(format!("efa-module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("d")).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod e;\npub use c::{Gamma, Delta as D};\n",
    );
    // a -> b through a nested group, b -> c through a fully qualified path, c -> a through a
    // crate-root re-export of a's type (made up: lib.rs re-exports only c and d here), so
    // c -> c is no edge; d/inner.rs (module d::inner) -> c through the crate-root re-export
    // of c's type; e -> d::inner through a path to the submodule.
    write("a.rs", "use crate::{\n    b::{X, Y},\n    self as _,\n};\n// crate::d::Z in a comment\nconst S: &str = \"crate::d\";\n");
    write(
        "b.rs",
        "fn f() -> crate::c::Gamma { todo() }\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\n",
    );
    write(
        "c.rs",
        "pub struct Gamma;\npub struct Delta;\nuse crate::Delta as _;\nfn g(_: crate::a::A) {}\n",
    );
    write("d/mod.rs", "mod inner;\n");
    write("d/inner.rs", "use crate::D;\n");
    write("e.rs", "fn f() -> crate::d::inner::Z { z() }\n");
    let graph = module_graph::read(&dir);
    let deps = |m: &str| graph[m].keys().cloned().collect::<Vec<_>>();
    assert_eq!(deps("a"), ["b"]);
    assert_eq!(deps("b"), ["c"]);
    assert_eq!(deps("c"), ["a"]);
    assert!(graph["d"].is_empty());
    assert_eq!(deps("d::inner"), ["c"]);
    assert_eq!(deps("e"), ["d::inner"]);
    let cycles = module_graph::cycles(&graph);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert_eq!(cycles[0].iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    let r = std::panic::catch_unwind(|| module_graph::assert_acyclic(&dir, &[]));
    let msg = *r.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.contains("a -> b  (src/a.rs:1)"), "{msg}");
    assert!(msg.contains("c -> a  (src/c.rs:4)"), "{msg}");
    module_graph::assert_acyclic(&dir, &[&["a", "b", "c"]]);
    std::fs::remove_dir_all(&dir).unwrap();
}
