// A send request borrows its buffer until it completes: a large message is read by the
// receiver straight from it (zero-copy RGET), so it cannot be written meanwhile.
use efa_core::Communicator;

fn send(comm: &Communicator) {
    let mut data = vec![0u8; 1 << 20];
    let req = comm.isend(&data, 1, 0).unwrap();
    data[0] = 1;
    req.wait().unwrap();
}

fn main() {}
