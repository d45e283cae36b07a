// The source of an RMA write cannot be modified while the NIC may still read it.
use std::time::Duration;

use efa_fabric::{rma_scope, Endpoint, FiAddr, RemoteRegion};

fn put(ep: &Endpoint, dest: FiAddr, remote: &RemoteRegion) {
    let mut data = vec![1u8; 4096];
    rma_scope(Duration::from_secs(1), |s| {
        let id = s.write(ep, &data, dest, remote, 0).unwrap();
        data.clear();
        s.wait(id).unwrap();
    });
}

fn main() {}
