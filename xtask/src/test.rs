//! `cargo xtask test`: the whole suite, real-guest tests included, on a machine it sets up itself.
//!
//! Two phases: the suite with `cargo test` (tests in parallel), then, alone, the drills that would
//! disturb anything running beside them: today the two `libvirtd_restarted_mid_run` drills (a
//! local and a remote host), which restart the host's libvirtd. Both phases count towards the
//! exit code.

use std::process::Command;

use crate::{repo_root, run_status, setup, step};

/// Drills run one at a time after the suite: `#[ignore]`d in it, run here with `--ignored` and
/// their environment variable (a second guard): (test target, test name, variable).
const EXCLUSIVE: &[(&str, &str, &str)] = &[
    ("drills", "libvirtd_restarted_mid_run", "PATCHLAB_DRILL_RESTART_LIBVIRTD"),
    ("drills", "libvirtd_restarted_mid_run_on_a_remote_host", "PATCHLAB_DRILL_RESTART_LIBVIRTD"),
];

pub fn run(args: &[String]) -> Result<u8, String> {
    let root = repo_root();
    setup::all(&root)?;
    step("running the test suite (real-guest tests included)");
    let extra: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let suite = run_status(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(&extra)
            // Real-guest tests fail instead of skipping when the lab is not usable.
            .env("PATCHLAB_REQUIRE_LAB", "1"),
    )?;
    // Arguments select tests (or change how they are built): then only the suite runs, as asked.
    if !extra.is_empty() {
        step("arguments given: the exclusive drills (libvirtd restart) are not run");
        return Ok(suite.clamp(0, 255) as u8);
    }
    let mut code = suite;
    for (target, name, var) in EXCLUSIVE {
        step(&format!("running {name} alone (nothing else may use libvirtd meanwhile)"));
        let drill = run_status(
            Command::new(env!("CARGO"))
                .current_dir(&root)
                .args(["test", "--test", target, "--", "--ignored", "--exact", name, "--nocapture"])
                .env("PATCHLAB_REQUIRE_LAB", "1")
                .env(var, "1"),
        )?;
        if drill != 0 {
            step(&format!("{name} failed (exit {drill})"));
        }
        // The first failure's code wins; a later phase's failure still fails the whole.
        if code == 0 {
            code = drill;
        }
        // Whatever happened, leave the daemons running for whoever comes next.
        setup::daemons()?;
    }
    Ok(code.clamp(0, 255) as u8)
}
