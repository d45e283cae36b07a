//! Build script for `efa-ffi`.
//!
//! 1. Locate libfabric: `LIBFABRIC_DIR` (a prefix with `include/` and `lib/` or `lib64/`) wins;
//!    then pkg-config; then `/opt/amazon/efa` (the AWS EFA installer's prefix); then `/usr`.
//! 2. Read `FI_MAJOR_VERSION`/`FI_MINOR_VERSION` from `rdma/fabric.h` and emit cfgs for the API
//!    differences (`fi_v2` for libfabric 2.x headers), plus `DEP_FABRIC_*` metadata so that
//!    dependents can derive the same cfgs.
//! 3. Run bindgen over `wrapper.h` with an `fi_*`/`FI_*` allowlist. libfabric's data path is
//!    `static inline` in its headers, so bindgen also writes a C shim with one exported wrapper
//!    per inline function (`<name>__efa_shim`), which is compiled here with `cc` and linked
//!    into this crate. Rust code calls the inline functions by their own names.

use std::env;
use std::path::{Path, PathBuf};

struct Libfabric {
    include_dirs: Vec<PathBuf>,
    link_dirs: Vec<PathBuf>,
    /// Where it was found, for error messages.
    source: &'static str,
}

fn has_header(dir: &Path) -> bool {
    dir.join("rdma").join("fabric.h").is_file()
}

fn prefix_layout(prefix: &Path, source: &'static str) -> Option<Libfabric> {
    let inc = prefix.join("include");
    if !has_header(&inc) {
        return None;
    }
    let link_dirs = [
        "lib",
        "lib64",
        "lib/x86_64-linux-gnu",
        "lib/aarch64-linux-gnu",
    ]
    .iter()
    .map(|d| prefix.join(d))
    .filter(|d| d.is_dir())
    .collect();
    Some(Libfabric {
        include_dirs: vec![inc],
        link_dirs,
        source,
    })
}

fn locate() -> Libfabric {
    println!("cargo:rerun-if-env-changed=LIBFABRIC_DIR");
    if let Some(dir) = env::var_os("LIBFABRIC_DIR") {
        let dir = PathBuf::from(dir);
        return prefix_layout(&dir, "LIBFABRIC_DIR").unwrap_or_else(|| {
            panic!(
                "LIBFABRIC_DIR={} has no include/rdma/fabric.h; point it at a libfabric install prefix",
                dir.display()
            )
        });
    }
    if let Ok(lib) = pkg_config::Config::new()
        .atleast_version("1.17")
        .cargo_metadata(false)
        .probe("libfabric")
    {
        let mut include_dirs = lib.include_paths.clone();
        if include_dirs.is_empty() {
            include_dirs.push(PathBuf::from("/usr/include"));
        }
        if include_dirs.iter().any(|d| has_header(d)) {
            return Libfabric {
                include_dirs,
                link_dirs: lib.link_paths,
                source: "pkg-config",
            };
        }
    }
    for (prefix, source) in [("/opt/amazon/efa", "/opt/amazon/efa"), ("/usr", "/usr")] {
        if let Some(found) = prefix_layout(Path::new(prefix), source) {
            return found;
        }
    }
    panic!(
        "libfabric headers not found (tried LIBFABRIC_DIR, pkg-config libfabric >= 1.17, \
         /opt/amazon/efa, /usr). On Debian/Ubuntu: apt-get install libfabric-dev pkg-config \
         libclang-dev; or set LIBFABRIC_DIR to the install prefix."
    );
}

fn version_define(header: &str, name: &str) -> u32 {
    header
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define"))
        .filter_map(|rest| {
            let mut it = rest.split_whitespace();
            (it.next() == Some(name)).then(|| it.next()).flatten()
        })
        .find_map(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not found in rdma/fabric.h"))
}

fn main() {
    let lf = locate();
    let fabric_h = lf
        .include_dirs
        .iter()
        .map(|d| d.join("rdma/fabric.h"))
        .find(|p| p.is_file())
        .expect("fabric.h located above");
    println!("cargo:rerun-if-changed={}", fabric_h.display());
    println!("cargo:rerun-if-changed=wrapper.h");
    let header = std::fs::read_to_string(&fabric_h).expect("read fabric.h");
    let major = version_define(&header, "FI_MAJOR_VERSION");
    let minor = version_define(&header, "FI_MINOR_VERSION");

    // API-difference cfgs, derived from the headers we compile against.
    println!("cargo::rustc-check-cfg=cfg(fi_v2)");
    println!("cargo::rustc-check-cfg=cfg(fi_ge_1_18)");
    if major >= 2 {
        println!("cargo:rustc-cfg=fi_v2");
    }
    if major >= 2 || minor >= 18 {
        println!("cargo:rustc-cfg=fi_ge_1_18");
    }
    // Metadata for dependents: DEP_FABRIC_VERSION_MAJOR / _MINOR / _INCLUDE.
    println!("cargo:version_major={major}");
    println!("cargo:source={}", lf.source);
    println!("cargo:version_minor={minor}");
    println!(
        "cargo:include={}",
        env::join_paths(&lf.include_dirs).unwrap().to_string_lossy()
    );

    for d in &lf.link_dirs {
        println!("cargo:rustc-link-search=native={}", d.display());
    }
    println!("cargo:rustc-link-lib=dylib=fabric");

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let shim_stem = out.join("efa_shim");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let wrapper = manifest.join("wrapper.h");

    let mut builder = bindgen::Builder::default()
        .header(wrapper.to_string_lossy())
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*")
        .blocklist_function("fi_.*_rtrn_.*")
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .layout_tests(true)
        .generate_comments(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&shim_stem)
        .wrap_static_fns_suffix("__efa_shim")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for d in &lf.include_dirs {
        builder = builder.clang_arg(format!("-I{}", d.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen failed on libfabric headers");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");

    let shim_c = shim_stem.with_extension("c");
    let shim_src = std::fs::read_to_string(&shim_c).expect("read shim");
    let names = shim_names(&shim_src);

    // A table mapping each wrapped name to its wrapper's address, compiled into the shim. The
    // linkage tests compare it with the address that each Rust binding resolves to.
    let mut table = String::from("#include <stddef.h>\n");
    for n in &names {
        table.push_str(&format!("extern void {n}__efa_shim(void);\n"));
    }
    table.push_str("const struct { const char *name; void (*fn)(void); } efa_shim_table[] = {\n");
    for n in &names {
        table.push_str(&format!("  {{ \"{n}\", {n}__efa_shim }},\n"));
    }
    table.push_str("  { NULL, NULL }\n};\n");
    let table_c = out.join("efa_shim_table.c");
    std::fs::write(&table_c, table).expect("write shim table");

    // One generated #[test] per wrapped function (included by tests/linkage.rs).
    let mut tests = String::new();
    for n in &names {
        tests.push_str(&format!(
            "#[test]\nfn {n}() {{ check(\"{n}\", efa_ffi::{n} as *const () as usize); }}\n"
        ));
    }
    std::fs::write(out.join("shim_linkage_tests.rs"), tests).expect("write linkage tests");
    std::fs::write(out.join("shim_names.txt"), names.join("\n")).expect("write shim names");

    let mut cc = cc::Build::new();
    cc.file(&shim_c)
        .file(&table_c)
        .include(&manifest)
        .warnings(false)
        .flag_if_supported("-Wno-unused-parameter");
    for d in &lf.include_dirs {
        cc.include(d);
    }
    cc.compile("efa_shim");
}

/// The inline functions that bindgen wrapped, from the generated shim's definitions.
fn shim_names(src: &str) -> Vec<String> {
    src.lines()
        .filter_map(|l| l.split_once("__efa_shim(").map(|(head, _)| head))
        .filter_map(|head| {
            head.rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}
