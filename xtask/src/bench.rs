//! `cargo xtask bench [--quick] [--out DIR]`: sets up what is missing, then runs `patchlab-bench`
//! (a binary of the patchlab crate: the measurements need libvirt, which xtask must not link).
//! It prints the table and writes DIR/bench.json (default target/bench/). See docs/performance.md.

use std::process::Command;

use crate::{repo_root, run_status, setup, step};

pub fn run(args: &[String]) -> Result<u8, String> {
    let root = repo_root();
    let mut quick = false;
    let mut out = "target/bench".to_string();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = it.next().ok_or("--out needs a directory")?.clone(),
            a => return Err(format!("unknown argument {a}; usage: cargo xtask bench [--quick] [--out DIR]")),
        }
    }
    // Also builds patchlab-bench: it is a binary of the patchlab package.
    setup::all(&root)?;
    let bin = setup::patchlab_bin(&root).with_file_name("patchlab-bench");
    step(&format!("benchmarking ({}) into {out}", if quick { "--quick, about 5 minutes idle" } else { "full, about 16 minutes idle" }));
    let mut cmd = Command::new(&bin);
    cmd.current_dir(&root).arg("--out").arg(&out);
    if quick {
        cmd.arg("--quick");
    }
    Ok(run_status(&mut cmd)?.clamp(0, 255) as u8)
}
