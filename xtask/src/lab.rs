//! `cargo xtask lab`: what a release engineer types. Sets up, runs the lab, says where the report is.
//!
//! The report is signed. Unless `PATCHLAB_SIGNING_KEY` names a key, a local *development* key is
//! used, created on first use under `~/.config/patchlab/dev-key/` with `patchlab keygen`: good for
//! trying patchlab out, not for approving a release.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{repo_root, run_ok, run_status, setup, step};

/// Where the development key lives: `$HOME/.config/patchlab/dev-key`.
fn dev_key_dir() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).ok_or("HOME is not set: cannot place the development signing key")?;
    Ok(PathBuf::from(home).join(".config/patchlab/dev-key"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}

/// The development key (private key path, allowed_signers path), generated when missing.
pub fn dev_key(bin: &Path, root: &Path) -> Result<(PathBuf, PathBuf), String> {
    let dir = dev_key_dir()?;
    let (key, allowed) = (dir.join("id_ed25519"), dir.join("allowed_signers"));
    if !key.exists() {
        step(&format!("creating a development signing key in {}", dir.display()));
        run_ok(Command::new(bin).current_dir(root).arg("keygen").arg("--out").arg(&dir).arg("--identity").arg(format!("patchlab-dev@{}", hostname())))?;
    }
    if !allowed.exists() {
        return Err(format!("{} is missing beside the development key; remove {} to make a new key", allowed.display(), dir.display()));
    }
    Ok((key, allowed))
}

pub fn run(args: &[String]) -> Result<u8, String> {
    let root = repo_root();
    let mut out = None;
    let mut labs = Vec::new();
    let mut nightly = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = Some(it.next().ok_or("--out needs a directory")?.clone()),
            "--nightly" => nightly = true,
            a if a.starts_with('-') => return Err(format!("unknown option {a}; usage: cargo xtask lab [--out DIR] [LAB] | cargo xtask lab --nightly [--out DIR] [LAB...]")),
            a => labs.push(a.to_string()),
        }
    }
    if nightly {
        return crate::nightly::run(&root, out, labs);
    }
    if labs.len() > 1 {
        return Err("one lab at a time without --nightly".into());
    }
    let lab = labs.pop();
    setup::all(&root)?;
    let bin = setup::patchlab_bin(&root);
    let lab = lab.unwrap_or_else(|| "labs/default.toml".into());
    let out = out.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        format!("target/patchlab/runs/{}-{stamp}", Path::new(&lab).file_stem().unwrap_or_default().to_string_lossy())
    });
    // A key of the user's own (PATCHLAB_SIGNING_KEY, read by `patchlab run`) wins over the dev key.
    let own_key = std::env::var_os("PATCHLAB_SIGNING_KEY").filter(|k| !k.is_empty());
    let dev = match own_key {
        Some(_) => None,
        None => Some(dev_key(&bin, &root)?),
    };
    step(&format!("running {lab} into {out}"));
    let mut cmd = Command::new(&bin);
    cmd.current_dir(&root).args(["run", &lab, "--out", &out]);
    if let Some((key, _)) = &dev {
        cmd.arg("--key").arg(key).arg("--development-key");
    }
    let code = run_status(&mut cmd)?;
    let dir = root.join(&out);
    let report = dir.join("report.json");
    if report.exists() {
        println!();
        println!("report:    {}", report.display());
        for name in ["report.html", "report.md", "junit.xml"] {
            if dir.join(name).exists() {
                println!("           {}", dir.join(name).display());
            }
        }
        if dir.join("report.json.sig").exists() {
            println!("signature: {}", dir.join("report.json.sig").display());
        }
        match &dev {
            Some((key, allowed)) => {
                println!();
                println!("Signed with the DEVELOPMENT key {} (patchlab-dev@{}): fine for trying patchlab, not for approving a release.", key.display(), hostname());
                println!("Its allowed_signers file: {}", allowed.display());
                println!("Check the report with:");
                println!("  {} verify {} --allowed-signers {}", bin.display(), report.display(), allowed.display());
            }
            None => println!("Signed with the key in PATCHLAB_SIGNING_KEY; check it with `patchlab verify {} --allowed-signers <its allowed_signers>`.", report.display()),
        }
    }
    Ok(code.clamp(0, 255) as u8)
}
