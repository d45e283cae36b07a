// Memory exposed for peers to read (RGET) cannot be modified while it is exposed.
use efa_fabric::Endpoint;

fn rts(ep: &Endpoint) -> u64 {
    let mut data = vec![1u8; 1 << 20];
    let exposed = ep.expose(&data).unwrap();
    data[0] = 2;
    exposed.remote().key
}

fn main() {}
