// A read's buffer must outlive the whole scope (which drains the read at its end): memory
// created inside the scope, and freed before the drain, is refused.
use std::time::Duration;

use efa_fabric::{rma_scope, Endpoint, FiAddr, RemoteRegion};

fn receive(ep: &Endpoint, src: FiAddr, remote: &RemoteRegion) {
    rma_scope(Duration::from_secs(1), |s| {
        let mut local = vec![0u8; 64];
        s.read(ep, &mut local, src, remote, 0).unwrap();
    });
}

fn main() {}
