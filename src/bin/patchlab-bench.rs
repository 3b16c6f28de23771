//! `patchlab-bench`: the measurements behind `cargo xtask bench` (issue 7; docs/performance.md).
//!
//! A binary of the patchlab crate because it needs libvirt, which xtask must not link. It measures,
//! on the same images in the same run: cold boot to agent ready, the bare libvirt restore floor,
//! patchlab's clone to ready, one cell's phases with guest vs harness time, disk and memory per
//! clone, and lab wall times (default lab, fixtures lab, and scaling at 1, 2 and 4 cells at once).
//! Every figure is the median of its repetitions with min and max; ratios are taken pair by pair.
//!
//! Everything it starts is named `patchlab-bench-<run>-…` (the restore floor necessarily keeps the
//! golden's name) and carries this run's id in its metadata, under this run's lock.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use patchlab::guest::{Agent, AgentChannel, AgentError};
use patchlab::hypervisor::domain_xml::{self, BootSpec, Identity};
use patchlab::hypervisor::golden::Golden;
use patchlab::hypervisor::libvirt::{DomainChannel, LibvirtClone, LibvirtHost};
use patchlab::hypervisor::runlock::{RunLock, new_run_id};
use patchlab::hypervisor::{AccelChoice, CloneSource, Dirs, HypervisorError, Machine, accel, create_overlay};
use patchlab::lab::{Lab, PlatformSource};

#[derive(Parser)]
#[command(about = "Measure patchlab: cold boot, restore floor, clone to ready, cells, labs (run it through `cargo xtask bench`)")]
struct Args {
    /// Fewer repetitions and a smaller scaling lab; still measures every figure.
    #[arg(long)]
    quick: bool,
    /// Where bench.json, the lab runs and the generated labs go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The platform of labs/default.toml the single-clone figures use.
    #[arg(long, default_value = "debian-12")]
    platform: String,
    /// Only the instrumented cells (phases, guest vs harness time, disk and memory): a quick check
    /// of a change to the cell path; writes cells.json instead of bench.json.
    #[arg(long)]
    cells_only: bool,
    #[arg(long, env = "PATCHLAB_CONNECT", default_value = "qemu:///system")]
    connect: String,
    #[arg(long, env = "PATCHLAB_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

struct Plan {
    cold: usize,
    pairs: usize,
    cells: usize,
    default_lab: usize,
    fixtures_lab: usize,
    fixtures7_extra: usize,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PATCHLAB_LOG").unwrap_or_else(|_| "warn".into())).with_writer(std::io::stderr).init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patchlab-bench: error: {e}");
            std::process::ExitCode::from(3)
        }
    }
}

fn say(what: &str) {
    eprintln!("bench [{}] {what}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn load1() -> f64 {
    loadavg().split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(0.0)
}

type Res<T> = Result<T, String>;

fn run(args: Args) -> Res<()> {
    let root = std::env::current_dir().map_err(|e| e.to_string())?;
    let mut plan = if args.quick {
        Plan { cold: 2, pairs: 3, cells: 2, default_lab: 2, fixtures_lab: 1, fixtures7_extra: 0 }
    } else {
        Plan { cold: 5, pairs: 7, cells: 5, default_lab: 3, fixtures_lab: 3, fixtures7_extra: 2 }
    };
    let bench_started = Instant::now();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let out = std::path::absolute(&args.out).map_err(|e| e.to_string())?;
    let dirs = Dirs::new(args.cache_dir.clone().unwrap_or_else(patchlab::image::default_cache_dir));
    let run_id = new_run_id();
    let _lock = RunLock::acquire(&dirs, &run_id).map_err(|e| e.to_string())?;
    let host = LibvirtHost::connect(&args.connect, dirs.clone()).map_err(|e| e.to_string())?;
    let cancel = CancellationToken::new();
    let mut loads = vec![load1()];

    // The image, accelerator and golden state of the platform the single-clone figures use.
    let default_lab_path = root.join("labs/default.toml");
    let lab = Lab::load(&default_lab_path).map_err(|e| format!("{e:?}"))?;
    let platform = lab.platforms.iter().find(|p| p.name == args.platform).ok_or(format!("labs/default.toml has no platform {}", args.platform))?;
    let PlatformSource::Image(recipe) = &platform.source else { return Err("the bench platform must be an image platform".into()) };
    let image = patchlab::image::ensure_built(recipe, &dirs.root).map_err(|e| e.to_string())?;
    let decision = accel::decide_cached(AccelChoice::Auto, "qemu-system-x86_64", &image.kernel, &dirs.root).map_err(|e| e.to_string())?;
    let golden = host.golden_from_image(&platform.name, &image, decision.accel, &run_id, &cancel).map_err(|e| e.to_string())?;
    say(&format!("run {run_id}: platform {} on {} ({}), golden {}", platform.name, decision.accel.as_str(), decision.reason, golden.dir.display()));
    let ports = lab.guest_ports();

    if args.cells_only {
        plan.cold = 0;
        plan.pairs = 0;
    }
    // Cold boots, then restore floor and clone to ready interleaved pair by pair.
    let mut cold = Vec::new();
    for i in 0..plan.cold {
        let ms = cold_boot(&host, &image, decision.accel, &run_id, i, &cancel)?;
        say(&format!("cold boot {}: {ms} ms", i + 1));
        cold.push(ms);
        loads.push(load1());
    }
    let mut floor = Vec::new();
    let mut clone = Vec::new();
    let mut ready_rss = Vec::new();
    for i in 0..plan.pairs {
        let f = restore_floor(&args.connect, &host, &golden, &run_id, i, &cancel)?;
        let (c, rss) = clone_ready(&host, &golden, &run_id, i, &ports, &cancel)?;
        say(&format!("pair {}: restore floor {f} ms, clone to ready {c} ms (RSS {} MiB)", i + 1, rss >> 20));
        floor.push(f);
        clone.push(c);
        ready_rss.push(rss);
        loads.push(load1());
    }

    // Cells of the default lab's first patch on the bench platform, one at a time, instrumented.
    let patch_dir = out.join("cell-patches");
    let _ = std::fs::remove_dir_all(&patch_dir);
    let patch = patchlab::patch::prepare(&lab.patches[0], &patch_dir).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let mut cells = Vec::new();
    for i in 0..plan.cells {
        let source = ProbeSource { host: &host, golden: &golden, run_id: run_id.clone(), probe: Arc::new(Mutex::new(CellProbe::default())) };
        let cell_plan = patchlab::run::cell::CellPlan { platform: &platform.name, patch: &patch, clone_name: format!("patchlab-bench-{run_id}-cell{i}"), host: args.connect.clone() };
        let probe_phase = source.probe.clone();
        let on_phase = move |name: &str| {
            let mut p = probe_phase.lock().unwrap();
            p.phase = name.to_string();
            p.note(Instant::now(), 0.0, format!("phase {name}"));
        };
        let result = patchlab::run::cell::run_cell_observed(&source, &lab, &cell_plan, runtime.handle(), &cancel, &out.join("cell-evidence"), &on_phase);
        let probe = source.probe.lock().unwrap().clone();
        if result.error.is_some() {
            return Err(format!("bench cell {i} broke: {:?}", result.error));
        }
        say(&format!("cell {}: {} ms, guest commands {} ms, polling slack ≤ {} ms, file transfer {} ms, overlay {} KiB, RSS {} MiB", i + 1, result.duration_ms, probe.exec_ms, probe.poll_slack_ms, probe.file_ms, probe.disk_bytes >> 10, probe.rss_bytes >> 20));
        cells.push((result, probe));
        loads.push(load1());
    }

    if args.cells_only {
        let overhead: Vec<f64> = cells.iter().map(|(r, p)| harness_overhead(r, p, false)).collect();
        let overhead_with_burn_in: Vec<f64> = cells.iter().map(|(r, p)| harness_overhead(r, p, true)).collect();
        let v = json!({
            "load_average": loads, "cell_ms": stat(&cells.iter().map(|(r, _)| r.duration_ms).collect::<Vec<_>>()),
            "cell_guest_ms": stat(&cells.iter().map(|(_, p)| p.exec_ms).collect::<Vec<_>>()),
            "cell_poll_slack_ms": stat(&cells.iter().map(|(_, p)| p.poll_slack_ms).collect::<Vec<_>>()),
            "harness_overhead": fstat(&overhead),
            "harness_overhead_burn_in_counted": fstat(&overhead_with_burn_in),
            "phases": cells.iter().map(|(r, _)| r.phases.iter().map(|p| (p.name.clone(), p.ms)).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "timelines": cells.iter().map(|(_, p)| &p.timeline).collect::<Vec<_>>(),
        });
        std::fs::write(out.join("cells.json"), serde_json::to_string_pretty(&v).unwrap()).map_err(|e| e.to_string())?;
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(());
    }
    // Labs, through the real CLI.
    let bin = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("patchlab");
    let labs_dir = out.join("labs");
    std::fs::create_dir_all(&labs_dir).map_err(|e| e.to_string())?;
    let fixtures_text = std::fs::read_to_string(root.join("labs/fixtures.toml")).map_err(|e| e.to_string())?;
    let fixtures7 = labs_dir.join("fixtures-7.toml");
    std::fs::write(&fixtures7, subset_lab(&fixtures_text, &root, None, Some(&["needs-reboot"]), "fixtures-7")).map_err(|e| e.to_string())?;
    let scaling_lab = if args.quick {
        let p = labs_dir.join("scaling-quick.toml");
        let keep = ["good", "breaks-service", "fails-install", "tampered"];
        let all: Vec<&str> = ["good", "breaks-service", "leaves-residue", "fails-install", "fails-removal", "tampered", "upgrade", "needs-reboot"].into_iter().filter(|n| !keep.contains(n)).collect();
        std::fs::write(&p, subset_lab(&fixtures_text, &root, Some(&["debian-12"]), Some(&all), "scaling-quick")).map_err(|e| e.to_string())?;
        p
    } else {
        fixtures7.clone()
    };
    let mut lab_n = 0;
    let mut run_lab = |lab: &Path, jobs: Option<usize>, what: &str| -> Res<LabRun> {
        lab_n += 1;
        let dir = out.join("runs").join(format!("{lab_n:02}-{what}"));
        let _ = std::fs::remove_dir_all(&dir);
        let r = lab_run(&bin, &root, lab, &dir, jobs)?;
        say(&format!("{what}: {} cells in {} ms (jobs {}), {} error cells", r.cells, r.wall_ms, jobs.map(|j| j.to_string()).unwrap_or("default".into()), r.errors));
        Ok(r)
    };
    let mut default_runs = Vec::new();
    for _ in 0..plan.default_lab {
        default_runs.push(run_lab(&default_lab_path, None, "default")?);
        loads.push(load1());
    }
    let mut scaling = Vec::new();
    for jobs in [1, 2, 4] {
        scaling.push((jobs, run_lab(&scaling_lab, Some(jobs), &format!("scaling-j{jobs}"))?));
        loads.push(load1());
    }
    let mut fixtures7_runs = Vec::new();
    if !args.quick {
        // The 2-at-once scaling run is the fixtures-7 lab at this machine's default parallelism.
        fixtures7_runs.push(scaling[1].1.clone());
    }
    for _ in 0..plan.fixtures7_extra {
        fixtures7_runs.push(run_lab(&fixtures7, Some(2), "fixtures-7")?);
        loads.push(load1());
    }
    let mut fixtures_runs = Vec::new();
    for _ in 0..plan.fixtures_lab {
        fixtures_runs.push(run_lab(&root.join("labs/fixtures.toml"), None, "fixtures")?);
        loads.push(load1());
    }

    // Figures.
    let image_bytes = std::fs::metadata(&image.disk).map_err(|e| e.to_string())?.len();
    let clone_disk = median(&cells.iter().map(|(_, p)| p.disk_bytes).collect::<Vec<_>>());
    let clone_rss = median(&cells.iter().map(|(_, p)| p.rss_bytes).collect::<Vec<_>>());
    let cold_vs_clone: Vec<f64> = cold.iter().zip(&clone).map(|(c, k)| *c as f64 / *k as f64).collect();
    let clone_vs_floor: Vec<f64> = clone.iter().zip(&floor).map(|(k, f)| *k as f64 / *f as f64).collect();
    let overhead: Vec<f64> = cells.iter().map(|(r, p)| harness_overhead(r, p, false)).collect();
    let overhead_with_burn_in: Vec<f64> = cells.iter().map(|(r, p)| harness_overhead(r, p, true)).collect();
    let overhead_with_slack: Vec<f64> = cells.iter().map(|(r, p)| {
        let (wall, guest) = cell_wall_and_guest(r, p, false);
        1.0 - guest.saturating_sub(p.poll_slack_ms) as f64 / wall as f64
    }).collect();
    let phase_names = ["clone", "baseline", "deliver", "install", "checks", "burn-in", "remove", "fingerprint", "teardown"];
    let phase_stats: Vec<(String, Value)> = phase_names.iter().map(|n| (n.to_string(), stat(&cells.iter().filter_map(|(r, _)| r.phases.iter().find(|p| p.name == *n).map(|p| p.ms)).collect::<Vec<_>>()))).collect();
    let base = scaling[0].1.wall_ms as f64;
    let fixtures7_ms: Vec<u64> = fixtures7_runs.iter().map(|r| r.wall_ms).collect();
    let fixtures_ms: Vec<u64> = fixtures_runs.iter().map(|r| r.wall_ms).collect();
    // Without a separate 3 × 7 run (--quick), estimate it: the full lab minus the reboot cells' share.
    let fixtures7_estimate = fixtures_runs.first().map(|r| r.wall_ms.saturating_sub(r.reboot_cells_ms / r.jobs.max(1) as u64));
    let scaling_json: Vec<Value> = scaling.iter().map(|(j, r)| json!({ "jobs": j, "cells": r.cells, "wall_ms": r.wall_ms, "speedup": base / r.wall_ms as f64, "cell_ms": stat(&r.cell_ms) })).collect();
    let lab_phases = |runs: &[LabRun]| -> Value { Value::Object(phase_names.iter().map(|n| (n.to_string(), stat(&runs.iter().flat_map(|r| r.phases.iter().filter(|(p, _)| p == n).map(|(_, ms)| *ms)).collect::<Vec<_>>()))).collect()) };
    let loads_sorted = {
        let mut l = loads.clone();
        l.sort_by(f64::total_cmp);
        l
    };
    let report = json!({
        "schema": 1,
        "quick": args.quick,
        "run_id": run_id,
        "platform": platform.name,
        "accel": decision.accel.as_str(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_average": { "median": loads_sorted[loads_sorted.len() / 2], "min": loads_sorted[0], "max": loads_sorted[loads_sorted.len() - 1], "samples": loads },
        "bench_ms": bench_started.elapsed().as_millis() as u64,
        "cold_boot_ms": stat(&cold),
        "restore_floor_ms": stat(&floor),
        "clone_ready_ms": stat(&clone),
        "ratios": { "cold_over_clone": fstat(&cold_vs_clone), "clone_over_floor": fstat(&clone_vs_floor) },
        "cell_ms": stat(&cells.iter().map(|(r, _)| r.duration_ms).collect::<Vec<_>>()),
        "cell_phases_ms": Value::Object(phase_stats.into_iter().collect()),
        "cell_guest_ms": stat(&cells.iter().map(|(_, p)| p.exec_ms).collect::<Vec<_>>()),
        "cell_poll_slack_ms": stat(&cells.iter().map(|(_, p)| p.poll_slack_ms).collect::<Vec<_>>()),
        "cell_file_transfer_ms": stat(&cells.iter().map(|(_, p)| p.file_ms).collect::<Vec<_>>()),
        "cell_guest_commands": stat(&cells.iter().map(|(_, p)| p.execs).collect::<Vec<_>>()),
        "harness_overhead": fstat(&overhead),
        "harness_overhead_with_poll_slack": fstat(&overhead_with_slack),
        "harness_overhead_burn_in_counted": fstat(&overhead_with_burn_in),
        "image_bytes": image_bytes,
        "clone_disk_bytes": clone_disk,
        "clone_rss_bytes": clone_rss,
        "clone_ready_rss_bytes": median(&ready_rss),
        "default_lab_ms": stat(&default_runs.iter().map(|r| r.wall_ms).collect::<Vec<_>>()),
        "default_lab_phases_ms": lab_phases(&default_runs),
        "fixtures_lab_ms": stat(&fixtures_ms),
        "fixtures_lab_cells": fixtures_runs.first().map(|r| r.cells).unwrap_or(0),
        "fixtures_lab_phases_ms": lab_phases(&fixtures_runs),
        "fixtures_lab_cell_ms": stat(&fixtures_runs.iter().flat_map(|r| r.cell_ms.clone()).collect::<Vec<_>>()),
        "fixtures7_lab_ms": if fixtures7_ms.is_empty() { Value::Null } else { stat(&fixtures7_ms) },
        "fixtures7_lab_estimate_ms": fixtures7_estimate,
        "scaling_lab": scaling_lab.file_name().unwrap_or_default().to_string_lossy(),
        "scaling": scaling_json,
    });
    let path = out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("{}", table(&report));
    println!("bench.json: {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn stat(v: &[u64]) -> Value {
    json!({ "median": median(v), "min": v.iter().min().copied().unwrap_or(0), "max": v.iter().max().copied().unwrap_or(0), "n": v.len(), "samples": v })
}

fn fstat(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({ "median": r(med), "min": r(s.first().copied().unwrap_or(0.0)), "max": r(s.last().copied().unwrap_or(0.0)), "n": s.len() })
}

// ---------------------------------------------------------------------------------------------
// Single-clone figures.

fn cell_dir(host: &LibvirtHost, run_id: &str, name: &str) -> Res<PathBuf> {
    let dir = host.dirs.clones().join(run_id).join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Destroys a domain and removes a directory when dropped.
struct Scratch {
    domain: Option<virt::domain::Domain>,
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = self.domain.take() {
            let _ = d.destroy();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(run_dir) = self.dir.parent() {
            let _ = std::fs::remove_dir(run_dir);
        }
    }
}

/// A fresh overlay over the image, booted from scratch as a transient domain, to agent ready.
fn cold_boot(host: &LibvirtHost, image: &patchlab::image::BuiltImage, accel: patchlab::hypervisor::Accel, run_id: &str, i: usize, cancel: &CancellationToken) -> Res<u64> {
    let name = format!("patchlab-bench-{run_id}-cold{i}");
    let dir = cell_dir(host, run_id, &format!("cold{i}"))?;
    let mut scratch = Scratch { domain: None, dir: dir.clone() };
    let started = Instant::now();
    let disk = dir.join("disk.qcow2");
    create_overlay(&image.disk, &disk).map_err(|e| e.to_string())?;
    let identity = Identity { name: name.clone(), uuid: uuid::Uuid::new_v4().to_string(), disk, console: dir.join("console.log"), ports: vec![] };
    let spec = BootSpec { identity, accel, memory_mib: image.recipe.memory_mib, vcpus: image.recipe.vcpus, kernel: Some((image.kernel.clone(), image.initrd.clone(), image.cmdline.clone())) };
    let xml = domain_xml::boot_xml(&spec, run_id, "bench");
    let conn = virt::connect::Connect::open(Some(&host.uri)).map_err(|e| e.to_string())?;
    let domain = conn.create_domain_xml(&xml, 0).map_err(|e| format!("start {name}: {e}"))?;
    scratch.domain = Some(domain.clone());
    let channel = DomainChannel(domain);
    Agent::new(&channel, cancel.clone()).wait_ready(Duration::from_secs(600)).map_err(|e| format!("{name}: {e}"))?;
    Ok(started.elapsed().as_millis() as u64)
}

/// The bare libvirt restore of the golden state itself (no state copy, no XML rewrite beyond the
/// disk, console and run id that `dxml` may change), into a fresh overlay, to agent ready.
fn restore_floor(uri: &str, host: &LibvirtHost, golden: &Golden, run_id: &str, i: usize, cancel: &CancellationToken) -> Res<u64> {
    let dir = cell_dir(host, run_id, &format!("floor{i}"))?;
    let mut scratch = Scratch { domain: None, dir: dir.clone() };
    let conn = virt::connect::Connect::open(Some(uri)).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let disk = dir.join("disk.qcow2");
    create_overlay(&golden.record.disk, &disk).map_err(|e| e.to_string())?;
    let mut xml = golden.header.xml.replace(&format!("<source file='{}'", golden.record.disk.display()), &format!("<source file='{}'", disk.display()));
    xml = xml.replace(&format!("'{}'", golden.record.console.display()), &format!("'{}'", dir.join("console.log").display()));
    if let (Some(s), Some(e)) = (xml.find("<patchlab:run>").map(|s| s + "<patchlab:run>".len()), xml.find("</patchlab:run>")) {
        xml.replace_range(s..e, run_id);
    }
    conn.restore_domain_flags(&golden.state_path().to_string_lossy(), Some(&xml), virt::sys::VIR_DOMAIN_SAVE_RUNNING).map_err(|e| format!("restore {} (is another process running the golden domain itself?): {e}", golden.state_path().display()))?;
    let domain = conn.lookup_domain_by_name(&golden.record.domain_name).map_err(|e| e.to_string())?;
    scratch.domain = Some(domain.clone());
    let channel = DomainChannel(domain);
    Agent::new(&channel, cancel.clone()).wait_ready(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    Ok(started.elapsed().as_millis() as u64)
}

/// patchlab's own clone path to agent ready; also the QEMU RSS right then.
fn clone_ready(host: &LibvirtHost, golden: &Golden, run_id: &str, i: usize, ports: &[u16], cancel: &CancellationToken) -> Res<(u64, u64)> {
    let name = format!("patchlab-bench-{run_id}-clone{i}");
    let started = Instant::now();
    let mut clone = host.restore_clone(golden, run_id, &name, ports).map_err(|e| e.to_string())?;
    Agent::new(clone.agent_channel(), cancel.clone()).wait_ready(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let ms = started.elapsed().as_millis() as u64;
    let rss = qemu_rss(&name);
    clone.teardown().map_err(|e| e.to_string())?;
    Ok((ms, rss))
}

/// VmRSS of the domain's QEMU process, from the pid file libvirt keeps.
fn qemu_rss(name: &str) -> u64 {
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).map(|kib| kib * 1024).unwrap_or(0)
}

/// Bytes a file really occupies (allocated blocks), as `du` counts them.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// A cell's wall time and guest time. Unless `burn_in` is set, without the burn-in phase: the lab's
/// deliberate wait between rounds of the same checks is neither guest work nor harness work (the
/// harness target was set on cells without a burn-in).
fn cell_wall_and_guest(r: &patchlab::report::CellResult, p: &CellProbe, burn_in: bool) -> (u64, u64) {
    let burn_in_ms = if burn_in { 0 } else { r.phases.iter().filter(|ph| ph.name == "burn-in").map(|ph| ph.ms).sum() };
    let guest = if burn_in { p.exec_ms } else { p.exec_ms.saturating_sub(p.burn_in_exec_ms) };
    (r.duration_ms.saturating_sub(burn_in_ms).max(1), guest)
}

/// 1 − guest / wall, see [`cell_wall_and_guest`].
fn harness_overhead(r: &patchlab::report::CellResult, p: &CellProbe, burn_in: bool) -> f64 {
    let (wall, guest) = cell_wall_and_guest(r, p, burn_in);
    1.0 - guest as f64 / wall as f64
}

// ---------------------------------------------------------------------------------------------
// An instrumented cell: the real cell state machine on a real clone, with its agent channel timed
// and the clone measured just before teardown.

#[derive(Debug, Clone, Default)]
struct CellProbe {
    /// The cell's current phase (from `run_cell_observed`).
    phase: String,
    /// Σ over guest commands of (guest-exec sent → exit seen): the guest's own work plus polling slack.
    exec_ms: u64,
    /// The part of `exec_ms` seen during the burn-in phase.
    burn_in_exec_ms: u64,
    /// Σ over guest commands of (last "still running" reply → exit seen): what polling may add.
    poll_slack_ms: u64,
    /// Time in guest-file-* requests (pushes, reads).
    file_ms: u64,
    execs: u64,
    disk_bytes: u64,
    rss_bytes: u64,
    /// Every agent request and phase change, in order: where a cell's time goes.
    timeline: Vec<Event>,
    /// When the cell began (its first phase, the first note), the origin of `timeline`.
    origin: Option<Instant>,
}

/// One entry of a cell's timeline: milliseconds since the cell began.
#[derive(Debug, Clone, serde::Serialize)]
struct Event {
    at_ms: f64,
    ms: f64,
    phase: String,
    what: String,
}

impl CellProbe {
    fn note(&mut self, at: Instant, ms: f64, what: String) {
        let origin = *self.origin.get_or_insert(at);
        let at_ms = at.saturating_duration_since(origin).as_secs_f64() * 1000.0;
        self.timeline.push(Event { at_ms: (at_ms * 10.0).round() / 10.0, ms: (ms * 10.0).round() / 10.0, phase: self.phase.clone(), what });
    }
}

struct ProbeSource<'a> {
    host: &'a LibvirtHost,
    golden: &'a Golden,
    run_id: String,
    probe: Arc<Mutex<CellProbe>>,
}

impl CloneSource for ProbeSource<'_> {
    fn clone_machine(&self, _platform: &str, clone_name: &str, guest_ports: &[u16]) -> Result<Box<dyn Machine>, HypervisorError> {
        let inner = self.host.restore_clone(self.golden, &self.run_id, clone_name, guest_ports)?;
        let domain = inner.domain().expect("a restored clone has a domain").clone();
        let channel = TimedChannel { inner: DomainChannel(domain), probe: self.probe.clone(), running: Mutex::new(Default::default()) };
        Ok(Box::new(ProbedMachine { inner, channel, probe: self.probe.clone() }))
    }
}

struct ProbedMachine {
    inner: LibvirtClone,
    channel: TimedChannel,
    probe: Arc<Mutex<CellProbe>>,
}

impl Machine for ProbedMachine {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn agent_channel(&self) -> &dyn AgentChannel {
        &self.channel
    }
    fn forwarded(&self, guest_port: u16) -> Option<std::net::SocketAddr> {
        self.inner.forwarded(guest_port)
    }
    fn console_log(&self) -> Option<Vec<u8>> {
        self.inner.console_log()
    }
    fn teardown(&mut self) -> Result<(), HypervisorError> {
        {
            let mut p = self.probe.lock().unwrap();
            if p.disk_bytes == 0 {
                p.disk_bytes = allocated(&self.inner.dir().join("disk.qcow2"));
                p.rss_bytes = qemu_rss(self.inner.name());
            }
        }
        self.inner.teardown()
    }
    fn golden(&self) -> Option<&patchlab::hypervisor::golden::GoldenRef> {
        self.inner.golden()
    }
}

struct TimedChannel {
    inner: DomainChannel,
    probe: Arc<Mutex<CellProbe>>,
    /// pid → (guest-exec sent, last "still running" reply).
    running: Mutex<std::collections::HashMap<i64, (Instant, Instant)>>,
}

impl AgentChannel for TimedChannel {
    fn call(&self, request: &str, timeout: Duration) -> Result<String, AgentError> {
        let sent = Instant::now();
        let reply = self.inner.call(request, timeout)?;
        let now = Instant::now();
        let req: Value = serde_json::from_str(request).unwrap_or(Value::Null);
        let rep: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
        let ret = &rep["return"];
        let execute = req["execute"].as_str().unwrap_or("");
        {
            let what = match execute {
                "guest-exec" => format!("guest-exec {} {}", req["arguments"]["path"].as_str().unwrap_or(""), req["arguments"]["arg"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_default().chars().take(60).collect::<String>()),
                "guest-exec-status" => format!("guest-exec-status exited={}", ret["exited"]),
                other => other.to_string(),
            };
            self.probe.lock().unwrap().note(sent, now.duration_since(sent).as_secs_f64() * 1000.0, what);
        }
        match execute {
            "guest-exec" => {
                if let Some(pid) = ret["pid"].as_i64() {
                    self.running.lock().unwrap().insert(pid, (sent, now));
                }
            }
            "guest-exec-status" => {
                let pid = req["arguments"]["pid"].as_i64().unwrap_or(-1);
                let mut running = self.running.lock().unwrap();
                if ret["exited"].as_bool() == Some(true) {
                    if let Some((start, last)) = running.remove(&pid) {
                        let mut p = self.probe.lock().unwrap();
                        let ms = now.duration_since(start).as_millis() as u64;
                        p.exec_ms += ms;
                        if p.phase == "burn-in" {
                            p.burn_in_exec_ms += ms;
                        }
                        p.poll_slack_ms += now.duration_since(last).as_millis() as u64;
                        p.execs += 1;
                    }
                } else if let Some(entry) = running.get_mut(&pid) {
                    entry.1 = now;
                }
            }
            c if c.starts_with("guest-file-") => self.probe.lock().unwrap().file_ms += now.duration_since(sent).as_millis() as u64,
            _ => {}
        }
        Ok(reply)
    }
}

// ---------------------------------------------------------------------------------------------
// Labs.

#[derive(Debug, Clone)]
struct LabRun {
    wall_ms: u64,
    cells: usize,
    errors: usize,
    jobs: usize,
    cell_ms: Vec<u64>,
    reboot_cells_ms: u64,
    phases: Vec<(String, u64)>,
}

fn lab_run(bin: &Path, root: &Path, lab: &Path, dir: &Path, jobs: Option<usize>) -> Res<LabRun> {
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(root).arg("run").arg(lab).arg("--out").arg(dir).env_remove("PATCHLAB_SIGNING_KEY").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    if let Some(j) = jobs {
        cmd.arg("--jobs").arg(j.to_string());
    }
    let started = Instant::now();
    let status = cmd.status().map_err(|e| format!("start {}: {e}", bin.display()))?;
    let wall_ms = started.elapsed().as_millis() as u64;
    let report: Value = std::fs::read(dir.join("report.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(format!("{} wrote no report.json into {} (exit {status})", lab.display(), dir.display()))?;
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let cell_ms: Vec<u64> = results.iter().filter_map(|r| r["duration_ms"].as_u64()).collect();
    let errors = results.iter().filter(|r| r["verdict"] == "error").count();
    let reboot_cells_ms = results.iter().filter(|r| r["patch"] == "needs-reboot").filter_map(|r| r["duration_ms"].as_u64()).sum();
    let phases = results.iter().flat_map(|r| r["phases"].as_array().cloned().unwrap_or_default()).filter_map(|p| Some((p["name"].as_str()?.to_string(), p["ms"].as_u64()?))).collect();
    let default_jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(LabRun { wall_ms, cells: results.len(), errors, jobs: jobs.unwrap_or(default_jobs), cell_ms, reboot_cells_ms, phases })
}

/// A lab derived from labs/fixtures.toml: only some platforms, without some patches, with the
/// relative paths made absolute so that it can live under the bench's output directory.
fn subset_lab(text: &str, root: &Path, platforms: Option<&[&str]>, drop_patches: Option<&[&str]>, name: &str) -> String {
    let mut out = String::new();
    let mut keep = true;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            let header = t.trim_matches(|c| c == '[' || c == ']');
            keep = match header.split_once('.') {
                Some(("platforms", p)) => platforms.is_none_or(|ps| ps.contains(&p)),
                Some(("patches", p)) => drop_patches.is_none_or(|ds| !ds.contains(&p)),
                _ => true,
            };
        }
        if !keep {
            continue;
        }
        if t.starts_with("name =") {
            out.push_str(&format!("name = \"{name}\"\n"));
            continue;
        }
        out.push_str(&line.replace("\"../", &format!("\"{}/", root.display())));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The table.

fn table(r: &Value) -> String {
    let ms = |v: &Value| format!("{:.1} s (min {:.1}, max {:.1}; n={})", v["median"].as_f64().unwrap_or(0.0) / 1000.0, v["min"].as_f64().unwrap_or(0.0) / 1000.0, v["max"].as_f64().unwrap_or(0.0) / 1000.0, v["n"]);
    let ratio = |v: &Value| format!("{:.2}× (min {:.2}, max {:.2})", v["median"].as_f64().unwrap_or(0.0), v["min"].as_f64().unwrap_or(0.0), v["max"].as_f64().unwrap_or(0.0));
    let mib = |b: &Value| format!("{:.1} MiB", b.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let cold_clone = r["ratios"]["cold_over_clone"]["median"].as_f64().unwrap_or(0.0);
    let clone_floor = r["ratios"]["clone_over_floor"]["median"].as_f64().unwrap_or(0.0);
    rows.push(("cold boot to agent ready".into(), ms(&r["cold_boot_ms"]), String::new()));
    rows.push(("restore floor (bare libvirt restore, to ready)".into(), ms(&r["restore_floor_ms"]), String::new()));
    rows.push(("clone to ready (patchlab)".into(), ms(&r["clone_ready_ms"]), String::new()));
    rows.push(("  cold boot / clone to ready, pair by pair".into(), ratio(&r["ratios"]["cold_over_clone"]), format!("≥ 20×: {}", verdict(cold_clone >= 20.0))));
    rows.push(("  clone to ready / restore floor, pair by pair".into(), ratio(&r["ratios"]["clone_over_floor"]), format!("≤ 1.2×: {}", verdict(clone_floor <= 1.2))));
    rows.push(("one cell of the default lab, alone".into(), ms(&r["cell_ms"]), String::new()));
    for name in ["clone", "baseline", "deliver", "install", "checks", "remove", "fingerprint", "teardown"] {
        rows.push((format!("  phase {name}"), ms(&r["cell_phases_ms"][name]), String::new()));
    }
    let overhead = r["harness_overhead"]["median"].as_f64().unwrap_or(1.0);
    rows.push((format!("  guest commands ({} per cell)", r["cell_guest_commands"]["median"]), ms(&r["cell_guest_ms"]), String::new()));
    rows.push(("    of which polling slack, at most".into(), ms(&r["cell_poll_slack_ms"]), String::new()));
    rows.push(("  file transfer through the agent".into(), ms(&r["cell_file_transfer_ms"]), String::new()));
    rows.push(("  harness overhead (1 − guest / wall, burn-in phase left out)".into(), format!("{:.0} % (min {:.0}, max {:.0})", overhead * 100.0, r["harness_overhead"]["min"].as_f64().unwrap_or(0.0) * 100.0, r["harness_overhead"]["max"].as_f64().unwrap_or(0.0) * 100.0), format!("≤ 15 %: {}", verdict(overhead <= 0.15))));
    rows.push(("  harness overhead, polling slack counted as harness".into(), format!("{:.0} % (min {:.0}, max {:.0})", r["harness_overhead_with_poll_slack"]["median"].as_f64().unwrap_or(0.0) * 100.0, r["harness_overhead_with_poll_slack"]["min"].as_f64().unwrap_or(0.0) * 100.0, r["harness_overhead_with_poll_slack"]["max"].as_f64().unwrap_or(0.0) * 100.0), String::new()));
    rows.push(("  harness overhead, burn-in waits counted as harness".into(), format!("{:.0} % (min {:.0}, max {:.0})", r["harness_overhead_burn_in_counted"]["median"].as_f64().unwrap_or(0.0) * 100.0, r["harness_overhead_burn_in_counted"]["min"].as_f64().unwrap_or(0.0) * 100.0, r["harness_overhead_burn_in_counted"]["max"].as_f64().unwrap_or(0.0) * 100.0), String::new()));
    let img = r["image_bytes"].as_f64().unwrap_or(0.0);
    let disk = r["clone_disk_bytes"].as_f64().unwrap_or(1.0).max(1.0);
    rows.push(("disk per clone after a cell (overlay) vs image".into(), format!("{} vs {} ({:.0}× smaller)", mib(&r["clone_disk_bytes"]), mib(&r["image_bytes"]), img / disk), format!("≥ 50×: {}", verdict(img / disk >= 50.0))));
    rows.push(("memory per clone (QEMU RSS), at ready / after a cell".into(), format!("{} / {}", mib(&r["clone_ready_rss_bytes"]), mib(&r["clone_rss_bytes"])), String::new()));
    for s in r["scaling"].as_array().into_iter().flatten() {
        rows.push((format!("scaling: {} ({} cells), {} at once", r["scaling_lab"].as_str().unwrap_or(""), s["cells"], s["jobs"]), format!("{:.1} s, speed-up {:.2}×", s["wall_ms"].as_f64().unwrap_or(0.0) / 1000.0, s["speedup"].as_f64().unwrap_or(0.0)), String::new()));
    }
    rows.push(("labs/default.toml, images warm".into(), ms(&r["default_lab_ms"]), String::new()));
    // The 90 s target is for 3 × 7 (no reboot cells), the rows below; each reboot cell is a cold boot.
    rows.push((format!("labs/fixtures.toml ({} cells, reboot cells included)", r["fixtures_lab_cells"]), ms(&r["fixtures_lab_ms"]), "(target: 3 × 7, below)".into()));
    if r["fixtures7_lab_ms"].is_object() {
        let s = r["fixtures7_lab_ms"]["median"].as_f64().unwrap_or(0.0) / 1000.0;
        rows.push(("fixtures 3 × 7 (without needs-reboot), 2 at once".into(), ms(&r["fixtures7_lab_ms"]), format!("≤ 90 s: {}", verdict(s <= 90.0))));
    } else if let Some(e) = r["fixtures7_lab_estimate_ms"].as_f64() {
        rows.push(("fixtures 3 × 7 (without needs-reboot), estimated".into(), format!("≈ {:.0} s (full lab minus the reboot cells' share)", e / 1000.0), format!("≤ 90 s: {}", verdict(e / 1000.0 <= 90.0))));
    }
    rows.push(("  one fixtures cell, in the lab".into(), ms(&r["fixtures_lab_cell_ms"]), String::new()));
    let mut s = format!(
        "\npatchlab bench ({}), {} on {} cores, platform {}, load average {:.2} (min {:.2}, max {:.2}), {:.0} s in all\n\n",
        if r["quick"] == true { "--quick" } else { "full" },
        r["accel"].as_str().unwrap_or(""),
        r["cores"],
        r["platform"].as_str().unwrap_or(""),
        r["load_average"]["median"].as_f64().unwrap_or(0.0),
        r["load_average"]["min"].as_f64().unwrap_or(0.0),
        r["load_average"]["max"].as_f64().unwrap_or(0.0),
        r["bench_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    s.push_str("| figure | measured | target |\n|---|---|---|\n");
    for (a, b, c) in rows {
        s.push_str(&format!("| {a} | {b} | {c} |\n"));
    }
    s
}
