//! The CLI edge: arguments, logging, exit codes, error rendering. No logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use patchlab::hypervisor::{AccelChoice, Dirs};
use tokio_util::sync::CancellationToken;

const EXIT_CODES: &str = "Exit codes:
  0  every cell passed (run), or the command succeeded
  1  at least one patch failed a condition
  2  invalid input or usage (bad lab file, unknown option)
  3  the lab itself broke (libvirt unreachable, a clone or the guest agent failed)";

const VERIFY_EXIT_CODES: &str = "Exit codes:
  0  the report is valid (verify) or the patch files may ship (gate)
  1  invalid or refused: every reason is printed, one per line
  2  usage (unreadable allowed_signers, report or patch file, unknown option)";

#[derive(Parser)]
#[command(name = "patchlab", version, about = "Qualify security patches on throwaway clones of libvirt guests", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where images, golden states and running clones live.
    #[arg(long, global = true, env = "PATCHLAB_CACHE_DIR", default_value_os_t = patchlab::image::default_cache_dir())]
    cache_dir: PathBuf,
    /// Plain log lines without colours or progress bars; implied by CI=true or a stderr that is not a terminal.
    #[arg(long, global = true)]
    ci: bool,
    /// Also write the logs as JSON lines (tracing's JSON format) to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    log_json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a lab: every patch on a fresh clone of every platform, then write report.json.
    #[command(after_help = EXIT_CODES)]
    Run {
        /// The lab file (see docs/lab-format.md); with --resume, defaults to the one the journal names.
        #[arg(required_unless_present = "resume")]
        lab: Option<PathBuf>,
        /// Output directory for report.json, journal.jsonl, patches/ and evidence/ [default: patchlab-runs/<lab>-<time>]
        #[arg(long, conflicts_with = "resume")]
        out: Option<PathBuf>,
        /// Finish the interrupted run in DIR: run only the cells its journal.jsonl does not list as
        /// finished, on the same golden states, and write one report for the whole lab. Refused if
        /// the lab file, a golden state or a patch file changed since the run began.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// libvirt connection URI.
        #[arg(long, env = "PATCHLAB_CONNECT", default_value = "qemu:///system")]
        connect: String,
        /// Spread the cells over these libvirt URIs, round-robin (repeatable; overrides the lab's
        /// `hosts` and --connect). A URI that names a host (qemu+tcp://HOST/system,
        /// qemu+ssh://USER@HOST/system) is used through libvirt's storage pool and stream APIs
        /// only; see docs/lab-format.md, "Remote hosts".
        #[arg(long = "host", value_name = "URI")]
        hosts: Vec<String>,
        /// Accelerator: auto probes KVM and falls back to TCG.
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// Cells at once [default: cores, bounded by free memory].
        #[arg(long)]
        jobs: Option<usize>,
        /// Sign report.json with this unencrypted OpenSSH ed25519 key (mode 0600); writes report.json.sig.
        #[arg(long, env = "PATCHLAB_SIGNING_KEY")]
        key: Option<PathBuf>,
        /// The --key is a throwaway development key; the report's signer says so (`cargo xtask lab` uses this).
        #[arg(long, requires = "key")]
        development_key: bool,
    },
    /// Generate an ed25519 signing key: id_ed25519, id_ed25519.pub and allowed_signers in DIR.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// The signer identity written to allowed_signers [default: patchlab@<hostname>].
        #[arg(long)]
        identity: Option<String>,
    },
    /// Check a signed report: signature, schema, and the sha256 of every evidence and patch file.
    #[command(after_help = VERIFY_EXIT_CODES)]
    Verify {
        /// report.json; its signature is REPORT.sig beside it.
        report: PathBuf,
        /// OpenSSH allowed_signers file (see ssh-keygen(1)).
        #[arg(long)]
        allowed_signers: PathBuf,
        /// Require the signer to be listed under this identity.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Decide whether patch files may ship: the report verifies, is complete and recent, passed, and tested exactly these files.
    #[command(after_help = VERIFY_EXIT_CODES)]
    Gate {
        /// report.json; its signature is REPORT.sig beside it.
        report: PathBuf,
        /// OpenSSH allowed_signers file (see ssh-keygen(1)).
        #[arg(long)]
        allowed_signers: PathBuf,
        /// Require the signer to be listed under this identity.
        #[arg(long)]
        identity: Option<String>,
        /// The files about to ship; each must be a file the report tested (same sha256).
        #[arg(long = "patch", value_name = "FILE", required = true, num_args = 1..)]
        patches: Vec<PathBuf>,
        /// The report must be younger than this (units w, d, h, m, s).
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = patchlab::report::gate::parse_duration)]
        max_age: jiff::SignedDuration,
        /// Every cell of these platforms must have passed.
        #[arg(long = "platform", value_name = "NAME", num_args = 1..)]
        platforms: Vec<String>,
        /// The report's coverage condition must have passed with at least this share of the inventory's hosts covered.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(0..=100))]
        min_coverage: Option<u32>,
    },
    /// Validate lab files without running anything.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Guest images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Remove what runs that are no longer alive left: their patchlab domains (only those carrying
    /// patchlab's metadata), clone directories and state copies, run locks, and interrupted golden
    /// preparations and image builds whose lock is free.
    Clean {
        /// libvirt URI of the host to clean; on a remote host (one the URI names), this machine's
        /// clone volumes and domains in its `patchlab` pool.
        #[arg(long, env = "PATCHLAB_CONNECT", default_value = "qemu:///system")]
        connect: String,
        /// Also remove golden states and images not used for --older-than days (only while no run is alive).
        #[arg(long)]
        cache: bool,
        /// With --cache: how long unused, in days.
        #[arg(long, value_name = "DAYS", default_value_t = 30, requires = "cache")]
        older_than: u64,
    },
    /// Deploy a qualified patch in waves: plan, next, record, status (see docs/rollout.md).
    Rollout {
        #[command(subcommand)]
        command: patchlab::rollout::cli::RolloutCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Check a lab file and print what it would run.
    Check { lab: PathBuf },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image from its recipe (cached by recipe digest) and print where it is.
    Build { recipe: PathBuf },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let ci = output::ci_mode(cli.ci);
    let bars = match output::init_logging(ci, cli.log_json.as_deref()) {
        Ok(bars) => bars,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    ExitCode::from(run(cli, bars))
}

fn run(cli: Cli, bars: Option<indicatif::MultiProgress>) -> u8 {
    match cli.command {
        Command::Lab { command: LabCommand::Check { lab } } => match patchlab::lab::Lab::load(&lab).and_then(|lab| {
            // The inventory is input too: check it now rather than when a run starts.
            lab.inventory.as_deref().map(patchlab::inventory::Inventory::load).transpose()?;
            Ok(lab)
        }) {
            Ok(lab) => {
                println!("{}: ok: {} platforms × {} patches = {} cells, {} checks", lab.path.display(), lab.platforms.len(), lab.patches.len(), lab.platforms.len() * lab.patches.len(), lab.checks.len());
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::Image { command: ImageCommand::Build { recipe } } => match patchlab::image::ensure_built(&recipe, &cli.cache_dir) {
            Ok(image) => {
                println!("{}", image.dir.display());
                0
            }
            Err(e) => {
                eprintln!("error: failed to {e}");
                3
            }
        },
        Command::Clean { connect, cache, older_than } => match patchlab::hypervisor::reap_host(&connect, &Dirs::new(cli.cache_dir.clone())) {
            Ok(mut reaped) => {
                let opts = patchlab::hypervisor::clean::CleanOptions { unused_for: cache.then(|| std::time::Duration::from_secs(older_than.saturating_mul(86_400))) };
                let files = patchlab::hypervisor::clean::clean_files(&Dirs::new(cli.cache_dir), &opts);
                reaped.extend(files.removed);
                for r in &reaped {
                    println!("removed {r}");
                }
                for k in &files.kept {
                    println!("kept {k}");
                }
                println!("{} leftovers removed", reaped.len());
                0
            }
            Err(e) => {
                eprintln!("error: failed to {e}");
                3
            }
        },
        Command::Rollout { command } => patchlab::rollout::cli::run(command),
        Command::Keygen { out, identity } => signing::keygen(&out, identity),
        Command::Verify { report, allowed_signers, identity } => signing::verify(&report, &allowed_signers, identity.as_deref()),
        Command::Gate { report, allowed_signers, identity, patches, max_age, platforms, min_coverage } => signing::gate(&report, &allowed_signers, identity.as_deref(), &patches, max_age, platforms, min_coverage),
        Command::Run { lab, out, resume, connect, hosts, accel, jobs, key, development_key } => {
            let lab = match (lab, &resume) {
                (Some(lab), _) => lab,
                (None, Some(dir)) => match patchlab::run::journaled_lab_file(dir) {
                    Ok(lab) => lab,
                    Err(e) => {
                        eprintln!("error: cannot resume {}: {e}", dir.display());
                        return 2;
                    }
                },
                (None, None) => unreachable!("clap requires a lab unless --resume"),
            };
            let lab = match patchlab::lab::Lab::load(&lab) {
                Ok(lab) => lab,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 2;
                }
            };
            // A key that cannot sign is refused before hours of cells, not after.
            if let Some(Err(e)) = key.as_deref().map(patchlab::report::sign::load_signing_key) {
                eprintln!("error: failed to {e}");
                return 2;
            }
            let out_dir = resume.clone().or(out).unwrap_or_else(|| patchlab::run::default_out_dir(&lab));
            let opts = patchlab::run::RunOptions { out_dir, uri: connect, hosts, cache_dir: cli.cache_dir, accel, jobs, signing_key: key, development_key };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(cancel_on_signal(cancel.clone()));
                let observer: std::sync::Arc<dyn patchlab::run::progress::Observer> = match bars {
                    Some(multi) => std::sync::Arc::new(output::Bars::new(multi)),
                    None => std::sync::Arc::new(output::LogPhases),
                };
                let result = patchlab::run::run_lab_observed(&lab, &opts, cancel, resume.is_some(), observer).await;
                match result {
                    Ok(report) => {
                        println!("verdict: {:?}", report.verdict);
                        println!("report: {}", opts.out_dir.join("report.json").display());
                        report.exit_code() as u8
                    }
                    Err(patchlab::run::RunError::Input(e)) => {
                        eprintln!("error: {e}");
                        2
                    }
                    Err(e @ (patchlab::run::RunError::Resume(_) | patchlab::run::RunError::Journal(patchlab::run::journal::JournalError::Invalid { .. }))) => {
                        eprintln!("error: {e}");
                        2
                    }
                    Err(e) => {
                        eprintln!("error: failed to {e}");
                        3
                    }
                }
            })
        }
    }
}

/// SIGINT or SIGTERM: stop starting cells, let running ones tear down, write an incomplete report.
async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::warn!("interrupted: tearing down clones and writing an incomplete report");
    cancel.cancel();
}

/// Logs and progress: plain lines in CI, progress lines per running cell on a terminal.
mod output {
    use std::collections::HashMap;
    use std::io::{IsTerminal, Write};
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use patchlab::report::CellResult;
    use patchlab::run::progress::{CellId, Observer};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    /// `--ci`, CI=true (as CI systems set it) or a stderr that is not a terminal.
    pub fn ci_mode(flag: bool) -> bool {
        let env = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        flag || env || !std::io::stderr().is_terminal()
    }

    /// Installs the log subscriber; on a terminal, returns the progress display the logs print above.
    pub fn init_logging(ci: bool, json: Option<&Path>) -> Result<Option<MultiProgress>, String> {
        let filter = || EnvFilter::try_from_env("PATCHLAB_LOG").unwrap_or_else(|_| "info".into());
        let json_layer = match json {
            Some(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| format!("open log file {}: {e}", path.display()))?;
                Some(tracing_subscriber::fmt::layer().json().with_current_span(false).with_writer(Mutex::new(file)).with_filter(filter()))
            }
            None => None,
        };
        let registry = tracing_subscriber::registry().with(json_layer);
        if ci {
            registry.with(tracing_subscriber::fmt::layer().with_ansi(false).with_target(false).with_writer(std::io::stderr).with_filter(filter())).init();
            Ok(None)
        } else {
            let multi = MultiProgress::new();
            let writer = BarsWriter(multi.clone());
            registry.with(tracing_subscriber::fmt::layer().with_target(false).with_writer(move || writer.clone()).with_filter(filter())).init();
            Ok(Some(multi))
        }
    }

    /// Writes log lines above the progress lines instead of through them.
    #[derive(Clone)]
    struct BarsWriter(MultiProgress);

    impl Write for BarsWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.suspend(|| std::io::stderr().write_all(buf))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            std::io::stderr().flush()
        }
    }

    /// One line per running cell: platform × patch, its phase, elapsed time; a total above them.
    pub struct Bars {
        multi: MultiProgress,
        total: ProgressBar,
        cells: Mutex<HashMap<usize, ProgressBar>>,
    }

    impl Bars {
        pub fn new(multi: MultiProgress) -> Bars {
            let total = multi.add(ProgressBar::new(0));
            total.set_style(ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} cells  {elapsed}").expect("template").progress_chars("=> "));
            total.set_prefix("lab");
            Bars { multi, total, cells: Mutex::new(HashMap::new()) }
        }
    }

    impl Observer for Bars {
        fn planned(&self, to_run: usize, already_done: usize) {
            self.total.set_length((to_run + already_done) as u64);
            self.total.set_position(already_done as u64);
        }
        fn cell_started(&self, cell: &CellId) {
            let bar = self.multi.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("  {spinner} {prefix} {msg:12} {elapsed}").expect("template"));
            bar.set_prefix(format!("{} × {}", cell.platform, cell.patch));
            bar.set_message("starting");
            bar.enable_steady_tick(Duration::from_millis(250));
            self.cells.lock().expect("bars").insert(cell.index, bar);
        }
        fn cell_phase(&self, cell: &CellId, phase: &str) {
            if let Some(bar) = self.cells.lock().expect("bars").get(&cell.index) {
                bar.set_message(phase.to_string());
            }
        }
        fn cell_finished(&self, cell: &CellId, result: &CellResult) {
            if let Some(bar) = self.cells.lock().expect("bars").remove(&cell.index) {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
            self.total.inc(1);
            let verdict = patchlab::report::gate::verdict_name(result.verdict);
            let _ = self.multi.println(format!("  {verdict:5} {} × {} in {:.1} s", cell.platform, cell.patch, result.duration_ms as f64 / 1000.0));
            if self.total.length().is_some_and(|l| self.total.position() >= l) {
                self.total.finish_and_clear();
            }
        }
    }

    /// In CI: each phase as a plain log line, so a stuck cell shows where it is.
    pub struct LogPhases;

    impl Observer for LogPhases {
        fn cell_phase(&self, cell: &CellId, phase: &str) {
            tracing::info!(platform = cell.platform, patch = cell.patch, phase, "cell phase");
        }
    }
}

/// `keygen`, `verify` and `gate`: read files and the clock, then print what the library decided.
mod signing {
    use std::path::{Path, PathBuf};

    use patchlab::report::sign::{self, Verification};
    use patchlab::report::{Report, gate};

    pub fn keygen(out: &Path, identity: Option<String>) -> u8 {
        let identity = identity.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
            format!("patchlab@{host}")
        });
        match sign::keygen(out, &identity) {
            Ok(k) => {
                println!("private key:     {} (keep it secret; pass it to `patchlab run --key`)", k.private_key.display());
                println!("public key:      {}", k.public_key.display());
                println!("allowed signers: {} (give it to whoever verifies)", k.allowed_signers.display());
                println!("identity:        {identity}");
                println!("fingerprint:     {}", k.fingerprint);
                0
            }
            Err(e) => {
                eprintln!("error: failed to {e}");
                2
            }
        }
    }

    fn read_inputs(report: &Path, allowed_signers: &Path) -> Result<String, u8> {
        if !report.is_file() {
            eprintln!("error: failed to read report {}: no such file", report.display());
            return Err(2);
        }
        std::fs::read_to_string(allowed_signers).map_err(|e| {
            eprintln!("error: failed to read allowed signers {}: {e}", allowed_signers.display());
            2
        })
    }

    fn summary(v: &Verification) {
        let Some(r) = &v.report else { return };
        println!("verdict:  {}", gate::verdict_name(r.verdict));
        println!("complete: {}", if r.complete { "yes" } else { "no" });
        println!("lab:      {} ({}, sha256 {})", r.lab.name, r.lab.file, r.lab.sha256);
        println!("finished: {}", r.finished_at);
        match &v.signer {
            Some(s) => println!("signer:   {} ({})", s.identity, s.fingerprint),
            None => println!("signer:   none verified"),
        }
        print_grid(r);
    }

    fn print_grid(r: &Report) {
        let width = r.platforms.iter().map(|p| p.name.chars().count()).max().unwrap_or(0).max("platform".len());
        let cols: Vec<usize> = r.patches.iter().map(|p| p.name.chars().count().max(7)).collect();
        let mut head = format!("{:width$}", "platform");
        for (p, w) in r.patches.iter().zip(&cols) {
            head.push_str(&format!("  {:w$}", p.name));
        }
        println!();
        println!("{}", head.trim_end());
        for platform in &r.platforms {
            let mut line = format!("{:width$}", platform.name);
            for (patch, w) in r.patches.iter().zip(&cols) {
                let cell = r.results.iter().find(|c| c.platform == platform.name && c.patch == patch.name).map(|c| gate::verdict_name(c.verdict)).unwrap_or("-");
                line.push_str(&format!("  {cell:w$}"));
            }
            println!("{}", line.trim_end());
        }
        println!();
    }

    pub fn verify(report: &Path, allowed_signers: &Path, identity: Option<&str>) -> u8 {
        let signers = match read_inputs(report, allowed_signers) {
            Ok(s) => s,
            Err(code) => return code,
        };
        let v = sign::verify_report(report, &signers, identity);
        summary(&v);
        if v.is_valid() {
            println!("valid: {}", report.display());
            0
        } else {
            for p in &v.problems {
                println!("invalid: {p}");
            }
            1
        }
    }

    pub fn gate(report: &Path, allowed_signers: &Path, identity: Option<&str>, patches: &[PathBuf], max_age: jiff::SignedDuration, platforms: Vec<String>, min_coverage: Option<u32>) -> u8 {
        let signers = match read_inputs(report, allowed_signers) {
            Ok(s) => s,
            Err(code) => return code,
        };
        let mut patch_files = Vec::new();
        for p in patches {
            match sign::sha256_file(p) {
                Ok(d) => patch_files.push((p.display().to_string(), d)),
                Err(e) => {
                    eprintln!("error: failed to read patch file {}: {e}", p.display());
                    return 2;
                }
            }
        }
        let v = sign::verify_report(report, &signers, identity);
        let mut reasons: Vec<String> = v.problems.iter().map(|p| format!("report does not verify: {p}")).collect();
        if let Some(r) = &v.report {
            reasons.extend(gate::gate(r, &gate::GateFacts { now: jiff::Timestamp::now(), max_age, patch_files, platforms }));
            if let Some(min) = min_coverage {
                reasons.extend(gate::coverage_gate(r, min));
            }
        }
        if reasons.is_empty() {
            let signer = v.signer.as_ref().map(|s| s.identity.as_str()).unwrap_or("?");
            println!("approved: {} patch file(s) passed in {} (signed by {signer})", patches.len(), report.display());
            0
        } else {
            for r in &reasons {
                println!("refused: {r}");
            }
            1
        }
    }
}
