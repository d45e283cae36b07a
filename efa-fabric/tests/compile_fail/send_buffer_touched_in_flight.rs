// A send owns its buffer until it completes: the program cannot touch it meanwhile.
use std::time::Duration;

use efa_fabric::{Endpoint, FiAddr};

fn send(ep: &Endpoint, dest: FiAddr) {
    let mut buf = vec![1u8; 4096];
    let pending = ep.send(buf, dest).unwrap();
    buf[0] = 2;
    pending.wait(Duration::from_secs(1)).unwrap();
}

fn main() {}
