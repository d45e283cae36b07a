//! Writes the seeds of a target (valid encodings from `efa_core::fuzz::seeds`) into a
//! directory, one file each: `efa-fuzz-seeds TARGET DIR`.

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: efa-fuzz-seeds TARGET DIR");
        std::process::exit(2);
    };
    let seeds = efa_core::fuzz::seeds(name);
    if seeds.is_empty() {
        eprintln!("efa-fuzz-seeds: no target named {name:?}");
        std::process::exit(2);
    }
    let dir = PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("efa-fuzz-seeds: cannot create {}: {e}", dir.display());
        std::process::exit(1);
    }
    for (i, s) in seeds.iter().enumerate() {
        let path = dir.join(format!("seed-{i:02}"));
        if let Err(e) = std::fs::write(&path, s) {
            eprintln!("efa-fuzz-seeds: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    println!("{} seeds for {name} in {}", seeds.len(), dir.display());
}
