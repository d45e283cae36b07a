//! Every situation-specific error of efa-fabric, provoked through the public API: each test
//! matches the variant and its fields, so a caller can rely on them.

mod common;

use std::time::Duration;

use common::*;
use efa_fabric::{
    Access, Caps, Counter, Endpoint, Error, FiAddr, Hints, MrMode, RegisteredBuf, RemoteRegion,
};

const MSG_CAPS: Caps = Caps::MSG.union(Caps::TAGGED);

#[test]
fn send_to_an_address_not_in_the_av_is_unknown_peer() {
    for_each_provider("errors-unknown-peer", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        let never = FiAddr(4096);
        let err = pair.a.tsend(vec![1u8; 8], never, 1).unwrap_err();
        assert!(
            matches!(err.error, Error::UnknownPeer { op: "tsend", addr } if addr == never),
            "{:?}",
            err.error
        );
        assert_eq!(err.buf, Some(vec![1u8; 8]), "the buffer comes back");
        let err = pair.a.inject(&[1u8; 4], never).unwrap_err();
        assert!(
            matches!(err, Error::UnknownPeer { op: "inject", addr } if addr == never),
            "{err:?}"
        );
        // A removed address is unknown too.
        let c = pair.a.av().insert(&pair.b.name().unwrap()).unwrap();
        pair.a.av().remove(c).unwrap();
        let err = pair.a.send(vec![0u8; 4], c).unwrap_err();
        assert!(
            matches!(err.error, Error::UnknownPeer { op: "send", addr } if addr == c),
            "{:?}",
            err.error
        );
        assert!(err.error.to_string().contains("AddressVector::insert"));
        Outcome::Ran
    });
}

#[test]
fn inserting_an_empty_or_foreign_address_is_bad_address() {
    for_each_provider("errors-bad-address", MSG_CAPS, |info| {
        let ep = Endpoint::open(info).unwrap();
        let err = ep.av().insert(&[]).unwrap_err();
        assert!(
            matches!(&err, Error::BadAddress { len: 0, head } if head.is_empty()),
            "{err:?}"
        );
        assert!(err.to_string().contains("empty endpoint address"), "{err}");
        // Three bytes are no address of any provider here: either libfabric rejects the
        // call (FI_EINVAL) or inserts nothing; both are errors, never a panic.
        // shm addresses are names, so any bytes are one.
        match ep.av().insert(&[0xFF; 3]) {
            Err(Error::BadAddress { len: 3, head }) => assert_eq!(head, [0xFF; 3]),
            Err(Error::Call(c)) => assert_eq!(c.call, "fi_av_insert"),
            Ok(_) if info.provider() == "shm" => {}
            other => panic!(
                "a 3-byte address was accepted by {}: {other:?}",
                info.provider()
            ),
        }
        Outcome::Ran
    });
}

#[test]
fn a_short_remote_region_descriptor_is_rejected_with_both_lengths() {
    for got in [0, 5, RemoteRegion::WIRE_LEN - 1, RemoteRegion::WIRE_LEN + 1] {
        let err = RemoteRegion::from_bytes(&vec![0u8; got]).unwrap_err();
        assert!(
            matches!(err, Error::RemoteRegionLength { got: g, expected: RemoteRegion::WIRE_LEN } if g == got),
            "{err:?}"
        );
    }
    let r = RemoteRegion {
        addr: 1,
        key: 2,
        len: 3,
    };
    assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()).unwrap(), r);
}

#[test]
fn a_nul_in_a_hint_is_invalid_hint() {
    let err = Hints::new().provider("sh\0m").get().unwrap_err();
    assert!(
        matches!(&err, Error::InvalidHint { field: "provider", value } if value == "sh\0m"),
        "{err:?}"
    );
    let err = Hints::new().domain("lo\0").get().unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidHint {
                field: "domain",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn inject_above_inject_size_is_message_too_large() {
    for_each_provider("errors-inject-size", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        let max = pair.a.inject_size();
        let big = vec![0u8; max + 1];
        let err = pair.a.tinject(&big, pair.a_to_b, 3).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MessageTooLarge { op: "tinject", len, max: m, limit: efa_fabric::SizeLimit::Inject }
                    if len == max + 1 && m == max
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("inject_size") && text.contains("bytes"),
            "{text}"
        );
        Outcome::Ran
    });
}

/// Registration without an endpoint on a provider that needs one (`FI_MR_ENDPOINT`).
#[test]
fn registering_without_the_required_endpoint_is_endpoint_required() {
    let mut ran = false;
    for provider in CANDIDATES {
        let Ok(infos) = Hints::new()
            .provider(*provider)
            .caps(Caps::MSG | Caps::RMA)
            .mr_mode(MrMode::SUPPORTED)
            .get()
        else {
            continue;
        };
        let Some(info) = infos
            .into_iter()
            .find(|i| i.mr_mode().contains(MrMode::ENDPOINT))
        else {
            continue;
        };
        let domain = efa_fabric::Domain::open(&info).unwrap();
        let err = RegisteredBuf::new(&domain, 64, Access::LOCAL, None).unwrap_err();
        assert!(
            matches!(&err, Error::EndpointRequired { provider } if *provider == info.provider()),
            "{err:?}"
        );
        ran = true;
    }
    if !ran {
        skip_test("no provider here requires FI_MR_ENDPOINT (verbs in the soft-RoCE VM may)");
    }
}

/// A counted operation that fails raises the counter's error count; a wait on the counter
/// then says so at once instead of waiting out its deadline. (No provider on this host
/// reports a failed RMA write through a counter: shm and tcp;ofi_rxm do not check keys,
/// udp;ofi_rxd does not count errors; so the failure is reported with `fi_cntr_adderr`.)
#[test]
fn a_wait_on_a_counter_whose_error_count_rose_is_counter_failed() {
    for_each_provider("errors-counter", MSG_CAPS, |info| {
        let domain = efa_fabric::Domain::open(info).unwrap();
        let cntr = match Counter::open(&domain) {
            Ok(c) => c,
            Err(e) => return Outcome::Skipped(format!("counters unsupported: {e}")),
        };
        cntr.set(7).unwrap();
        let waiter = std::thread::scope(|s| {
            let w = s.spawn(|| cntr.wait(8, OP_TIMEOUT));
            std::thread::sleep(Duration::from_millis(50));
            let errors_before = cntr.read_err();
            cntr.add_err(1).unwrap();
            (w.join().unwrap(), errors_before)
        });
        let (res, errors_before) = waiter;
        let err = res.unwrap_err();
        assert!(
            matches!(err, Error::CounterFailed { value: 7, threshold: 8, errors } if errors == errors_before + 1),
            "{err:?}"
        );
        // Reaching the threshold is still success.
        cntr.add(1).unwrap();
        assert_eq!(cntr.wait(8, OP_TIMEOUT).unwrap(), 8);
        Outcome::Ran
    });
}
