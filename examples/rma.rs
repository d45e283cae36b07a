//! A distributed array in RMA windows: every rank writes its slice into rank 0's window with
//! one-sided puts, then rank 0 verifies the whole array.
//!
//! ```text
//! efarun -n 4 target/release/examples/rma
//! ```

use efa_core::{Communicator, WindowAccess};

const PER_RANK: usize = 1 << 16;

fn value(i: usize) -> f64 {
    (i as f64).sqrt() * 3.0 + 1.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let comm = Communicator::init()?;
    let (me, n) = (comm.rank(), comm.size() as usize);
    // Windows are symmetric (every rank creates the same size); rank 0's holds the array.
    let win = comm.window::<f64>(PER_RANK * n, WindowAccess::WriteOnly)?;
    let start = me as usize * PER_RANK;
    let slice: Vec<f64> = (start..start + PER_RANK).map(value).collect();
    let t = std::time::Instant::now();
    win.put(0, start, &slice)?;
    win.flush(0)?;
    win.fence()?;
    if me == 0 {
        let local = win.local_to_vec();
        let bad = local
            .iter()
            .enumerate()
            .filter(|(i, &x)| x != value(*i))
            .count();
        println!(
            "rank 0: {} elements from {n} ranks in {:?}; {}",
            local.len(),
            t.elapsed(),
            if bad == 0 {
                "verified".to_string()
            } else {
                format!("{bad} WRONG")
            }
        );
        if bad > 0 {
            return Err("distributed array is wrong".into());
        }
    }
    win.free()?;
    Ok(())
}
