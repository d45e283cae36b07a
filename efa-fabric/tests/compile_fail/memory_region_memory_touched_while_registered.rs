// Memory lent to a region (which peers may write) cannot be used until it is handed back.
use efa_fabric::{Access, Domain, MemoryRegion};

fn register(domain: &Domain) {
    let mut buf = vec![0u8; 4096];
    let mr = MemoryRegion::register(domain, &mut buf[..], Access::REMOTE_WRITE, None).unwrap();
    buf[0] = 1;
    drop(mr);
}

fn main() {}
