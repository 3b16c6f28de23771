//! `cargo xtask lab`: what a release engineer types. Sets up, runs the lab, says where the report is.

use std::process::Command;

use crate::{repo_root, run_status, setup, step};

pub fn run(args: &[String]) -> Result<u8, String> {
    let root = repo_root();
    let mut out = None;
    let mut lab = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = Some(it.next().ok_or("--out needs a directory")?.clone()),
            a if a.starts_with('-') => return Err(format!("unknown option {a}; usage: cargo xtask lab [--out DIR] [LAB]")),
            a => lab = Some(a.to_string()),
        }
    }
    setup::all(&root)?;
    let lab = lab.unwrap_or_else(|| "labs/default.toml".into());
    let out = out.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        format!("target/patchlab/runs/{}-{stamp}", std::path::Path::new(&lab).file_stem().unwrap_or_default().to_string_lossy())
    });
    step(&format!("running {lab} into {out}"));
    let code = run_status(Command::new(setup::patchlab_bin(&root)).current_dir(&root).args(["run", &lab, "--out", &out]))?;
    let report = root.join(&out).join("report.json");
    if report.exists() {
        println!("\nreport: {}", report.display());
    }
    Ok(code.clamp(0, 255) as u8)
}
