//! One AFL++ target of `efa_core::fuzz`, named by the first argument:
//! `afl-fuzz -i seeds -o out -- efa-fuzz-afl wire_header`. Runs in AFL's persistent mode;
//! a panic aborts the process, which AFL records as a crash.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = efa_core::fuzz::target(&name) else {
        let names: Vec<_> = efa_core::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: efa-fuzz-afl TARGET, with TARGET one of {names:?}");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        target(data);
    });
}
