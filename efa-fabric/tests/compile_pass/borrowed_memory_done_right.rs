// The same shapes as the compile_fail cases, used correctly: this must compile, so that
// each compile_fail case fails for its own reason and not because the harness is broken.
use std::time::Duration;

use efa_fabric::{rma_scope, Access, Domain, Endpoint, FiAddr, MemoryRegion, RemoteRegion, TargetBuf};

fn receive(ep: &Endpoint, src: FiAddr, remote: &RemoteRegion) -> u8 {
    let mut buf = vec![0u8; 4096];
    rma_scope(Duration::from_secs(1), |s| {
        let id = s.read(ep, &mut buf, src, remote, 0).unwrap();
        s.wait(id).unwrap();
    });
    buf[0] = 1;
    buf[0]
}

fn rts(ep: &Endpoint) -> u64 {
    let mut data = vec![1u8; 1 << 20];
    let key = {
        let exposed = ep.expose(&data).unwrap();
        exposed.remote().key
    };
    data[0] = 2;
    key
}

fn register(domain: &Domain) {
    let mut buf = vec![0u8; 4096];
    let mr = MemoryRegion::register(domain, &mut buf[..], Access::REMOTE_WRITE, None).unwrap();
    let back = mr.into_inner();
    back[0] = 1;
    buf[1] = 1;
}

fn send(ep: &Endpoint, dest: FiAddr) {
    let buf = vec![1u8; 4096];
    let pending = ep.send(buf, dest).unwrap();
    let mut buf = pending.wait(Duration::from_secs(1)).unwrap().buf;
    buf[0] = 2;
}

fn peek(t: &TargetBuf) -> u8 {
    let mut b = [0u8; 1];
    t.read_local(0, &mut b).unwrap();
    b[0]
}

fn main() {
    let _ = (receive, rts, register, send, peek);
}
