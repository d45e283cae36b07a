// A memory region has one owner, which closes it: it cannot be cloned.
use efa_fabric::{Access, Domain, MemoryRegion};

fn register(domain: &Domain) {
    let mr = MemoryRegion::register(domain, vec![0u8; 4096], Access::LOCAL, None).unwrap();
    let other = mr.clone();
    drop((mr, other));
}

fn main() {}
