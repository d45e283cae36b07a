// Local writes to window memory need the window exclusively: not while one of its RMA
// requests is in flight.
use efa_core::Window;

fn update(win: &mut Window<u64>) {
    let mut out = [0u64; 4];
    let get = win.iget(1, 0, &mut out).unwrap();
    win.write_local(0, &[1, 2, 3]).unwrap();
    get.wait().unwrap();
}

fn main() {}
