//! Calls `fi_getinfo` for every provider that libfabric reports on this machine.

use std::ffi::{CStr, CString};
use std::ptr;

use efa_ffi::*;

/// Provider names (as `fi_info` prints them, e.g. `tcp;ofi_rxm`) of every info returned for
/// the given provider filter (or all providers).
fn providers(prov: Option<&str>) -> Result<Vec<String>, i32> {
    // SAFETY: fi_allocinfo returns an owned, zeroed fi_info (or null); we check it, set the
    // provider name with a strdup'd string that fi_freeinfo frees, and free both lists.
    unsafe {
        let hints = fi_allocinfo();
        assert!(!hints.is_null(), "fi_allocinfo returned null");
        (*(*hints).ep_attr).type_ = FI_EP_RDM;
        if let Some(p) = prov {
            let c = CString::new(p).unwrap();
            (*(*hints).fabric_attr).prov_name = libc::strdup(c.as_ptr());
        }
        let mut info = ptr::null_mut();
        let ret = fi_getinfo(
            FI_HEADER_VERSION,
            ptr::null(),
            ptr::null(),
            0,
            hints,
            &mut info,
        );
        fi_freeinfo(hints);
        if ret != 0 {
            return Err(ret);
        }
        let mut out = Vec::new();
        let mut cur = info;
        while !cur.is_null() {
            let name = CStr::from_ptr((*(*cur).fabric_attr).prov_name);
            out.push(name.to_string_lossy().into_owned());
            cur = (*cur).next;
        }
        fi_freeinfo(info);
        Ok(out)
    }
}

#[test]
fn getinfo_on_each_provider_present() {
    let all = providers(None).expect("fi_getinfo with no provider filter failed");
    assert!(
        !all.is_empty(),
        "libfabric reported no FI_EP_RDM provider at all"
    );
    let mut names = all.clone();
    names.sort();
    names.dedup();
    for name in &names {
        let got = providers(Some(name))
            .unwrap_or_else(|e| panic!("fi_getinfo(prov_name={name}) failed: {e}"));
        assert!(!got.is_empty(), "{name}: no info");
        // A core provider filter also matches utility layers over it ("net" -> "net;ofi_rxm").
        assert!(
            got.iter().any(|g| g == name)
                && got
                    .iter()
                    .all(|g| g.split(';').any(|p| name.split(';').any(|n| n == p))),
            "{name}: filtered getinfo returned other providers: {got:?}"
        );
        println!("fi_getinfo ok: {name} ({} infos)", got.len());
    }
}

#[test]
fn unknown_provider_gives_enodata() {
    let err = providers(Some("no-such-provider")).unwrap_err();
    assert_eq!(err, -(FI_ENODATA as i32));
}

#[test]
fn strerror_and_version_link() {
    // SAFETY: fi_strerror returns a static NUL-terminated string; fi_version has no inputs.
    let (msg, version) = unsafe { (CStr::from_ptr(fi_strerror(FI_EAGAIN as i32)), fi_version()) };
    assert!(!msg.to_bytes().is_empty());
    assert!(
        version >= FI_VERSION(1, 17),
        "runtime libfabric older than 1.17: {version:#x}"
    );
}
