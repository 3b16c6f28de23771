//! A whole run: prepare patches and golden states, run every cell (in parallel, bounded), and
//! write the report. Async at this edge only; each cell runs on a blocking thread.

pub mod cell;
pub mod journal;
pub mod progress;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::hypervisor::golden::{Golden, GoldenOrigin};
use crate::hypervisor::libvirt::LibvirtHost;
use crate::hypervisor::remote::{self, PoolGolden, PoolHost};
use crate::hypervisor::runlock::RunLock;
use crate::hypervisor::{AccelChoice, CloneSource, Dirs, HypervisorError, Machine, accel};
use crate::lab::{Lab, PlatformSource};
use crate::patch::{self, PreparedPatch};
use crate::report::{self, CellResult, FileRef, HostRef, LabRef, PatchRef, PlatformRef, Report, Tool, verdict};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub uri: String,
    /// Spread cells over these libvirt URIs, round-robin (`--host`); empty: the lab's `hosts`,
    /// else `uri`.
    pub hosts: Vec<String>,
    pub cache_dir: PathBuf,
    pub accel: AccelChoice,
    pub jobs: Option<usize>,
    /// Sign report.json with this OpenSSH ed25519 key (writes report.json.sig beside it).
    pub signing_key: Option<PathBuf>,
    /// The signing key is a development key: the report says so.
    pub development_key: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Patch(#[from] patch::PatchError),
    #[error("{action}: {source}")]
    Io { action: String, source: std::io::Error },
    #[error("platform `{platform}`: {reason}")]
    Platform { platform: String, reason: String },
    /// Bad input found after the lab file itself parsed (the inventory): exit code 2.
    #[error("{0}")]
    Input(crate::lab::LabError),
    #[error(transparent)]
    Sign(#[from] report::sign::SignError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// `--resume` refused: the lab, its golden states or its patch files changed (exit code 2).
    #[error("cannot resume: {0}")]
    Resume(String),
}

/// Clones restored from this run's golden states on one libvirt host.
struct HostClones {
    uri: String,
    goldens: HostGoldens,
    run_id: String,
}

/// A host's golden states: in this machine's cache directory for a local libvirtd, in the host's
/// storage pool for a remote one.
enum HostGoldens {
    Local(LibvirtHost, HashMap<String, Golden>),
    Remote(PoolHost, HashMap<String, PoolGolden>),
}

impl CloneSource for HostClones {
    fn clone_machine(&self, platform: &str, clone_name: &str, guest_ports: &[u16]) -> Result<Box<dyn Machine>, HypervisorError> {
        let missing = || HypervisorError::Golden { platform: platform.into(), reason: format!("no golden state prepared on {}", self.uri) };
        Ok(match &self.goldens {
            HostGoldens::Local(host, goldens) => Box::new(host.restore_clone(goldens.get(platform).ok_or_else(missing)?, &self.run_id, clone_name, guest_ports)?),
            HostGoldens::Remote(host, goldens) => Box::new(host.restore_clone(goldens.get(platform).ok_or_else(missing)?, &self.run_id, clone_name, guest_ports)?),
        })
    }
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let action = action.into();
    move |source| RunError::Io { action, source }
}

/// How many clones a host holds at once: one per core, and never more than its free memory holds
/// (each clone's memory plus 256 MiB for QEMU itself); at least one.
pub fn host_slots(cpus: usize, free_mib: u64, clone_memory_mib: u32) -> usize {
    let per_clone = clone_memory_mib as u64 + 256;
    cpus.min((free_mib / per_clone) as usize).max(1)
}

/// Cells at once on each host, shared by the URIs that reach the same host (same libvirt host
/// name: `qemu:///system` and `qemu+tcp://127.0.0.1/system` on one machine hold one budget).
fn host_budgets(facts: &[crate::hypervisor::HostFacts], clone_memory_mib: u32) -> Vec<Arc<tokio::sync::Semaphore>> {
    let mut by_name: Vec<(String, Arc<tokio::sync::Semaphore>)> = Vec::new();
    facts
        .iter()
        .map(|f| match by_name.iter().find(|(n, _)| *n == f.hostname) {
            Some((_, s)) => s.clone(),
            None => {
                let s = Arc::new(tokio::sync::Semaphore::new(host_slots(f.cpus, f.free_mib, clone_memory_mib)));
                by_name.push((f.hostname.clone(), s.clone()));
                s
            }
        })
        .collect()
}

pub async fn run_lab(lab: &Lab, opts: &RunOptions, cancel: CancellationToken) -> Result<Report, RunError> {
    run_lab_observed(lab, opts, cancel, false, Arc::new(progress::Quiet)).await
}

/// Finishes the run whose journal is in `opts.out_dir`: runs only the cells it does not list as
/// finished, on the same golden states, and writes one report for the whole lab.
pub async fn resume_lab(lab: &Lab, opts: &RunOptions, cancel: CancellationToken) -> Result<Report, RunError> {
    run_lab_observed(lab, opts, cancel, true, Arc::new(progress::Quiet)).await
}

/// The lab file a run directory's journal names, for `patchlab run --resume DIR` without a lab.
pub fn journaled_lab_file(out_dir: &Path) -> Result<PathBuf, RunError> {
    Ok(journal::load(out_dir)?.header.lab_file)
}

/// A fresh run must not silently replace the journal of a run that did not finish.
fn check_fresh_out_dir(out_dir: &Path) -> Result<(), RunError> {
    if !out_dir.join(journal::FILE).exists() {
        return Ok(());
    }
    let complete = std::fs::read(out_dir.join("report.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).and_then(|v| v["complete"].as_bool()).unwrap_or(false);
    if !complete {
        return Err(RunError::Resume(format!("{} holds a run that did not finish ({}); finish it with `patchlab run --resume {}`, or choose another --out", out_dir.display(), journal::FILE, out_dir.display())));
    }
    std::fs::remove_file(out_dir.join(journal::FILE)).map_err(io("replace the journal of the previous run"))
}

/// [`run_lab`] (or, with `resume`, [`resume_lab`]) reporting progress to `observer`.
pub async fn run_lab_observed(lab: &Lab, opts: &RunOptions, cancel: CancellationToken, resume: bool, observer: Arc<dyn progress::Observer>) -> Result<Report, RunError> {
    let started_at = jiff::Timestamp::now();
    let result = run_lab_observed_inner(lab, opts, cancel, resume, observer).await;
    // A run that broke before writing its report still leaves one, incomplete and `error`, so that
    // nothing downstream can take the output directory for a passed run (issue 6).
    if let Err(e) = &result {
        if !matches!(e, RunError::Resume(_)) && opts.out_dir.is_dir() && !opts.out_dir.join("report.json").exists() {
            if let Err(write) = broken_run_report(lab, opts, started_at).write(&opts.out_dir) {
                tracing::error!("write the incomplete report after `{e}`: {write}");
            }
        }
    }
    result
}

/// The report of a run that broke before its cells: incomplete, no results, verdict `error`.
fn broken_run_report(lab: &Lab, opts: &RunOptions, started_at: jiff::Timestamp) -> Report {
    Report {
        schema_version: report::SCHEMA_VERSION,
        run_id: crate::hypervisor::runlock::new_run_id(),
        complete: false,
        verdict: verdict::run_verdict(false, &[], report::Status::Skipped),
        lab: LabRef { name: lab.name.clone(), file: lab.path.display().to_string(), sha256: lab.sha256.clone() },
        patchlab: Tool { version: env!("CARGO_PKG_VERSION").into(), commit: env!("PATCHLAB_GIT_COMMIT").into() },
        hosts: vec![HostRef { uri: opts.uri.clone(), accel: String::new(), accel_reason: "the run broke before choosing one".into(), golden_states: vec![] }],
        started_at: started_at.to_string(),
        finished_at: jiff::Timestamp::now().to_string(),
        platforms: vec![],
        patches: vec![],
        coverage: report::Coverage { status: report::Status::Skipped, threshold_percent: lab.coverage_threshold_percent, ..Default::default() },
        results: vec![],
        signer: None,
    }
}

async fn run_lab_observed_inner(lab: &Lab, opts: &RunOptions, cancel: CancellationToken, resume: bool, observer: Arc<dyn progress::Observer>) -> Result<Report, RunError> {
    let session_started = jiff::Timestamp::now();
    // Every session has its own run id: its lock, clone names and clone directory carry it.
    let session_id = crate::hypervisor::runlock::new_run_id();
    let dirs = Dirs::new(opts.cache_dir.clone());
    std::fs::create_dir_all(&opts.out_dir).map_err(io(format!("create {}", opts.out_dir.display())))?;
    let lab_file = std::path::absolute(&lab.path).unwrap_or_else(|_| lab.path.clone());
    let (header, earlier, mut journal) = if resume {
        let state = journal::load(&opts.out_dir)?;
        if state.header.lab_sha256 != lab.sha256 {
            return Err(RunError::Resume(format!(
                "{} changed since the run began (sha256 {} then, {} now): a resumed run must run the same lab; start a new run instead",
                lab.path.display(),
                state.header.lab_sha256,
                lab.sha256
            )));
        }
        let mut j = journal::Journal::open(&opts.out_dir)?;
        j.append(&journal::Entry::Resumed { run_id: session_id.clone(), at: session_started.to_string() })?;
        (state.header.clone(), Some(state), j)
    } else {
        check_fresh_out_dir(&opts.out_dir)?;
        let header = journal::Header { format: journal::FORMAT, run_id: session_id.clone(), lab_file, lab_sha256: lab.sha256.clone(), started_at: session_started.to_string() };
        let j = journal::Journal::create(&opts.out_dir, &header)?;
        (header, None, j)
    };
    let run_id = header.run_id.clone();
    let _lock = RunLock::acquire(&dirs, &session_id)?;
    tracing::info!(run_id, session = session_id, resumed = resume, lab = %lab.path.display(), out = %opts.out_dir.display(), "run started");

    let inventory = lab.inventory.as_deref().map(crate::inventory::Inventory::load).transpose().map_err(RunError::Input)?;
    let out_dir = opts.out_dir.clone();
    let patches_in = lab.patches.clone();
    let patches: Vec<PreparedPatch> = tokio::task::spawn_blocking(move || patches_in.iter().map(|p| patch::prepare(p, &out_dir)).collect::<Result<_, _>>()).await.expect("prepare task")?;

    // Images and golden states on every host, one host after the other: hosts reached through the
    // same local libvirtd share the golden states in the cache directory (the first prepares them);
    // a remote host has its own, which its entry in `hosts` names.
    let uris = host_uris(lab, opts);
    let mut sources = Vec::new();
    let mut host_refs = Vec::new();
    let mut platform_refs = Vec::new();
    let mut memory = 512;
    let mut facts = Vec::new();
    for uri in &uris {
        let prepared = {
            let lab = lab.clone();
            let dirs = dirs.clone();
            let uri = uri.clone();
            let accel_choice = opts.accel;
            let session_id = session_id.clone();
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || prepare_host(&lab, &dirs, &uri, accel_choice, &session_id, &cancel)).await.expect("platform task")?
        };
        let PreparedHost { goldens, refs, decision, memory_mib } = prepared;
        let golden_states = if platform_refs.is_empty() || refs == platform_refs {
            vec![]
        } else {
            refs.iter().map(|r| report::GoldenStateRef { platform: r.name.clone(), golden_disk_sha256: r.golden_disk_sha256.clone(), golden_state_sha256: r.golden_state_sha256.clone() }).collect()
        };
        if platform_refs.is_empty() {
            platform_refs = refs;
        }
        memory = memory.max(memory_mib);
        tracing::info!(host = uri, accel = decision.accel.as_str(), reason = %decision.reason, "host prepared");
        host_refs.push(HostRef { uri: uri.clone(), accel: decision.accel.as_str().into(), accel_reason: decision.reason.clone(), golden_states });
        facts.push(match &goldens {
            HostGoldens::Local(host, _) => host.facts(),
            HostGoldens::Remote(host, _) => host.facts(),
        }?);
        sources.push(Arc::new(HostClones { uri: uri.clone(), goldens, run_id: session_id.clone() }));
    }
    let patch_refs: Vec<PatchRef> = patches
        .iter()
        .map(|p| PatchRef {
            name: p.name.clone(),
            kind: p.kind.name().into(),
            files: p.files.iter().map(|f| FileRef { name: f.name.clone(), path: format!("patches/{}/{}", p.name, f.name), sha256: f.sha256.clone(), package: f.package.clone() }).collect(),
        })
        .collect();
    let prepared = journal::Prepared { platforms: platform_refs.clone(), patches: patch_refs.clone(), hosts: host_refs.clone() };
    // A resumed run uses the same golden states and patch files as the cells already finished.
    let first_prepared = match earlier.as_ref().and_then(|s| s.prepared.clone()) {
        Some(first) => {
            check_same_preparation(&first, &prepared)?;
            first
        }
        None => prepared.clone(),
    };
    journal.append(&journal::Entry::Prepared(prepared))?;

    // Two bounds: what each host holds, and `--jobs` over all hosts together.
    let budgets = host_budgets(&facts, memory);
    let jobs = opts.jobs.unwrap_or(usize::MAX >> 4).max(1);
    for (uri, f) in uris.iter().zip(&facts) {
        tracing::info!(host = uri, hostname = f.hostname, cpus = f.cpus, free_mib = f.free_mib, slots = host_slots(f.cpus, f.free_mib, memory), "host capacity");
    }
    tracing::info!(jobs = opts.jobs, hosts = uris.len(), "running cells");

    let earlier_cells: Vec<CellResult> = earlier.map(|s| s.cells).unwrap_or_default();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(jobs));
    let lab_arc = Arc::new(lab.clone());
    let evidence_dir = opts.out_dir.join("evidence");
    let journal = Arc::new(std::sync::Mutex::new(journal));
    let mut tasks = Vec::new();
    let mut index = 0;
    let total = lab.platforms.len() * patches.len();
    let done_before = earlier_cells.iter().filter(|c| lab.platforms.iter().any(|p| p.name == c.platform) && patches.iter().any(|p| p.name == c.patch)).count();
    observer.planned(total - done_before, done_before);
    // Cells start in lab order: a permit is taken here, before the cell's task is spawned.
    'cells: for platform in &lab.platforms {
        for patch in &patches {
            index += 1;
            if earlier_cells.iter().any(|c| c.platform == platform.name && c.patch == patch.name) {
                continue;
            }
            let clone_name = format!("patchlab-{}-{index}", &session_id);
            // Round-robin by the cell's place in the lab, so a resumed run keeps each cell's host.
            let source = sources[(index - 1) % sources.len()].clone();
            let budget = budgets[(index - 1) % sources.len()].clone();
            let host_uri = source.uri.clone();
            let permit = tokio::select! {
                permits = async { (semaphore.clone().acquire_owned().await, budget.acquire_owned().await) } => match permits {
                    (Ok(total), Ok(host)) => (total, host),
                    _ => unreachable!("the semaphores are never closed"),
                },
                _ = cancel.cancelled() => break 'cells,
            };
            if cancel.is_cancelled() {
                break 'cells;
            }
            let (source, lab, patch, cancel, evidence_dir, host_uri, journal, observer) = (source, lab_arc.clone(), patch.clone(), cancel.clone(), evidence_dir.clone(), host_uri, journal.clone(), observer.clone());
            let platform = platform.name.clone();
            let runtime = tokio::runtime::Handle::current();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let plan_platform = platform.clone();
                tokio::task::spawn_blocking(move || {
                    let plan = cell::CellPlan { platform: &plan_platform, patch: &patch, clone_name, host: host_uri };
                    let id = progress::CellId { index, platform: plan_platform.clone(), patch: patch.name.clone(), host: plan.host.clone() };
                    tracing::info!(platform = plan.platform, patch = plan.patch.name, clone = plan.clone_name, "cell started");
                    observer.cell_started(&id);
                    let result = cell::run_cell_observed(&*source, &lab, &plan, &runtime, &cancel, &evidence_dir, &|phase| observer.cell_phase(&id, phase));
                    tracing::info!(platform = result.platform, patch = result.patch, verdict = ?result.verdict, ms = result.duration_ms, error = result.error.as_deref().unwrap_or(""), "cell finished");
                    // A cell the interruption cut short did not finish: it runs again on resume.
                    let cut_short = cancel.is_cancelled() && result.verdict == report::Verdict::Error;
                    if !cut_short {
                        if let Err(e) = journal.lock().expect("journal lock").append(&journal::Entry::Cell { result: Box::new(result.clone()) }) {
                            tracing::error!("the cell finished but could not be journaled (a resume would run it again): {e}");
                        }
                    }
                    observer.cell_finished(&id, &result);
                    result
                })
                .await
                .ok()
            }));
        }
    }
    let mut new_results = Vec::new();
    for task in tasks {
        if let Ok(Some(result)) = task.await {
            new_results.push(result);
        }
    }
    // The whole lab's results in lab order: cells of earlier sessions, then this session's.
    let mut results: Vec<CellResult> = Vec::new();
    for platform in &lab.platforms {
        for patch in &patches {
            let earlier = earlier_cells.iter().find(|c| c.platform == platform.name && c.patch == patch.name);
            let new = new_results.iter().find(|c| c.platform == platform.name && c.patch == patch.name);
            if let Some(r) = earlier.or(new) {
                results.push(r.clone());
            }
        }
    }
    // Interrupted: the report says so (`complete: false`) and lists what ran, cut-short cells as
    // `error`; the journal has only the cells that finished.
    let complete = !cancel.is_cancelled() && results.len() == total;
    let verdicts: Vec<_> = results.iter().map(|r| r.verdict).collect();
    let coverage = match &inventory {
        None => report::Coverage { status: report::Status::Skipped, threshold_percent: lab.coverage_threshold_percent, ..Default::default() },
        Some(inventory) => {
            let ids: Vec<_> = first_prepared.platforms.iter().filter_map(crate::inventory::PlatformId::from_report).collect();
            let passed = |name: &str| {
                let cells: Vec<_> = results.iter().filter(|r| r.platform == name).collect();
                cells.len() == patches.len() && cells.iter().all(|r| r.verdict == report::Verdict::Pass)
            };
            crate::inventory::coverage(inventory, &inventory.path.display().to_string(), &ids, &passed, lab.coverage_threshold_percent)
        }
    };
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        run_id,
        complete,
        verdict: verdict::run_verdict(complete, &verdicts, coverage.status),
        lab: LabRef { name: lab.name.clone(), file: lab.path.display().to_string(), sha256: lab.sha256.clone() },
        patchlab: Tool { version: env!("CARGO_PKG_VERSION").into(), commit: env!("PATCHLAB_GIT_COMMIT").into() },
        hosts: first_prepared.hosts.clone(),
        started_at: header.started_at.clone(),
        finished_at: jiff::Timestamp::now().to_string(),
        platforms: first_prepared.platforms.clone(),
        patches: first_prepared.patches.clone(),
        coverage,
        results,
        signer: opts.signing_key.as_deref().map(|key| report::sign::signer_ref(key, opts.development_key)).transpose()?,
    };
    let report_path = report.write(&opts.out_dir).map_err(io("write report.json"))?;
    // Derived renderings (report.html, report.md, junit.xml): not signed, not listed in the report.
    report::render::write_all(&report, &opts.out_dir).map_err(io("write the report renderings"))?;
    if let Some(key) = &opts.signing_key {
        let sig = report::sign::sign(&report_path, key)?;
        tracing::info!(signature = %sig.display(), "report signed");
    }
    Ok(report)
}

/// Where the cells run: `--host` URIs, else the lab's `hosts`, else `--connect`.
fn host_uris(lab: &Lab, opts: &RunOptions) -> Vec<String> {
    let mut uris: Vec<String> = if !opts.hosts.is_empty() {
        opts.hosts.clone()
    } else if !lab.hosts.is_empty() {
        lab.hosts.clone()
    } else {
        vec![opts.uri.clone()]
    };
    let mut seen = std::collections::HashSet::new();
    uris.retain(|u| seen.insert(u.clone()));
    uris
}

/// A resumed session must have prepared exactly what the first one did.
fn check_same_preparation(first: &journal::Prepared, now: &journal::Prepared) -> Result<(), RunError> {
    for p in &first.platforms {
        match now.platforms.iter().find(|n| n.name == p.name) {
            Some(n) if n == p => {}
            Some(n) => {
                return Err(RunError::Resume(format!(
                    "platform `{}`: its golden state is not the one the run began with (state sha256 {} then, {} now); start a new run",
                    p.name, p.golden_state_sha256, n.golden_state_sha256
                )));
            }
            None => return Err(RunError::Resume(format!("platform `{}` is gone from the lab", p.name))),
        }
    }
    for h in &first.hosts {
        if let Some(n) = now.hosts.iter().find(|n| n.uri == h.uri) {
            if n.golden_states != h.golden_states {
                return Err(RunError::Resume(format!("host {}: its golden states are not the ones the run began with; start a new run", h.uri)));
            }
        }
    }
    if first.patches != now.patches {
        return Err(RunError::Resume("the patch files built now differ from those the run began with (sha256); start a new run".into()));
    }
    Ok(())
}

/// One host, ready for cells: its golden states and what the report says about them.
struct PreparedHost {
    goldens: HostGoldens,
    refs: Vec<PlatformRef>,
    decision: accel::AccelDecision,
    memory_mib: u32,
}

fn prepare_host(lab: &Lab, dirs: &Dirs, uri: &str, choice: AccelChoice, run_id: &str, cancel: &CancellationToken) -> Result<PreparedHost, RunError> {
    // Reach libvirt before building any image: a host that is down must not cost minutes of
    // debootstrap before it is reported.
    let (remote_host, local_host) = if remote::is_remote(uri) { (Some(PoolHost::connect(uri, dirs.clone())?), None) } else { (None, Some(LibvirtHost::connect(uri, dirs.clone())?)) };
    let mut images = Vec::new();
    for platform in &lab.platforms {
        if let PlatformSource::Image(recipe) = &platform.source {
            images.push((platform.name.clone(), crate::image::ensure_built(recipe, &dirs.root)?));
        }
    }
    // `patchlab clean --cache` removes only what no run used lately.
    for (_, image) in &images {
        crate::hypervisor::clean::mark_used(&image.dir);
    }
    let image_of = |name: &str| images.iter().find(|(n, _)| n == name).map(|(_, i)| i);
    let (goldens, records) = if let Some(host) = remote_host {
        let reaped = host.reap()?;
        if !reaped.is_empty() {
            tracing::warn!(host = uri, ?reaped, "removed leftovers of runs that are no longer alive");
        }
        if let Some(p) = lab.platforms.iter().find(|p| matches!(p.source, PlatformSource::DomainSnapshot { .. })) {
            return Err(RunError::Platform { platform: p.name.clone(), reason: format!("it comes from a libvirt domain's snapshot, which patchlab exports with qemu-img on the machine it runs on; it cannot be used on the remote host {uri}: run it on a local URI (qemu:///system)") });
        }
        let decision = host.decide_accel(choice, images.first().map(|(_, i)| i))?;
        tracing::info!(host = uri, accel = decision.accel.as_str(), reason = %decision.reason, "accelerator chosen");
        let prepared: Vec<(String, Result<PoolGolden, HypervisorError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = lab.platforms.iter().map(|p| (p.name.clone(), s.spawn(|| host.golden_from_image(&p.name, image_of(&p.name).expect("image platforms only"), decision.accel, run_id, cancel)))).collect();
            handles.into_iter().map(|(name, h)| (name, h.join().expect("golden thread"))).collect()
        });
        let mut map = HashMap::new();
        let mut records = Vec::new();
        for (name, golden) in prepared {
            let golden = golden?;
            // A golden state whose volumes changed on the host would make every clone of it suspect.
            host.verify_digests(&golden)?;
            records.push((name.clone(), golden.record.clone()));
            map.insert(name, golden);
        }
        ((HostGoldens::Remote(host, map), decision), records)
    } else {
        let host = local_host.expect("connected above");
        let reaped = host.reap()?;
        if !reaped.is_empty() {
            tracing::warn!(?reaped, "removed leftovers of runs that are no longer alive");
        }
        // The probe needs a kernel; a lab of user domains only has theirs, so it then asks for TCG
        // unless KVM was chosen explicitly.
        let decision = match images.first() {
            Some((_, image)) => accel::decide_cached(choice, "qemu-system-x86_64", &image.kernel, &dirs.root),
            None => accel::decide(if choice == AccelChoice::Auto { AccelChoice::Tcg } else { choice }, "qemu-system-x86_64", Path::new("")),
        }
        .map_err(HypervisorError::from)?;
        tracing::info!(accel = decision.accel.as_str(), reason = %decision.reason, "accelerator chosen");
        // Golden states boot in parallel, like cells: cold boots are the slowest step of a first run.
        let prepared: Vec<(String, Result<Golden, HypervisorError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = lab
                .platforms
                .iter()
                .map(|platform| {
                    let (host, decision) = (&host, &decision);
                    let handle = s.spawn(move || match &platform.source {
                        PlatformSource::Image(_) => host.golden_from_image(&platform.name, image_of(&platform.name).expect("built above"), decision.accel, run_id, cancel),
                        PlatformSource::DomainSnapshot { domain, snapshot } => host.golden_from_snapshot(&platform.name, domain, snapshot, decision.accel, run_id, cancel),
                    });
                    (platform.name.clone(), handle)
                })
                .collect();
            handles.into_iter().map(|(name, h)| (name, h.join().expect("golden thread"))).collect()
        });
        let mut map = HashMap::new();
        let mut records = Vec::new();
        for (name, golden) in prepared {
            let golden = golden?;
            crate::hypervisor::clean::mark_used(&golden.dir);
            // A golden state whose files changed on disk would make every clone of it suspect.
            golden.verify_digests()?;
            records.push((name.clone(), golden.record.clone()));
            map.insert(name, golden);
        }
        ((HostGoldens::Local(host, map), decision), records)
    };
    let (goldens, decision) = goldens;
    let mut refs = Vec::new();
    for (name, record) in &records {
        let platform = lab.platforms.iter().find(|p| &p.name == name).expect("lab platform");
        let recipe_identity = image_of(name).map(|i| (i.recipe.os.clone(), i.recipe.version.clone(), i.recipe.arch.clone()));
        let (os, version, arch) = match platform.identity.clone().or(recipe_identity) {
            Some((os, version, arch)) => (Some(os), Some(version), Some(arch)),
            None => (None, None, None),
        };
        let (origin, recipe_digest, image_sha) = match &record.origin {
            GoldenOrigin::Image { recipe, recipe_digest, image_disk_sha256 } => (format!("image:{recipe}"), Some(recipe_digest.clone()), Some(image_disk_sha256.clone())),
            GoldenOrigin::DomainSnapshot { domain, snapshot } => (format!("domain:{domain}/{snapshot}"), None, None),
        };
        refs.push(PlatformRef { name: name.clone(), origin, os, version, arch, image_recipe_digest: recipe_digest, image_disk_sha256: image_sha, golden_disk_sha256: record.disk_sha256.clone(), golden_state_sha256: record.state_sha256.clone() });
    }
    let memory_mib = records.iter().map(|(_, r)| r.memory_mib).max().unwrap_or(512);
    Ok(PreparedHost { goldens, refs, decision, memory_mib })
}

/// The default output directory of a run: `patchlab-runs/<lab>-<UTC time>`.
pub fn default_out_dir(lab: &Lab) -> PathBuf {
    Path::new("patchlab-runs").join(format!("{}-{}", lab.name, jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ")))
}

#[cfg(test)]
mod scheduler_tests {
    use super::*;
    use crate::hypervisor::HostFacts;

    #[test]
    fn a_host_holds_one_clone_per_core_within_its_free_memory() {
        // (cpus, free MiB, clone memory MiB) -> slots
        for (cpus, free, mem, slots) in [
            (2, 24_000, 512, 2),   // this project's machines: the cores bound
            (32, 4_096, 512, 5),   // a big host short of memory: 4096 / (512 + 256)
            (8, 100, 512, 1),      // never zero: the cell waits for nothing, it runs alone
            (1, 1_000_000, 4096, 1),
            (16, 24_000, 2048, 10),
        ] {
            assert_eq!(host_slots(cpus, free, mem), slots, "{cpus} cpus, {free} MiB free, {mem} MiB clones");
        }
    }

    #[test]
    fn uris_that_reach_the_same_host_share_one_budget() {
        let fact = |name: &str, cpus| HostFacts { hostname: name.into(), cpus, free_mib: 64_000 };
        let facts = [fact("vm", 2), fact("vm", 2), fact("lab-1", 8), fact("vm", 2)];
        let budgets = host_budgets(&facts, 512);
        assert!(Arc::ptr_eq(&budgets[0], &budgets[1]) && Arc::ptr_eq(&budgets[0], &budgets[3]));
        assert!(!Arc::ptr_eq(&budgets[0], &budgets[2]));
        assert_eq!((budgets[0].available_permits(), budgets[2].available_permits()), (2, 8));
    }
}
