// An exposure (a registration for remote read) cannot outlive the memory it exposes.
use efa_fabric::{Endpoint, Exposed};

fn expose_temporary(ep: &Endpoint) -> Exposed<'static> {
    let data = vec![1u8; 4096];
    ep.expose(&data).unwrap()
}

fn main() {}
