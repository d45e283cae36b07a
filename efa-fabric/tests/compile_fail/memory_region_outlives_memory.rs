// A memory region cannot be kept past the memory it describes.
use efa_fabric::{Access, Domain, MemoryRegion};

fn register(domain: &Domain) {
    let mr;
    {
        let mut buf = vec![0u8; 4096];
        mr = MemoryRegion::register(domain, &mut buf[..], Access::REMOTE_WRITE, None).unwrap();
    }
    println!("{}", mr.key());
}

fn main() {}
