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

#[derive(Parser)]
#[command(name = "patchlab", version, about = "Qualify security patches on throwaway clones of libvirt guests", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where images, golden states and running clones live.
    #[arg(long, global = true, env = "PATCHLAB_CACHE_DIR", default_value_os_t = patchlab::image::default_cache_dir())]
    cache_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run a lab: every patch on a fresh clone of every platform, then write report.json.
    #[command(after_help = EXIT_CODES)]
    Run {
        /// The lab file (see docs/lab-format.md).
        lab: PathBuf,
        /// Output directory for report.json, patches/ and evidence/ [default: patchlab-runs/<lab>-<time>]
        #[arg(long)]
        out: Option<PathBuf>,
        /// libvirt connection URI.
        #[arg(long, env = "PATCHLAB_CONNECT", default_value = "qemu:///system")]
        connect: String,
        /// Accelerator: auto probes KVM and falls back to TCG.
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// Cells at once [default: cores, bounded by free memory].
        #[arg(long)]
        jobs: Option<usize>,
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
    /// Remove patchlab domains and clone files left by runs that are no longer alive.
    Clean {
        #[arg(long, env = "PATCHLAB_CONNECT", default_value = "qemu:///system")]
        connect: String,
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
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PATCHLAB_LOG").unwrap_or_else(|_| "info".into())).with_writer(std::io::stderr).with_target(false).init();
    ExitCode::from(run(cli))
}

fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Lab { command: LabCommand::Check { lab } } => match patchlab::lab::Lab::load(&lab) {
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
        Command::Clean { connect } => match patchlab::hypervisor::libvirt::LibvirtHost::connect(&connect, Dirs::new(cli.cache_dir)).and_then(|h| h.reap()) {
            Ok(reaped) => {
                for r in &reaped {
                    println!("removed {r}");
                }
                println!("{} leftovers removed", reaped.len());
                0
            }
            Err(e) => {
                eprintln!("error: failed to {e}");
                3
            }
        },
        Command::Run { lab, out, connect, accel, jobs } => {
            let lab = match patchlab::lab::Lab::load(&lab) {
                Ok(lab) => lab,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 2;
                }
            };
            let out_dir = out.unwrap_or_else(|| patchlab::run::default_out_dir(&lab));
            let opts = patchlab::run::RunOptions { out_dir, uri: connect, cache_dir: cli.cache_dir, accel, jobs };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(cancel_on_signal(cancel.clone()));
                match patchlab::run::run_lab(&lab, &opts, cancel).await {
                    Ok(report) => {
                        println!("verdict: {:?}", report.verdict);
                        println!("report: {}", opts.out_dir.join("report.json").display());
                        report.exit_code() as u8
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
