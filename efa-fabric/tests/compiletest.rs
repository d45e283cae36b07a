//! Compile-fail tests (as sideway's `tests/compiletest.rs`): misuse of memory the NIC
//! touches does not compile. Each case in `tests/compile_fail/` is a small program with one
//! misuse and its expected compiler error in the `.stderr` beside it (a buffer touched while
//! an operation uses it, a region or exposure kept past its memory, a scope leaked, memory
//! peers write lent out as a slice...). `tests/compile_pass/` holds the same shapes used
//! correctly, which must compile, so that a case cannot pass by failing for another reason.
//!
//! Regenerate the `.stderr` files after a deliberate change with
//! `TRYBUILD=overwrite cargo test -p efa-fabric --test compiletest`, and read the diff.

#[test]
fn misuse_of_nic_memory_does_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
    t.pass("tests/compile_pass/*.rs");
}
