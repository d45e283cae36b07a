//! Compile-fail tests of memory the NIC may touch (as sideway's `tests/compiletest.rs`): a
//! window's own memory is never borrowed as a slice (peers may write it at any time, even
//! right after a fence), local writes need the window exclusively, and a get's destination is
//! untouchable until the request completes; a point-to-point send's buffer cannot be written
//! or freed while its request lives (the receiver reads large messages from it in place), nor
//! a receive's buffer read while its request lives. Each case in `tests/compile_fail/` has its expected compiler
//! error in the `.stderr` beside it; `tests/compile_pass/` uses the same shapes correctly
//! and must compile. The fabric-level cases live in efa-fabric's `tests/compile_fail/`.
//!
//! Regenerate after a deliberate change with
//! `TRYBUILD=overwrite cargo test -p efa-core --test compiletest`, and read the diff.

#[test]
fn misuse_of_memory_in_flight_does_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
    t.pass("tests/compile_pass/*.rs");
}
