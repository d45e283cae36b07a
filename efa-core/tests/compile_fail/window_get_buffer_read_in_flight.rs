// The destination of a get cannot be read until the request completes.
use efa_core::Window;

fn fetch(win: &Window<u64>) -> u64 {
    let mut out = [0u64; 4];
    let get = win.iget(1, 0, &mut out).unwrap();
    let first = out[0];
    get.wait().unwrap();
    first
}

fn main() {}
