// A send request cannot outlive the buffer it sends from (peers read it in place until the
// request completes or its drop has waited for them).
use efa_core::{Communicator, SendRequest};

fn start(comm: &Communicator) -> SendRequest<'static> {
    let data = vec![0u8; 1 << 20];
    comm.isend(&data, 1, 0).unwrap()
}

fn main() {}
