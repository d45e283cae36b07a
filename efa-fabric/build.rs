//! Derives the libfabric API cfgs from the headers `efa-ffi` was built against
//! (`DEP_FABRIC_VERSION_MAJOR` / `_MINOR`, set by efa-ffi's build script).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fi_v2)");
    let major: u32 = std::env::var("DEP_FABRIC_VERSION_MAJOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("efa-ffi did not report DEP_FABRIC_VERSION_MAJOR");
    if major >= 2 {
        println!("cargo:rustc-cfg=fi_v2");
    }
}
