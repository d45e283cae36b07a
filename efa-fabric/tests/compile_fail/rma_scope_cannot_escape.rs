// The scope cannot leave rma_scope (so it can be neither leaked nor forgotten: its drain
// always runs before the borrows it holds end).
use std::time::Duration;

use efa_fabric::rma_scope;

fn main() {
    let scope = rma_scope(Duration::from_secs(1), |s| s);
    let _ = scope;
}
