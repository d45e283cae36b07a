// A receive request borrows its buffer exclusively until it completes: a large message is
// read straight into it, so it cannot be read (or written) meanwhile.
use efa_core::{Communicator, Source, Tag};

fn recv(comm: &Communicator) {
    let mut got = vec![0u8; 1 << 20];
    let req = comm.irecv(&mut got, Source::Any, Tag::Any).unwrap();
    let first = got[0];
    req.wait().unwrap();
    assert_eq!(first, 0);
}

fn main() {}
