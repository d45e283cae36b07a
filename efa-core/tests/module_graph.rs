//! The modules of efa-core form no import cycle: `error` sits above the modules whose errors
//! it wraps, and the small types that several layers share (tags, RMA operations and access,
//! settings) live in leaf modules that import nothing of this crate.

#[path = "../../efa-fabric/tests/support/module_graph.rs"]
mod module_graph;

use std::path::Path;

/// Cycles allowed for now: none (`bootstrap <-> store` went with issue 12's "crate" change).
const ALLOWED: &[&[&str]] = &[];

#[test]
fn efa_core_modules_are_acyclic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    module_graph::assert_acyclic(&src, ALLOWED);
}

/// The leaf modules import nothing of this crate.
#[test]
fn shared_types_live_in_leaf_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph::read(&src);
    for leaf in ["tag", "rma", "setting", "wire", "coll::error"] {
        let deps = graph
            .get(leaf)
            .unwrap_or_else(|| panic!("no module {leaf}"));
        assert!(deps.is_empty(), "{leaf} imports {deps:?}");
    }
}
