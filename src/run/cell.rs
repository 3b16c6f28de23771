//! One cell: one patch on one clone of one platform, through the conditions in order.
//! Synchronous on purpose: every step waits on the guest; the scheduler runs cells in parallel.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::checks::{self, CheckResult};
use crate::guest::{Agent, AgentError};
use crate::hypervisor::{CloneSource, Machine};
use crate::lab::Lab;
use crate::patch::{DeliveryFailure, PreparedPatch};
use crate::report::{CellResult, Condition, Conditions, EvidenceRef, Phase, Status, verdict};

pub struct CellPlan<'a> {
    pub platform: &'a str,
    pub patch: &'a PreparedPatch,
    pub clone_name: String,
    pub host: String,
}

/// The lab broke (not the patch): the cell is `error` and the remaining conditions are skipped.
struct Broke(String);

impl From<AgentError> for Broke {
    fn from(e: AgentError) -> Self {
        Broke(format!("guest agent: {e}"))
    }
}

pub fn run_cell(source: &dyn CloneSource, lab: &Lab, plan: &CellPlan<'_>, runtime: &tokio::runtime::Handle, cancel: &CancellationToken, evidence_dir: &Path) -> CellResult {
    run_cell_observed(source, lab, plan, runtime, cancel, evidence_dir, &|_| {})
}

/// [`run_cell`], telling `on_phase` the name of each phase as it begins (for progress display).
pub fn run_cell_observed(source: &dyn CloneSource, lab: &Lab, plan: &CellPlan<'_>, runtime: &tokio::runtime::Handle, cancel: &CancellationToken, evidence_dir: &Path, on_phase: &dyn Fn(&str)) -> CellResult {
    let started = Instant::now();
    let mut phases = Vec::new();
    let mut conditions = Conditions::default();
    let mut evidence = Vec::new();
    let mut error = None;
    let mut machine: Option<Box<dyn Machine>> = None;
    let outcome = (|| -> Result<(), Broke> {
        let t = Instant::now();
        on_phase("clone");
        let m = source.clone_machine(plan.platform, &plan.clone_name, &lab.guest_ports()).map_err(|e| Broke(format!("clone: {e}")))?;
        let m = &**machine.insert(m);
        let agent = Agent::new(m.agent_channel(), cancel.clone());
        agent.wait_ready(Duration::from_secs(60))?;
        agent.set_time_now()?;
        phases.push(Phase { name: "clone".into(), ms: t.elapsed().as_millis() as u64 });
        run_conditions(lab, plan, m, &agent, runtime, cancel, &mut conditions, &mut phases, on_phase)
    })();
    if let Err(Broke(reason)) = outcome {
        error = Some(reason);
    }
    if let Some(mut m) = machine {
        let t = Instant::now();
        on_phase("teardown");
        if let Some(console) = m.console_log() {
            if let Some(e) = keep_evidence(&console, evidence_dir, &format!("{}-{}-console.log", plan.platform, plan.patch.name)) {
                evidence.push(e);
            }
        }
        if let Err(e) = m.teardown() {
            // Never hidden behind an earlier error: a clone that could not be destroyed is a leak.
            tracing::error!(clone = %plan.clone_name, "teardown failed: {e}");
            error = Some(match error.take() {
                Some(earlier) => format!("{earlier}; teardown: {e}"),
                None => format!("teardown: {e}"),
            });
        }
        phases.push(Phase { name: "teardown".into(), ms: t.elapsed().as_millis() as u64 });
    }
    if let Some(reason) = &error {
        mark_error(&mut conditions, reason);
    }
    let statuses = [conditions.baseline.status, conditions.delivery.status, conditions.install.status, conditions.operations.status, conditions.removal.status];
    CellResult {
        platform: plan.platform.into(),
        patch: plan.patch.name.clone(),
        verdict: verdict::cell_verdict(&statuses),
        host: plan.host.clone(),
        clone: plan.clone_name.clone(),
        error,
        conditions,
        phases,
        duration_ms: started.elapsed().as_millis() as u64,
        evidence,
    }
}

/// The first condition not yet decided becomes `error`; the later ones stay `skipped`.
fn mark_error(conditions: &mut Conditions, reason: &str) {
    for c in [&mut conditions.baseline, &mut conditions.delivery, &mut conditions.install, &mut conditions.operations, &mut conditions.removal] {
        if c.status == Status::Skipped {
            c.status = Status::Error;
            c.reason = Some(reason.to_string());
            return;
        }
    }
}

/// How long a reboot the guest asked for may take, cold boot under TCG included.
const REBOOT_DEADLINE: Duration = Duration::from_secs(600);

#[allow(clippy::too_many_arguments)]
fn run_conditions(lab: &Lab, plan: &CellPlan<'_>, m: &dyn Machine, agent: &Agent<'_>, runtime: &tokio::runtime::Handle, cancel: &CancellationToken, c: &mut Conditions, phases: &mut Vec<Phase>, on_phase: &dyn Fn(&str)) -> Result<(), Broke> {
    let forwarded = |g: u16| m.forwarded(g);
    let target = checks::Target { agent, forwarded: &forwarded, runtime };
    let run_checks = |names: Option<&[String]>| -> Result<Vec<CheckResult>, Broke> {
        lab.checks.iter().filter(|ch| names.is_none_or(|n| n.contains(&ch.name))).map(|ch| checks::run(ch, &target).map_err(Broke::from)).collect()
    };
    let mut phase = |name: &str, t: Instant| phases.push(Phase { name: name.into(), ms: t.elapsed().as_millis() as u64 });
    let cancelled = || if cancel.is_cancelled() { Err(Broke("cancelled".into())) } else { Ok(()) };

    // Baseline: only checks that pass here count as "previously functioning operations".
    let t = Instant::now();
    on_phase("baseline");
    let baseline = run_checks(None)?;
    let failed_before = agent.failed_units()?;
    let working: Vec<String> = baseline.iter().filter(|r| r.passed).map(|r| r.name.clone()).collect();
    let not_working: Vec<&str> = baseline.iter().filter(|r| !r.passed).map(|r| r.name.as_str()).collect();
    c.baseline = Condition { checks: baseline.clone(), ..Condition::pass() };
    if !not_working.is_empty() {
        if lab.settings.require_baseline {
            c.baseline.status = Status::Fail;
            c.baseline.reason = Some(format!("checks fail on the untouched clone and the lab requires all to pass: {}", not_working.join(", ")));
            return Ok(());
        }
        c.baseline.reason = Some(format!("failing before the patch, so not held against it: {}", not_working.join(", ")));
    }
    let fingerprint_spec = crate::fingerprint::FingerprintSpec::with_defaults(&lab.removal.watch, &lab.removal.allow).map_err(|e| Broke(format!("removal settings: {e}")))?;
    // The baseline checks ran on this clone just before: a kept baseline is one taken after the same checks.
    let checks_ran = format!("{:?}", lab.checks);
    let (before, origin) = crate::fingerprint::baseline::baseline(agent, &fingerprint_spec, m.golden(), &checks_ran)?;
    tracing::debug!(clone = m.name(), ?origin, "baseline fingerprint");
    phase("baseline", t);
    cancelled()?;

    let t = Instant::now();
    on_phase("deliver");
    match plan.patch.deliver(agent) {
        Ok(delivered) => c.delivery = Condition { delivered, ..Condition::pass() },
        Err(DeliveryFailure::PinMismatch { file, pinned, actual }) => {
            c.delivery = Condition::with(Status::Fail, format!("{file} has sha256 {actual}, but the lab pins {pinned}: it is not the file the lab names"));
            return Ok(());
        }
        Err(DeliveryFailure::Corrupted { file, expected, actual }) => {
            c.delivery = Condition::with(Status::Fail, format!("{file} arrived in the guest with sha256 {actual}, sent {expected}"));
            return Ok(());
        }
        Err(DeliveryFailure::Agent(e)) => return Err(e.into()),
    }
    phase("deliver", t);
    cancelled()?;

    // Install: a non-zero exit, the deadline, or a unit that failed because of it is significant.
    let t = Instant::now();
    on_phase("install");
    let kept = plan.patch.keep_previous(agent)?;
    // Undecided until the install and its aftermath (reboot, failed units) finish: if the agent or
    // the clone breaks meanwhile, the install is what becomes `error`, not the next condition.
    c.install = Condition::with(Status::Skipped, "");
    c.install.reason = None;
    if !kept.notes.is_empty() {
        c.install.reason = Some(format!("kept for removal: {}", kept.notes.join("; ")));
    }
    match plan.patch.install(agent, lab.settings.install_timeout) {
        Ok(result) => {
            let ok = result.success();
            c.install.commands.push(result.clone());
            if !ok {
                c.install.status = Status::Fail;
                c.install.reason = Some(format!("`{}` exited with {:?}", result.command, result.exit_code));
                return Ok(());
            }
        }
        Err(AgentError::Deadline { program, deadline }) => {
            c.install = Condition::with(Status::Fail, format!("`{program}` did not finish within {deadline:?}"));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    if agent.exec(&crate::guest::ExecRequest::new("/usr/bin/test", &["-e", "/var/run/reboot-required"], Duration::from_secs(30)))?.success() {
        let took = agent.reboot(REBOOT_DEADLINE).map_err(|e| Broke(format!("reboot the guest asked for after install: {e}")))?;
        let note = format!("the guest asked for a reboot (/var/run/reboot-required); rebooted in {} ms", took.as_millis());
        c.install.reason = Some(match c.install.reason.take() { Some(r) => format!("{r}; {note}"), None => note });
    }
    let newly_failed: Vec<String> = agent.failed_units()?.into_iter().filter(|u| !failed_before.contains(u)).collect();
    if !newly_failed.is_empty() {
        c.install.status = Status::Fail;
        c.install.reason = Some(format!("units failed after the install: {}", newly_failed.join(", ")));
        return Ok(());
    }
    c.install.status = Status::Pass;
    phase("install", t);
    cancelled()?;

    // Operations: every check that worked before works now, and keeps working through burn-in.
    let t = Instant::now();
    on_phase("checks");
    let after = run_checks(Some(&working))?;
    let broken: Vec<&str> = after.iter().filter(|r| !r.passed).map(|r| r.name.as_str()).collect();
    c.operations = Condition { checks: after.clone(), ..Condition::pass() };
    if !broken.is_empty() {
        c.operations.status = Status::Fail;
        c.operations.reason = Some(format!("worked before the patch, fail after it: {}", broken.join(", ")));
        return Ok(());
    }
    phase("checks", t);
    if let Some(burn_in) = lab.settings.burn_in {
        let t = Instant::now();
        on_phase("burn-in");
        while t.elapsed() < burn_in {
            cancelled()?;
            std::thread::sleep(lab.settings.burn_in_interval.min(burn_in.saturating_sub(t.elapsed())));
            let round = run_checks(Some(&working))?;
            let failing: Vec<String> = round.iter().filter(|r| !r.passed).map(|r| r.name.clone()).collect();
            c.operations.burn_in.push(crate::report::BurnInRound { at_ms: t.elapsed().as_millis() as u64, checks: round });
            if !failing.is_empty() {
                c.operations.status = Status::Fail;
                c.operations.reason = Some(format!("failed during burn-in after {} s: {}", t.elapsed().as_secs(), failing.join(", ")));
                return Ok(());
            }
        }
        phase("burn-in", t);
    }
    cancelled()?;

    // Removal: the removal succeeds, the checks pass, and the state is the baseline's again.
    let t = Instant::now();
    on_phase("remove");
    let removed = match plan.patch.remove(agent, &kept, lab.settings.remove_timeout) {
        Ok(results) => results,
        Err(AgentError::Deadline { program, deadline }) => {
            c.removal = Condition::with(Status::Fail, format!("`{program}` did not finish within {deadline:?}"));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    plan.patch.clean_delivery(agent)?;
    let after_removal = run_checks(Some(&working))?;
    phase("remove", t);
    let t = Instant::now();
    on_phase("fingerprint");
    let after_fingerprint = crate::fingerprint::capture(agent, &fingerprint_spec)?;
    let outcome = crate::fingerprint::diff(&before, &after_fingerprint, &fingerprint_spec);
    phase("fingerprint", t);
    c.removal = Condition { commands: removed.clone(), checks: after_removal.clone(), differences: outcome.differences.clone(), allowed_differences: outcome.allowed, ..Condition::pass() };
    if let Some(bad) = removed.iter().find(|r| !r.success()) {
        c.removal.status = Status::Fail;
        c.removal.reason = Some(format!("`{}` exited with {:?}", bad.command, bad.exit_code));
    } else if let Some(bad) = after_removal.iter().find(|r| !r.passed) {
        c.removal.status = Status::Fail;
        c.removal.reason = Some(format!("check `{}` fails after removal: {}", bad.name, bad.detail));
    } else if !outcome.differences.is_empty() {
        c.removal.status = Status::Fail;
        let shown: Vec<String> = outcome.differences.iter().take(5).map(|d| format!("{} {}", d.kind, d.item)).collect();
        c.removal.reason = Some(format!("{} differences from the baseline remain, e.g. {}", outcome.differences.len(), shown.join(", ")));
    }
    Ok(())
}

/// Copies a file into the evidence directory; the report binds it by sha256.
fn keep_evidence(data: &[u8], dir: &Path, name: &str) -> Option<EvidenceRef> {
    use sha2::{Digest, Sha256};
    std::fs::create_dir_all(dir).ok()?;
    std::fs::write(dir.join(name), data).ok()?;
    let rel = format!("{}/{name}", dir.file_name()?.to_string_lossy());
    Some(EvidenceRef { path: rel, sha256: hex::encode(Sha256::digest(data)), bytes: data.len() as u64 })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::guest::fake::{FakeGuest, Reply};
    use crate::hypervisor::HypervisorError;
    use crate::report::Verdict;

    struct FakeMachine {
        guest: Arc<FakeGuest>,
        torn_down: Arc<Mutex<u32>>,
    }

    impl Machine for FakeMachine {
        fn name(&self) -> &str {
            "patchlab-fake"
        }
        fn agent_channel(&self) -> &dyn crate::guest::AgentChannel {
            &*self.guest
        }
        fn forwarded(&self, _: u16) -> Option<std::net::SocketAddr> {
            None
        }
        fn console_log(&self) -> Option<Vec<u8>> {
            None
        }
        fn teardown(&mut self) -> Result<(), HypervisorError> {
            *self.torn_down.lock().unwrap() += 1;
            Ok(())
        }
    }

    struct FakeSource {
        guest: Option<Arc<FakeGuest>>,
        torn_down: Arc<Mutex<u32>>,
    }

    impl CloneSource for FakeSource {
        fn clone_machine(&self, _: &str, _: &str, _: &[u16]) -> Result<Box<dyn Machine>, HypervisorError> {
            match &self.guest {
                Some(guest) => Ok(Box::new(FakeMachine { guest: guest.clone(), torn_down: self.torn_down.clone() })),
                None => Err(HypervisorError::Libvirt { action: "restore clone".into(), message: "no space left on device".into() }),
            }
        }
    }

    /// A guest whose web service works until `dpkg` does what `on_dpkg` says.
    fn guest(on_install: Reply, on_remove: Reply, breaks_service: bool) -> FakeGuest {
        let broken = Arc::new(Mutex::new(false));
        FakeGuest::new(move |program, args| match program {
            "/bin/mkdir" | "/bin/rm" => Some((0, vec![], vec![])),
            // The fingerprint script: an empty but well-formed system.
            "/bin/sh" => Some((0, crate::fingerprint::collect::empty_output(), vec![])),
            "/usr/bin/test" => Some((1, vec![], vec![])),
            "/bin/systemctl" if args[0] == "list-units" => Some((0, vec![], vec![])),
            "/usr/bin/dpkg" if args[0] == "--install" => {
                *broken.lock().unwrap() = breaks_service;
                Some(on_install.clone())
            }
            "/usr/bin/dpkg" => Some(on_remove.clone()),
            "/bin/systemctl" => Some(if *broken.lock().unwrap() { (3, b"failed\n".to_vec(), vec![]) } else { (0, b"active\n".to_vec(), vec![]) }),
            _ => None,
        })
    }

    fn lab() -> (Lab, PreparedPatch, tempfile::TempDir) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = format!(
            "[platforms.p]\nimage = \"{}/images/debian-12.toml\"\n[patches.good]\nkind = \"deb\"\npackage_trees = [\"{}/fixtures/patches/good\"]\n[checks.svc]\nkind = \"command\"\nargv = [\"/bin/systemctl\", \"is-active\", \"nginx\"]\nretries = 0\n",
            root.display(),
            root.display()
        );
        let lab = Lab::parse(&root.join("labs/unit.toml"), &text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let patch = crate::patch::prepare(&lab.patches[0], dir.path()).unwrap();
        (lab, patch, dir)
    }

    fn run(source: &FakeSource) -> CellResult {
        let (lab, patch, dir) = lab();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let plan = CellPlan { platform: "p", patch: &patch, clone_name: "patchlab-test-1".into(), host: "fake".into() };
        run_cell(source, &lab, &plan, runtime.handle(), &CancellationToken::new(), &dir.path().join("evidence"))
    }

    fn statuses(r: &CellResult) -> [Status; 5] {
        let c = &r.conditions;
        [c.baseline.status, c.delivery.status, c.install.status, c.operations.status, c.removal.status]
    }

    #[test]
    fn cells_decide_each_condition_and_always_tear_down() {
        use Status::*;
        let ok: Reply = (0, vec![], vec![]);
        let bad: Reply = (1, vec![], b"dpkg: error\n".to_vec());
        let corrupting = {
            let mut g = guest(ok.clone(), ok.clone(), false);
            g.corrupt_writes = true;
            g
        };
        let table: Vec<(&str, Option<FakeGuest>, Verdict, [Status; 5])> = vec![
            ("good patch", Some(guest(ok.clone(), ok.clone(), false)), Verdict::Pass, [Pass, Pass, Pass, Pass, Pass]),
            ("install fails", Some(guest(bad.clone(), ok.clone(), false)), Verdict::Fail, [Pass, Pass, Fail, Skipped, Skipped]),
            ("breaks the service", Some(guest(ok.clone(), ok.clone(), true)), Verdict::Fail, [Pass, Pass, Pass, Fail, Skipped]),
            ("removal fails", Some(guest(ok.clone(), bad.clone(), false)), Verdict::Fail, [Pass, Pass, Pass, Pass, Fail]),
            ("corrupted in transit", Some(corrupting), Verdict::Fail, [Pass, Fail, Skipped, Skipped, Skipped]),
            ("clone fails", None, Verdict::Error, [Error, Skipped, Skipped, Skipped, Skipped]),
        ];
        for (name, guest, verdict, want) in table {
            let torn_down = Arc::new(Mutex::new(0));
            let has_guest = guest.is_some();
            let source = FakeSource { guest: guest.map(Arc::new), torn_down: torn_down.clone() };
            let result = run(&source);
            assert_eq!(result.verdict, verdict, "{name}: {result:#?}");
            assert_eq!(statuses(&result), want, "{name}");
            assert_eq!(*torn_down.lock().unwrap(), u32::from(has_guest), "{name}: torn down once");
        }
    }
}
