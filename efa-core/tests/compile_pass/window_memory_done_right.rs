// The shapes of the compile_fail cases, used correctly: this must compile.
use efa_core::Window;

fn peek(win: &Window<u64>) -> u64 {
    let mut one = [0u64];
    win.read_local(0, &mut one).unwrap();
    win.fence().unwrap();
    one[0] + win.local_to_vec()[0]
}

fn update(win: &mut Window<u64>) {
    let mut out = [0u64; 4];
    let get = win.iget(1, 0, &mut out).unwrap();
    get.wait().unwrap();
    win.write_local(0, &[1, 2, 3]).unwrap();
    win.fill_local(out[0]);
}

fn main() {
    let _ = (peek, update);
}
