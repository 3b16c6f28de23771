//! A whole run: prepare patches and golden states, run every cell (in parallel, bounded), and
//! write the report. Async at this edge only; each cell runs on a blocking thread.

pub mod cell;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::hypervisor::golden::{Golden, GoldenOrigin};
use crate::hypervisor::libvirt::LibvirtHost;
use crate::hypervisor::runlock::RunLock;
use crate::hypervisor::{AccelChoice, CloneSource, Dirs, HypervisorError, Machine, accel};
use crate::lab::{Lab, PlatformSource};
use crate::patch::{self, PreparedPatch};
use crate::report::{self, FileRef, HostRef, LabRef, PatchRef, PlatformRef, Report, Tool, verdict};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub uri: String,
    pub cache_dir: PathBuf,
    pub accel: AccelChoice,
    pub jobs: Option<usize>,
    /// Sign report.json with this OpenSSH ed25519 key (writes report.json.sig beside it).
    pub signing_key: Option<PathBuf>,
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
}

/// Clones restored from this run's golden states on one libvirt host.
struct HostClones {
    host: LibvirtHost,
    goldens: HashMap<String, Golden>,
    run_id: String,
}

impl CloneSource for HostClones {
    fn clone_machine(&self, platform: &str, clone_name: &str, guest_ports: &[u16]) -> Result<Box<dyn Machine>, HypervisorError> {
        let golden = self.goldens.get(platform).ok_or_else(|| HypervisorError::Golden { platform: platform.into(), reason: "no golden state prepared".into() })?;
        Ok(Box::new(self.host.restore_clone(golden, &self.run_id, clone_name, guest_ports)?))
    }
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let action = action.into();
    move |source| RunError::Io { action, source }
}

/// Default parallelism: one cell per core, and never more clones than free memory holds.
fn default_jobs(memory_mib: u32) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let free_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())).map(|kib| kib / 1024).unwrap_or(2048);
    let per_clone = memory_mib as u64 + 256;
    cores.min((free_mib / per_clone).max(1) as usize).max(1)
}

pub async fn run_lab(lab: &Lab, opts: &RunOptions, cancel: CancellationToken) -> Result<Report, RunError> {
    let started_at = jiff::Timestamp::now();
    let run_id = crate::hypervisor::runlock::new_run_id();
    let dirs = Dirs::new(opts.cache_dir.clone());
    std::fs::create_dir_all(&opts.out_dir).map_err(io(format!("create {}", opts.out_dir.display())))?;
    let _lock = RunLock::acquire(&dirs, &run_id)?;
    tracing::info!(run_id, lab = %lab.path.display(), out = %opts.out_dir.display(), "run started");

    let inventory = lab.inventory.as_deref().map(crate::inventory::Inventory::load).transpose().map_err(RunError::Input)?;
    let out_dir = opts.out_dir.clone();
    let patches_in = lab.patches.clone();
    let patches: Vec<PreparedPatch> = tokio::task::spawn_blocking(move || patches_in.iter().map(|p| patch::prepare(p, &out_dir)).collect::<Result<_, _>>()).await.expect("prepare task")?;

    // Images and golden states, one platform at a time per core.
    let (host, platform_refs, goldens, accel_decision) = {
        let lab = lab.clone();
        let dirs = dirs.clone();
        let uri = opts.uri.clone();
        let accel_choice = opts.accel;
        let run_id = run_id.clone();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || prepare_platforms(&lab, &dirs, &uri, accel_choice, &run_id, &cancel)).await.expect("platform task")?
    };
    let memory = goldens.values().map(|g| g.record.memory_mib).max().unwrap_or(512);
    let jobs = opts.jobs.unwrap_or_else(|| default_jobs(memory)).max(1);
    tracing::info!(jobs, accel = accel_decision.accel.as_str(), reason = %accel_decision.reason, "running cells");

    let host_uri = host.uri.clone();
    let source = Arc::new(HostClones { host, goldens, run_id: run_id.clone() });
    let semaphore = Arc::new(tokio::sync::Semaphore::new(jobs));
    let lab_arc = Arc::new(lab.clone());
    let evidence_dir = opts.out_dir.join("evidence");
    let mut tasks = Vec::new();
    let mut index = 0;
    for platform in &lab.platforms {
        for patch in &patches {
            index += 1;
            let clone_name = format!("patchlab-{}-{index}", &run_id);
            let (source, semaphore, lab, patch, cancel, evidence_dir, host_uri) = (source.clone(), semaphore.clone(), lab_arc.clone(), patch.clone(), cancel.clone(), evidence_dir.clone(), host_uri.clone());
            let platform = platform.name.clone();
            let runtime = tokio::runtime::Handle::current();
            tasks.push(tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.expect("semaphore open");
                if cancel.is_cancelled() {
                    return None;
                }
                let plan_platform = platform.clone();
                tokio::task::spawn_blocking(move || {
                    let plan = cell::CellPlan { platform: &plan_platform, patch: &patch, clone_name, host: host_uri };
                    tracing::info!(platform = plan.platform, patch = plan.patch.name, clone = plan.clone_name, "cell started");
                    let result = cell::run_cell(&*source, &lab, &plan, &runtime, &cancel, &evidence_dir);
                    tracing::info!(platform = result.platform, patch = result.patch, verdict = ?result.verdict, ms = result.duration_ms, error = result.error.as_deref().unwrap_or(""), "cell finished");
                    result
                })
                .await
                .ok()
            }));
        }
    }
    let mut results = Vec::new();
    for task in tasks {
        if let Ok(Some(result)) = task.await {
            results.push(result);
        }
    }
    let complete = !cancel.is_cancelled() && results.len() == index;
    let verdicts: Vec<_> = results.iter().map(|r| r.verdict).collect();
    let coverage = match &inventory {
        None => report::Coverage { status: report::Status::Skipped, threshold_percent: lab.coverage_threshold_percent, ..Default::default() },
        Some(inventory) => {
            let ids: Vec<_> = platform_refs.iter().filter_map(crate::inventory::PlatformId::from_report).collect();
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
        hosts: vec![HostRef { uri: opts.uri.clone(), accel: accel_decision.accel.as_str().into(), accel_reason: accel_decision.reason.clone() }],
        started_at: started_at.to_string(),
        finished_at: jiff::Timestamp::now().to_string(),
        platforms: platform_refs,
        patches: patches
            .iter()
            .map(|p| PatchRef {
                name: p.name.clone(),
                kind: "deb".into(),
                files: p.files.iter().map(|f| FileRef { name: f.name.clone(), path: format!("patches/{}/{}", p.name, f.name), sha256: f.sha256.clone(), package: f.package.clone() }).collect(),
            })
            .collect(),
        coverage,
        results,
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

type Prepared = (LibvirtHost, Vec<PlatformRef>, HashMap<String, Golden>, accel::AccelDecision);

fn prepare_platforms(lab: &Lab, dirs: &Dirs, uri: &str, choice: AccelChoice, run_id: &str, cancel: &CancellationToken) -> Result<Prepared, RunError> {
    let host = LibvirtHost::connect(uri, dirs.clone())?;
    let reaped = host.reap()?;
    if !reaped.is_empty() {
        tracing::warn!(?reaped, "removed leftovers of runs that are no longer alive");
    }
    let mut images = Vec::new();
    for platform in &lab.platforms {
        if let PlatformSource::Image(recipe) = &platform.source {
            images.push((platform.name.clone(), crate::image::ensure_built(recipe, &dirs.root)?));
        }
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
    let goldens: Vec<(String, Result<Golden, HypervisorError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = lab
            .platforms
            .iter()
            .map(|platform| {
                let (host, images, decision) = (&host, &images, &decision);
                let handle = s.spawn(move || match &platform.source {
                    PlatformSource::Image(_) => {
                        let image = &images.iter().find(|(n, _)| *n == platform.name).expect("built above").1;
                        host.golden_from_image(&platform.name, image, decision.accel, run_id, cancel)
                    }
                    PlatformSource::DomainSnapshot { domain, snapshot } => host.golden_from_snapshot(&platform.name, domain, snapshot, decision.accel, run_id, cancel),
                });
                (platform.name.clone(), handle)
            })
            .collect();
        handles.into_iter().map(|(name, h)| (name, h.join().expect("golden thread"))).collect()
    });
    let mut refs = Vec::new();
    let mut map = HashMap::new();
    for (name, golden) in goldens {
        let platform = lab.platforms.iter().find(|p| p.name == name).expect("lab platform");
        let recipe_identity = images.iter().find(|(n, _)| *n == name).map(|(_, i)| (i.recipe.os.clone(), i.recipe.version.clone(), i.recipe.arch.clone()));
        let (os, version, arch) = match platform.identity.clone().or(recipe_identity) {
            Some((os, version, arch)) => (Some(os), Some(version), Some(arch)),
            None => (None, None, None),
        };
        let golden = golden?;
        let (origin, recipe_digest, image_sha) = match &golden.record.origin {
            GoldenOrigin::Image { recipe, recipe_digest, image_disk_sha256 } => (format!("image:{recipe}"), Some(recipe_digest.clone()), Some(image_disk_sha256.clone())),
            GoldenOrigin::DomainSnapshot { domain, snapshot } => (format!("domain:{domain}/{snapshot}"), None, None),
        };
        refs.push(PlatformRef { name: name.clone(), origin, os, version, arch, image_recipe_digest: recipe_digest, image_disk_sha256: image_sha, golden_disk_sha256: golden.record.disk_sha256.clone(), golden_state_sha256: golden.record.state_sha256.clone() });
        map.insert(name, golden);
    }
    Ok((host, refs, map, decision))
}

/// The default output directory of a run: `patchlab-runs/<lab>-<UTC time>`.
pub fn default_out_dir(lab: &Lab) -> PathBuf {
    Path::new("patchlab-runs").join(format!("{}-{}", lab.name, jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ")))
}
