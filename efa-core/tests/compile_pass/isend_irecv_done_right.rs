// The shapes of the compile-fail cases used correctly: buffers outlive their requests, one
// buffer feeds many sends at once (shared borrows), and each receive has its own slice.
use efa_core::{Communicator, P2pRequest, Source, Tag};

fn window(comm: &Communicator, data: &[u8], slots: &mut [u8]) {
    let mut reqs: Vec<P2pRequest<'_>> = Vec::new();
    for slot in slots.chunks_exact_mut(data.len()) {
        reqs.push(comm.irecv(slot, Source::Rank(1), Tag::Is(0)).unwrap().into());
    }
    for _ in 0..4 {
        reqs.push(comm.isend(data, 1, 0).unwrap().into());
    }
    comm.wait_all(reqs).unwrap();
    let copied = comm.isend(&[1u8; 8], 1, 0).unwrap(); // a constant: 'static
    copied.wait().unwrap();
}

fn main() {}
