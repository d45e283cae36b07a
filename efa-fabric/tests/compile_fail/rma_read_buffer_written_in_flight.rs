// A buffer an RMA read may still write cannot be written by the program meanwhile.
use std::time::Duration;

use efa_fabric::{rma_scope, Endpoint, FiAddr, RemoteRegion};

fn receive(ep: &Endpoint, src: FiAddr, remote: &RemoteRegion) {
    let mut buf = vec![0u8; 4096];
    rma_scope(Duration::from_secs(1), |s| {
        let id = s.read(ep, &mut buf, src, remote, 0).unwrap();
        buf[0] = 1;
        s.wait(id).unwrap();
    });
}

fn main() {}
