//! `include/efa.h` is what cbindgen generates from this crate today: fails when the
//! checked-in header is stale (after a change to an exported function, type or doc comment).
//! `EFA_BLESS=1 cargo test -p efa-capi --test header` rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let fresh = String::from_utf8(out).expect("UTF-8 header");
    let path = dir.join("include/efa.h");
    if std::env::var_os("EFA_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/efa.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is stale: regenerate it with `EFA_BLESS=1 cargo test -p efa-capi --test header` and commit it",
        path.display()
    );
    // The generated header names every exported function (a sanity check that cbindgen saw
    // the modules at all).
    for f in [
        "efa_init",
        "efa_allreduce",
        "efa_waitany",
        "efa_win_create",
        "efa_route",
        "efa_strerror",
    ] {
        assert!(
            fresh.contains(&format!("{f}(")),
            "{f} missing from the header"
        );
    }
}
