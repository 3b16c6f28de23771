//! `cargo xtask lab --nightly [--out DIR] [LAB...]`: every lab under `labs/` (or the ones named),
//! one after the other, each into its own run directory:
//!
//! ```text
//! target/patchlab/nightly/<UTC timestamp>/
//!   index.json, index.md          each lab's verdict, exit code, report, junit.xml, log
//!   <lab>/report.json (+ .sig), report.html, report.md, junit.xml, journal.jsonl, patches/, evidence/
//!   <lab>/patchlab.log.jsonl      the run's logs as JSON lines (`patchlab run --log-json`)
//! ```
//!
//! Exit code: 3 if any lab broke (its run exited with anything but 0 or 1, or wrote no report),
//! else 1 if a patch failed in any lab, else 0. `labs/fixtures.toml` contains bad patches on
//! purpose (its test asserts each one fails), so a nightly that includes it exits 1 when the
//! harness works; name the labs to run (`cargo xtask lab --nightly labs/default.toml`) for a
//! nightly that must pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_status, setup, step};

struct LabRun {
    lab: String,
    name: String,
    exit_code: i32,
    verdict: Option<String>,
    complete: Option<bool>,
    dir: PathBuf,
    seconds: u64,
}

pub fn run(root: &Path, out: Option<String>, labs: Vec<String>) -> Result<u8, String> {
    let labs = if labs.is_empty() { all_labs(root)? } else { labs };
    if labs.is_empty() {
        return Err("no lab files under labs/".into());
    }
    setup::all(root)?;
    let bin = setup::patchlab_bin(root);
    let own_key = std::env::var_os("PATCHLAB_SIGNING_KEY").filter(|k| !k.is_empty());
    let dev = match own_key {
        Some(_) => None,
        None => Some(crate::lab::dev_key(&bin, root)?),
    };
    let base = root.join(out.unwrap_or_else(|| format!("target/patchlab/nightly/{}", utc_stamp())));
    std::fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    let mut runs = Vec::new();
    for lab in &labs {
        let name = Path::new(lab).file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let dir = base.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        step(&format!("nightly: running {lab} into {}", dir.display()));
        let started = std::time::Instant::now();
        let mut cmd = Command::new(&bin);
        cmd.current_dir(root).args(["run", lab, "--ci", "--out"]).arg(&dir).arg("--log-json").arg(dir.join("patchlab.log.jsonl"));
        if let Some((key, _)) = &dev {
            cmd.arg("--key").arg(key).arg("--development-key");
        }
        let exit_code = run_status(&mut cmd)?;
        let report = std::fs::read_to_string(dir.join("report.json")).ok();
        let run = LabRun {
            lab: lab.clone(),
            verdict: report.as_deref().and_then(top_level_verdict),
            complete: report.as_deref().and_then(top_level_complete),
            name,
            exit_code,
            dir,
            seconds: started.elapsed().as_secs(),
        };
        step(&format!("nightly: {} exited {} ({}) in {} s", run.lab, run.exit_code, run.verdict.as_deref().unwrap_or("no report"), run.seconds));
        runs.push(run);
        // The index is rewritten after every lab, so a nightly cut short still says what ran.
        write_index(&base, &runs, dev.as_ref().map(|(_, a)| a.as_path()))?;
    }
    let code = exit_code(&runs.iter().map(|r| (r.exit_code, r.verdict.is_some())).collect::<Vec<_>>());
    println!();
    println!("nightly:   {}", base.display());
    println!("index:     {}", base.join("index.json").display());
    println!("           {}", base.join("index.md").display());
    for r in &runs {
        println!("  {:<12} exit {} {:<5} {}", r.name, r.exit_code, r.verdict.as_deref().unwrap_or("-"), r.dir.join("report.json").display());
    }
    Ok(code)
}

/// 3 if any lab broke (exit other than 0/1, or no report), else 1 if any patch failed, else 0.
fn exit_code(runs: &[(i32, bool)]) -> u8 {
    if runs.iter().any(|(code, has_report)| !matches!(code, 0 | 1) || !has_report) {
        3
    } else if runs.iter().any(|(code, _)| *code == 1) {
        1
    } else {
        0
    }
}

fn all_labs(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("labs");
    let mut labs: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| format!("labs/{}", e.file_name().to_string_lossy()))
        .collect();
    labs.sort();
    Ok(labs)
}

/// report.json is canonical JSON (RFC 8785: keys sorted), so the top-level `verdict` is the last
/// `"verdict":` in the file and the top-level `complete` the first `"complete":`. xtask keeps no
/// JSON dependency: it must build before anything else is installed.
fn top_level_verdict(report: &str) -> Option<String> {
    let at = report.rfind("\"verdict\":\"")? + "\"verdict\":\"".len();
    Some(report[at..].split('"').next()?.to_string())
}

fn top_level_complete(report: &str) -> Option<bool> {
    let at = report.find("\"complete\":")? + "\"complete\":".len();
    Some(report[at..].starts_with("true"))
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn rel(base: &Path, path: &Path) -> String {
    path.strip_prefix(base).unwrap_or(path).display().to_string()
}

fn write_index(base: &Path, runs: &[LabRun], allowed_signers: Option<&Path>) -> Result<(), String> {
    let code = exit_code(&runs.iter().map(|r| (r.exit_code, r.verdict.is_some())).collect::<Vec<_>>());
    let mut json = format!("{{\n  \"exit_code\": {code},\n  \"labs\": [\n");
    for (i, r) in runs.iter().enumerate() {
        let file = |name: &str| {
            let p = r.dir.join(name);
            if p.exists() { json_string(&rel(base, &p)) } else { "null".into() }
        };
        json.push_str(&format!(
            "    {{\"lab\": {}, \"name\": {}, \"exit_code\": {}, \"verdict\": {}, \"complete\": {}, \"seconds\": {}, \"report\": {}, \"signature\": {}, \"junit\": {}, \"html\": {}, \"log_json\": {}}}{}\n",
            json_string(&r.lab),
            json_string(&r.name),
            r.exit_code,
            r.verdict.as_deref().map(json_string).unwrap_or("null".into()),
            r.complete.map(|c| c.to_string()).unwrap_or("null".into()),
            r.seconds,
            file("report.json"),
            file("report.json.sig"),
            file("junit.xml"),
            file("report.html"),
            file("patchlab.log.jsonl"),
            if i + 1 < runs.len() { "," } else { "" }
        ));
    }
    json.push_str("  ]\n}\n");
    std::fs::write(base.join("index.json"), json).map_err(|e| format!("write index.json: {e}"))?;

    let mut md = String::from("# patchlab nightly\n\n");
    md.push_str(&format!("Overall exit code: **{code}** (0 all passed, 1 a patch failed, 3 a lab broke).\n\n"));
    md.push_str("| lab | verdict | exit | complete | time | report | junit | log |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let link = |name: &str| {
            let p = r.dir.join(name);
            if p.exists() { format!("[{name}]({})", rel(base, &p)) } else { "-".into() }
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} s | {} | {} | {} |\n",
            r.lab,
            r.verdict.as_deref().unwrap_or("no report"),
            r.exit_code,
            r.complete.map(|c| if c { "yes" } else { "no" }).unwrap_or("-"),
            r.seconds,
            link("report.json"),
            link("junit.xml"),
            link("patchlab.log.jsonl")
        ));
    }
    if runs.iter().any(|r| r.lab.ends_with("fixtures.toml")) {
        md.push_str("\n`labs/fixtures.toml` contains bad patches on purpose: its verdict is `fail` (exit 1) when the harness works.\n");
    }
    if let Some(a) = allowed_signers {
        md.push_str(&format!("\nReports are signed with the development key; check one with `patchlab verify <report.json> --allowed-signers {}`.\n", a.display()));
    }
    std::fs::write(base.join("index.md"), md).map_err(|e| format!("write index.md: {e}"))
}

/// `YYYYMMDDTHHMMSSZ` from the system clock, without a date library.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_rank_a_broken_lab_over_a_failed_patch() {
        assert_eq!(exit_code(&[(0, true), (0, true)]), 0);
        assert_eq!(exit_code(&[(0, true), (1, true)]), 1);
        assert_eq!(exit_code(&[(1, true), (3, true)]), 3);
        assert_eq!(exit_code(&[(0, true), (0, false)]), 3, "no report is a broken lab");
        assert_eq!(exit_code(&[(2, false)]), 3);
    }

    #[test]
    fn reads_the_top_level_fields_of_a_canonical_report() {
        let r = r#"{"complete":false,"coverage":{"status":"skipped"},"results":[{"verdict":"fail"}],"run_id":"x","verdict":"error"}"#;
        assert_eq!(top_level_verdict(r).as_deref(), Some("error"));
        assert_eq!(top_level_complete(r), Some(false));
    }

    #[test]
    fn the_stamp_is_a_utc_time() {
        let s = utc_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && s.as_bytes()[8] == b'T');
    }
}
