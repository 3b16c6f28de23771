//! `cargo xtask`: the two commands of the README, plus the tools behind them.
//!
//!   cargo xtask lab [--out DIR] [LAB]   set up what is missing, run a lab (default labs/default.toml)
//!   cargo xtask lab --nightly [LAB...]  run every lab under labs/ (or those named): index.json, index.md
//!   cargo xtask test [-- ARGS]          set up what is missing, run the whole test suite
//!   cargo xtask bench [--quick] [--out DIR]   measure clones, cells and labs (docs/performance.md)
//!   cargo xtask setup                   only install packages, start daemons and build images
//!
//! Few dependencies on purpose: xtask must build before the system packages that patchlab
//! itself needs to compile (libvirt-dev) are installed.

mod bench;
mod lab;
mod nightly;
mod reaper;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((cmd, rest)) => (cmd.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "lab" => lab::run(rest),
        "bench" => bench::run(rest),
        "test" => test::run(rest),
        "setup" => setup::all(&repo_root()).map(|_| 0),
        reaper::COMMAND => return ExitCode::from(reaper::run(rest)),
        "help" | "--help" | "-h" => {
            println!("usage: cargo xtask <lab [--out DIR] [LAB] | lab --nightly [--out DIR] [LAB...] | test [-- CARGO TEST ARGS] | bench [--quick] [--out DIR] | setup>");
            Ok(0)
        }
        other => Err(format!("unknown xtask command `{other}`; try `cargo xtask help`")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(3)
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repository").to_path_buf()
}

/// Runs a command with inherited stdio; an error names it.
pub fn run_status(cmd: &mut Command) -> Result<i32, String> {
    let status = cmd.status().map_err(|e| format!("start {:?}: {e}", cmd.get_program()))?;
    Ok(status.code().unwrap_or(3))
}

pub fn run_ok(cmd: &mut Command) -> Result<(), String> {
    match run_status(cmd)? {
        0 => Ok(()),
        code => Err(format!("{cmd:?} exited with {code}")),
    }
}

pub fn step(what: &str) {
    eprintln!("xtask: {what}");
}
