//! `patchlab rollout plan|next|record|status`: read files and the clock, call the pure decisions,
//! write plan.json or append to the journal, print. Exit codes: 0 ok, 1 refused or not yet,
//! 2 usage or invalid input.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use jiff::{SignedDuration, Timestamp};

use super::journal::{self, Decision, Entry, EntryStatus, Progress};
use super::{plan_refusals, plan_waves, status, Plan, PlanOptions, PlanReportRef, JOURNAL_FILE, PLAN_FILE, PLAN_SCHEMA_VERSION};
use crate::inventory::Inventory;
use crate::report::gate::parse_duration;
use crate::report::sign;
use crate::report::InventoryRef;

const ROLLOUT_EXIT_CODES: &str = "Exit codes:
  0  done (plan written, hosts printed, entry recorded, status shown)
  1  refused or not yet: the reason is printed
  2  usage or invalid input (unreadable or invalid file, unknown option)";

/// Whose signature on plan.json to require before acting on it.
#[derive(Debug, Clone, Args)]
pub struct PlanTrust {
    /// Refuse the plan unless plan.json.sig verifies against this OpenSSH allowed_signers file
    /// (as `plan` signed it with --key). Without it the signature is not checked.
    #[arg(long, env = "PATCHLAB_ALLOWED_SIGNERS")]
    allowed_signers: Option<PathBuf>,
    /// With --allowed-signers: require the plan's signer to be listed under this identity.
    #[arg(long, requires = "allowed_signers")]
    identity: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecordStatus {
    Ok,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Md,
    Html,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Plan the waves of a rollout from a signed report that clears the gate and the inventory it covers.
    #[command(after_help = ROLLOUT_EXIT_CODES)]
    Plan {
        /// report.json; its signature is REPORT.sig beside it.
        report: PathBuf,
        /// OpenSSH allowed_signers file (see ssh-keygen(1)).
        #[arg(long)]
        allowed_signers: PathBuf,
        /// Require the report's signer to be listed under this identity.
        #[arg(long)]
        identity: Option<String>,
        /// The inventory the report's coverage was computed from (same sha256).
        #[arg(long)]
        inventory: PathBuf,
        /// The plan directory: plan.json, plan.json.sig and the journal go there. Must not hold a plan yet.
        #[arg(long)]
        out: PathBuf,
        /// Share of the non-critical covered hosts in the pilot wave, rounded up; at least one per covered platform.
        #[arg(long, value_name = "PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
        pilot: u32,
        /// How long to watch the pilot and remaining waves before the next may start (units w, d, h, m, s).
        #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = parse_duration)]
        burn_time: SignedDuration,
        /// How long to watch the critical wave once it is patched.
        #[arg(long, value_name = "DURATION", default_value = "2d", value_parser = parse_duration)]
        critical_burn_time: SignedDuration,
        /// The report must be younger than this, as for `gate`.
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
        max_age: SignedDuration,
        /// Sign plan.json with this unencrypted OpenSSH key (mode 0600); writes plan.json.sig.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Print the hosts of the next wave, one per line, and start it; or exit 1 with the reason none may start.
    #[command(after_help = ROLLOUT_EXIT_CODES)]
    Next {
        plan_dir: PathBuf,
        #[command(flatten)]
        trust: PlanTrust,
        /// While the previous wave is burning in, sleep until it has, instead of exiting 1.
        #[arg(long)]
        wait: bool,
    },
    /// Record the outcome of patching one host of a started wave in the journal.
    #[command(after_help = ROLLOUT_EXIT_CODES)]
    Record {
        plan_dir: PathBuf,
        #[command(flatten)]
        trust: PlanTrust,
        #[arg(long)]
        host: String,
        #[arg(long, value_enum)]
        status: RecordStatus,
        /// The deployment log of this host: its sha256 goes into the journal.
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Verify the journal and show each wave's progress, the blocked hosts, and a final summary.
    #[command(after_help = ROLLOUT_EXIT_CODES)]
    Status {
        plan_dir: PathBuf,
        #[command(flatten)]
        trust: PlanTrust,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

pub fn run(command: RolloutCommand) -> u8 {
    match command {
        RolloutCommand::Plan { report, allowed_signers, identity, inventory, out, pilot, burn_time, critical_burn_time, max_age, key } => {
            let opts = PlanOptions { pilot_percent: pilot, burn_time_ms: ms(burn_time), critical_burn_time_ms: ms(critical_burn_time) };
            plan(&report, &allowed_signers, identity.as_deref(), &inventory, &out, &opts, max_age, key.as_deref())
        }
        RolloutCommand::Next { plan_dir, trust, wait } => next(&plan_dir, &trust, wait),
        RolloutCommand::Record { plan_dir, trust, host, status, log } => record(&plan_dir, &trust, &host, status, log.as_deref()),
        RolloutCommand::Status { plan_dir, trust, format } => show_status(&plan_dir, &trust, format),
    }
}

fn ms(d: SignedDuration) -> u64 {
    d.as_millis().max(0) as u64
}

fn usage(message: String) -> u8 {
    eprintln!("error: {message}");
    2
}

fn refused(reasons: &[String]) -> u8 {
    for r in reasons {
        println!("refused: {r}");
    }
    1
}

/// Now, to the millisecond (journal times are compared, and read back from RFC 3339).
fn now() -> Timestamp {
    Timestamp::from_millisecond(Timestamp::now().as_millisecond()).expect("the clock is in range")
}

#[allow(clippy::too_many_arguments)]
fn plan(report: &Path, allowed_signers: &Path, identity: Option<&str>, inventory_path: &Path, out: &Path, opts: &PlanOptions, max_age: SignedDuration, key: Option<&Path>) -> u8 {
    if !report.is_file() {
        return usage(format!("failed to read report {}: no such file", report.display()));
    }
    let signers = match fs::read_to_string(allowed_signers) {
        Ok(s) => s,
        Err(e) => return usage(format!("failed to read allowed signers {}: {e}", allowed_signers.display())),
    };
    let inventory = match Inventory::load(inventory_path) {
        Ok(i) => i,
        Err(e) => return usage(e.to_string()),
    };
    if let Some(Err(e)) = key.map(sign::load_signing_key) {
        return usage(format!("failed to {e}"));
    }
    let plan_path = out.join(PLAN_FILE);
    if plan_path.exists() {
        return usage(format!("{} already exists: a plan is never overwritten (its journal is bound to it); choose another --out", plan_path.display()));
    }
    if fs::metadata(out.join(JOURNAL_FILE)).is_ok_and(|m| m.len() > 0) {
        return usage(format!("{} holds a journal of another plan; choose another --out", out.display()));
    }
    let report_sha256 = match sign::sha256_file(report) {
        Ok(d) => d,
        Err(e) => return usage(format!("failed to read report {}: {e}", report.display())),
    };
    let inventory_file = inventory_path.display().to_string();
    let v = sign::verify_report(report, &signers, identity);
    let now = now();
    let reasons = plan_refusals(v.report.as_ref(), &v.problems, &inventory, &inventory_file, now, max_age);
    if !reasons.is_empty() {
        return refused(&reasons);
    }
    let r = v.report.expect("no refusal means the report parsed");
    let shape = plan_waves(&inventory, &r.coverage, opts);
    if shape.waves.is_empty() {
        return refused(&["no host may be patched: every host of the inventory is blocked".to_string()]);
    }
    let plan = Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        created_at: now.to_string(),
        report: PlanReportRef { file: report.display().to_string(), sha256: report_sha256, run_id: r.run_id.clone(), finished_at: r.finished_at.clone() },
        inventory: InventoryRef { file: inventory_file, sha256: inventory.sha256.clone() },
        pilot_percent: opts.pilot_percent,
        waves: shape.waves,
        blocked: shape.blocked,
    };
    if let Err(e) = fs::create_dir_all(out) {
        return usage(format!("failed to create {}: {e}", out.display()));
    }
    let tmp = out.join(".plan.json.tmp");
    if let Err(e) = fs::write(&tmp, plan.canonical_bytes()).and_then(|_| fs::rename(&tmp, &plan_path)) {
        return usage(format!("failed to write {}: {e}", plan_path.display()));
    }
    if let Some(key) = key {
        if let Err(e) = sign::sign(&plan_path, key) {
            let _ = fs::remove_file(&plan_path);
            return usage(format!("failed to {e}"));
        }
    }
    for (i, w) in plan.waves.iter().enumerate() {
        println!("wave {} {} (burn time {}): {}", i + 1, w.name, super::human_ms(w.burn_time_ms), w.hosts.join(" "));
    }
    for b in &plan.blocked {
        println!("blocked {}: {}", b.host, b.reason);
    }
    println!("plan: {}{}", plan_path.display(), if key.is_some() { " (signed)" } else { "" });
    0
}

/// The plan, its bytes, and the journal file opened for reading and appending, locked.
struct Opened {
    plan: Plan,
    plan_bytes: Vec<u8>,
    journal: File,
    journal_bytes: Vec<u8>,
}

fn open(dir: &Path, exclusive: bool, trust: &PlanTrust) -> Result<Opened, u8> {
    let plan_path = dir.join(PLAN_FILE);
    let plan_bytes = fs::read(&plan_path).map_err(|e| usage(format!("failed to read the plan {}: {e}", plan_path.display())))?;
    if let Some(signers_path) = &trust.allowed_signers {
        let signers = fs::read_to_string(signers_path).map_err(|e| usage(format!("failed to read allowed signers {}: {e}", signers_path.display())))?;
        let sig_path = sign::signature_path(&plan_path);
        let Ok(sig) = fs::read_to_string(&sig_path) else {
            println!("refused: {} has no signature ({} is missing) and --allowed-signers asks for one", plan_path.display(), sig_path.display());
            return Err(1);
        };
        match sign::verify_signature(&plan_bytes, &sig, &signers, trust.identity.as_deref()) {
            Ok(signer) => eprintln!("plan.json.sig verified: signed by {} ({})", signer.identity, signer.fingerprint),
            Err(e) => {
                println!("refused: the plan's signature does not verify: {e}");
                return Err(1);
            }
        }
    }
    let plan: Plan = serde_json::from_slice(&plan_bytes).map_err(|e| usage(format!("{}: not a rollout plan: {e}", plan_path.display())))?;
    if plan.schema_version != PLAN_SCHEMA_VERSION {
        return Err(usage(format!("{}: unknown schema_version {} (this patchlab reads {PLAN_SCHEMA_VERSION})", plan_path.display(), plan.schema_version)));
    }
    let journal_path = dir.join(JOURNAL_FILE);
    let mut journal = OpenOptions::new().read(true).append(true).create(true).open(&journal_path).map_err(|e| usage(format!("failed to open the journal {}: {e}", journal_path.display())))?;
    let locked = if exclusive { journal.lock() } else { journal.lock_shared() };
    locked.map_err(|e| usage(format!("failed to lock the journal {}: {e}", journal_path.display())))?;
    let mut journal_bytes = Vec::new();
    journal.seek(SeekFrom::Start(0)).and_then(|_| journal.read_to_end(&mut journal_bytes)).map_err(|e| usage(format!("failed to read the journal {}: {e}", journal_path.display())))?;
    Ok(Opened { plan, plan_bytes, journal, journal_bytes })
}

/// Verifies the chain and replays it; a broken journal is a refusal (exit 1).
fn progress(o: &Opened) -> Result<(Vec<Entry>, Progress), u8> {
    let checked = journal::verify_chain(&o.plan_bytes, &o.journal_bytes).and_then(|entries| journal::replay(&o.plan, &entries).map(|p| (entries, p)));
    checked.map_err(|e| {
        println!("refused: the journal does not verify: {e}");
        1
    })
}

/// The plan and its journal, locked for appending, with the journal verified and replayed.
fn open_for_writing(dir: &Path, trust: &PlanTrust) -> Result<(Opened, Progress), u8> {
    let o = open(dir, true, trust)?;
    let (_, progress) = progress(&o)?;
    Ok((o, progress))
}

fn append(o: &mut Opened, progress: &mut Progress, mut entry: Entry) -> Result<(), u8> {
    entry.prev_sha256 = journal::chain_head(&o.plan_bytes, &o.journal_bytes);
    // The same rules as a reader's replay: what is appended always replays.
    if let Err(e) = journal::apply(&o.plan, progress, &entry, 0) {
        println!("refused: {e}");
        return Err(1);
    }
    let mut line = entry.line();
    line.push(b'\n');
    o.journal.write_all(&line).and_then(|_| o.journal.sync_data()).map_err(|e| usage(format!("failed to append to the journal: {e}")))?;
    o.journal_bytes.extend(line);
    Ok(())
}

fn next(dir: &Path, trust: &PlanTrust, wait: bool) -> u8 {
    loop {
        let (mut o, mut progress) = match open_for_writing(dir, trust) {
            Ok(opened) => opened,
            Err(code) => return code,
        };
        let now = now();
        if progress.last_time.is_some_and(|t| now < t) {
            println!("refused: the clock reads {now}, earlier than the last journal entry");
            return 1;
        }
        match journal::decide_next(&o.plan, &progress, now) {
            Decision::Start { wave } => {
                let name = o.plan.waves[wave].name.clone();
                let entry = Entry { prev_sha256: String::new(), time: now.to_string(), wave: name.clone(), host: None, status: EntryStatus::WaveStarted, log: None, log_sha256: None };
                if let Err(code) = append(&mut o, &mut progress, entry) {
                    return code;
                }
                eprintln!("wave {name} started: record each host with `patchlab rollout record {} --host NAME --status ok|failed`", dir.display());
                for h in &o.plan.waves[wave].hosts {
                    println!("{h}");
                }
                return 0;
            }
            d @ Decision::Burning { until, .. } if wait => {
                eprintln!("{}", d.reason(&o.plan, now));
                drop(o);
                let left = until.duration_since(now).as_millis().max(0) as u64;
                std::thread::sleep(std::time::Duration::from_millis(left + 50));
            }
            d => {
                eprintln!("{}", d.reason(&o.plan, now));
                return 1;
            }
        }
    }
}

fn record(dir: &Path, trust: &PlanTrust, host: &str, status: RecordStatus, log: Option<&Path>) -> u8 {
    let log_sha256 = match log.map(sign::sha256_file) {
        Some(Err(e)) => return usage(format!("failed to read log {}: {e}", log.unwrap().display())),
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let (mut o, mut progress) = match open_for_writing(dir, trust) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let wave = match journal::check_record(&o.plan, &progress, host) {
        Ok(w) => o.plan.waves[w].name.clone(),
        Err(e) => {
            println!("refused: {e}");
            return 1;
        }
    };
    let now = now();
    if progress.last_time.is_some_and(|t| now < t) {
        println!("refused: the clock reads {now}, earlier than the last journal entry");
        return 1;
    }
    let entry_status = match status {
        RecordStatus::Ok => EntryStatus::Ok,
        RecordStatus::Failed => EntryStatus::Failed,
    };
    let entry =
        Entry { prev_sha256: String::new(), time: now.to_string(), wave: wave.clone(), host: Some(host.to_string()), status: entry_status, log: log.map(|l| l.display().to_string()), log_sha256 };
    if let Err(code) = append(&mut o, &mut progress, entry) {
        return code;
    }
    println!("recorded: {host} {} in wave {wave}", if status == RecordStatus::Ok { "ok" } else { "failed" });
    if status == RecordStatus::Failed {
        println!("wave {wave} is halted: no further wave will start");
    }
    0
}

fn show_status(dir: &Path, trust: &PlanTrust, format: Format) -> u8 {
    let o = match open(dir, false, trust) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let (entries, progress) = match progress(&o) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let signed = sign::signature_path(&dir.join(PLAN_FILE)).is_file();
    let v = status::view(&o.plan, &progress, entries.len(), signed, now());
    let text = match format {
        Format::Text => status::render_text(&v),
        Format::Md => status::render_md(&v),
        Format::Html => status::render_html(&v),
    };
    print!("{text}");
    0
}
