//! `cargo xtask test`: the whole suite, real-guest tests included, on a machine it sets up itself.

use std::process::Command;

use crate::{repo_root, run_status, setup, step};

pub fn run(args: &[String]) -> Result<u8, String> {
    let root = repo_root();
    setup::all(&root)?;
    step("running the test suite (real-guest tests included)");
    let extra: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let code = run_status(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(extra)
            // Real-guest tests fail instead of skipping when the lab is not usable.
            .env("PATCHLAB_REQUIRE_LAB", "1"),
    )?;
    Ok(code.clamp(0, 255) as u8)
}
