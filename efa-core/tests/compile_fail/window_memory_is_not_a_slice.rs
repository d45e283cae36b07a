// A window's own memory is never lent out as a slice, not even between synchronisations:
// after a fence a peer may start the next epoch's puts at once. It is copied out instead
// (read_local, local_to_vec). This case fails while no such accessor exists.
use efa_core::Window;

fn peek(win: &Window<u64>) -> u64 {
    let local: &[u64] = win.local();
    win.fence().unwrap();
    local[0]
}

fn main() {}
