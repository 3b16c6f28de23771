//! The libvirt backend: golden states, clones restored from them, and reaping of leftovers.
//! Every call here blocks; async callers run it with `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use super::domain_xml::{self, BootSpec, Identity};
use super::golden::{GOLDEN_FORMAT, Golden, GoldenOrigin, GoldenRecord};
use super::{Accel, Dirs, HypervisorError, Machine, create_overlay, runlock, saveimage, sha256_file};
use crate::guest::{Agent, AgentChannel, AgentError};
use crate::image::BuiltImage;

/// Names of every domain patchlab creates start with this; nothing else is ever touched.
pub const NAME_PREFIX: &str = "patchlab-";
/// Cold boot under TCG takes 30–80 s on a 2-core host; leave room for a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(600);

static QUIET: Once = Once::new();

pub struct LibvirtHost {
    pub uri: String,
    /// Opened again when it died (see [`LibvirtHost::conn`]).
    conn: std::sync::Mutex<Connect>,
    pub dirs: Dirs,
}

impl LibvirtHost {
    pub fn connect(uri: &str, dirs: Dirs) -> Result<LibvirtHost, HypervisorError> {
        Ok(LibvirtHost { uri: uri.into(), conn: std::sync::Mutex::new(open_connection(uri)?), dirs })
    }

    /// The connection to libvirtd. When libvirtd was restarted (or the connection broke) it is
    /// opened again, so later clones of the run work; a clone restored on the old connection loses
    /// its agent channel (its cell is `error`) and is torn down through a new connection.
    fn conn(&self) -> Result<Connect, HypervisorError> {
        let mut conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !conn.is_alive().unwrap_or(false) {
            tracing::warn!(uri = %self.uri, "the connection to libvirt was lost (libvirtd restarted?); connecting again");
            *conn = open_connection(&self.uri)?;
        }
        Ok(conn.clone())
    }

    pub fn lookup(&self, name: &str) -> Option<Domain> {
        self.conn().ok()?.lookup_domain_by_name(name).ok()
    }

    /// Returns the golden state of an image platform, booting and saving it once if needed.
    pub fn golden_from_image(&self, platform: &str, image: &BuiltImage, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<Golden, HypervisorError> {
        let key = golden_key(&[&image.recipe_digest, accel.as_str(), &image.disk_sha256]);
        let dir = self.dirs.golden().join(format!("{platform}-{key}"));
        let origin = GoldenOrigin::Image { recipe: image.recipe.name.clone(), recipe_digest: image.recipe_digest.clone(), image_disk_sha256: image.disk_sha256.clone() };
        let boot = BootPlan { backing: image.disk.clone(), kernel: Some((image.kernel.clone(), image.initrd.clone(), image.cmdline.clone())), memory_mib: image.recipe.memory_mib, vcpus: image.recipe.vcpus, services: image.recipe.services.clone() };
        self.golden(platform, &dir, origin, boot, accel, run_id, cancel)
    }

    /// Returns the golden state of a platform taken from a user's libvirt domain and one of its
    /// internal snapshots. The user's domain is only read: the snapshot's disk state is exported
    /// into patchlab's own base image (`qemu-img convert -l snapshot.name=...`), which is booted once
    /// in a patchlab domain with the same kernel, memory and CPUs but patchlab's isolated network
    /// and agent channel, and saved like an image platform. The snapshot's own memory state is not
    /// reused: it belongs to a domain definition patchlab does not control (its network, devices).
    pub fn golden_from_snapshot(&self, platform: &str, domain_name: &str, snapshot_name: &str, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<Golden, HypervisorError> {
        let fail = |reason: String| HypervisorError::Golden { platform: platform.into(), reason };
        let domain = self.conn()?.lookup_domain_by_name(domain_name).map_err(|e| fail(format!("libvirt has no domain `{domain_name}` ({})", e.message())))?;
        let snapshot = Domain::lookup_snapshot_by_name(&domain, snapshot_name, 0).map_err(|e| fail(format!("domain `{domain_name}` has no snapshot `{snapshot_name}` ({})", e.message())))?;
        let snap_xml = snapshot.xml_desc(0).map_err(HypervisorError::libvirt(format!("read snapshot {snapshot_name}")))?;
        let facts = SnapshotFacts::parse(&snap_xml).map_err(|reason| fail(format!("snapshot `{snapshot_name}` of `{domain_name}`: {reason}")))?;
        let uuid = domain.uuid_string().map_err(HypervisorError::libvirt("read domain uuid"))?;
        let key = golden_key(&[&uuid, snapshot_name, &facts.creation_time, accel.as_str()]);
        let dir = self.dirs.golden().join(format!("{platform}-{key}"));
        let origin = GoldenOrigin::DomainSnapshot { domain: domain_name.into(), snapshot: snapshot_name.into() };
        let base = dir.join("base.qcow2");
        let boot = BootPlan { backing: base.clone(), kernel: facts.kernel.clone(), memory_mib: facts.memory_mib, vcpus: facts.vcpus, services: vec![] };
        let disk = facts.disk.clone();
        let snapshot_name = snapshot_name.to_string();
        self.golden_with(platform, &dir, origin, boot, accel, run_id, cancel, move || {
            // -U: the user's domain may be running; the snapshot's clusters are immutable anyway.
            super::run_tool("qemu-img", &["convert".as_ref(), "-U".as_ref(), "-O".as_ref(), "qcow2".as_ref(), "-l".as_ref(), format!("snapshot.name={snapshot_name}").as_ref(), disk.as_os_str(), base.as_os_str()])?;
            make_read_only(&base)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn golden(&self, platform: &str, dir: &Path, origin: GoldenOrigin, boot: BootPlan, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<Golden, HypervisorError> {
        self.golden_with(platform, dir, origin, boot, accel, run_id, cancel, || Ok(()))
    }

    #[allow(clippy::too_many_arguments)]
    fn golden_with(&self, platform: &str, dir: &Path, origin: GoldenOrigin, boot: BootPlan, accel: Accel, run_id: &str, cancel: &CancellationToken, make_base: impl FnOnce() -> Result<(), HypervisorError>) -> Result<Golden, HypervisorError> {
        if let Some(golden) = Golden::load(dir)? {
            return Ok(golden);
        }
        let parent = self.dirs.golden();
        std::fs::create_dir_all(&parent).map_err(HypervisorError::io(format!("create {}", parent.display())))?;
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::File::create(&lock_path).map_err(HypervisorError::io(format!("create {}", lock_path.display())))?;
        lock.lock().map_err(HypervisorError::io(format!("lock {}", lock_path.display())))?;
        // Another process may have finished it while this one waited for the lock.
        if let Some(golden) = Golden::load(dir)? {
            return Ok(golden);
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(HypervisorError::io(format!("create {}", dir.display())))?;
        let result = make_base().and_then(|()| self.boot_and_save(platform, dir, origin, boot, accel, run_id, cancel));
        if result.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn boot_and_save(&self, platform: &str, dir: &Path, origin: GoldenOrigin, boot: BootPlan, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<Golden, HypervisorError> {
        let disk = dir.join("disk.qcow2");
        create_overlay(&boot.backing, &disk)?;
        let identity = Identity {
            name: format!("{NAME_PREFIX}golden-{}", dir.file_name().unwrap_or_default().to_string_lossy()),
            uuid: uuid::Uuid::new_v4().to_string(),
            disk: disk.clone(),
            console: dir.join("console.log"),
            ports: vec![],
        };
        let spec = BootSpec { identity: identity.clone(), accel, memory_mib: boot.memory_mib, vcpus: boot.vcpus, kernel: boot.kernel.clone() };
        let xml = domain_xml::boot_xml(&spec, run_id, "golden");
        let state = dir.join("state.save");
        let boot_ms = boot_warm_and_save(&self.conn()?, platform, &xml, &identity, &boot.services, &state, cancel)?;
        for file in [&disk, &state] {
            make_read_only(file)?;
        }
        let record = GoldenRecord {
            format: GOLDEN_FORMAT,
            platform: platform.into(),
            origin,
            accel,
            memory_mib: boot.memory_mib,
            domain_name: identity.name.clone(),
            domain_uuid: identity.uuid.clone(),
            disk: disk.clone(),
            console: identity.console.clone(),
            disk_sha256: sha256_file(&disk)?,
            state_sha256: sha256_file(&state)?,
            boot_ms,
            created_at: jiff::Timestamp::now().to_string(),
        };
        Golden::store(dir, &record)?;
        tracing::info!(platform, boot_ms, "golden state saved");
        Golden::load(dir)?.ok_or_else(|| HypervisorError::Golden { platform: platform.into(), reason: "golden.json vanished".into() })
    }

    /// Restores a clone of `golden` under its own name, UUID, overlay, console and ports.
    pub fn restore_clone(&self, golden: &Golden, run_id: &str, clone_name: &str, guest_ports: &[u16]) -> Result<LibvirtClone, HypervisorError> {
        assert!(clone_name.starts_with(NAME_PREFIX), "clone names start with {NAME_PREFIX}");
        let dir = self.dirs.clones().join(run_id).join(clone_name);
        std::fs::create_dir_all(&dir).map_err(HypervisorError::io(format!("create {}", dir.display())))?;
        // From here on the clone owns `dir`: dropping it on an early return removes everything.
        let mut clone = LibvirtClone { name: clone_name.into(), uri: self.uri.clone(), dir: dir.clone(), domain: None, ports: vec![], channel: None, torn_down: false, console: dir.join("console.log"), golden: golden.reference() };
        // Refused before anything is written: the state copy and the overlay's growth must fit.
        let state_size = std::fs::metadata(golden.state_path()).map_err(HypervisorError::io(format!("read {}", golden.state_path().display())))?.len();
        super::check_room(&dir, super::available_bytes(&dir)?, state_size + super::CLONE_DISK_HEADROOM)?;
        let disk = dir.join("disk.qcow2");
        create_overlay(&golden.record.disk, &disk)?;
        clone.ports = guest_ports.iter().map(|g| free_port().map(|h| (h, *g))).collect::<Result<_, _>>()?;
        let identity = Identity { name: clone_name.into(), uuid: uuid::Uuid::new_v4().to_string(), disk, console: clone.console.clone(), ports: clone.ports.clone() };
        let golden_identity = Identity { name: golden.record.domain_name.clone(), uuid: golden.record.domain_uuid.clone(), disk: golden.record.disk.clone(), console: golden.record.console.clone(), ports: vec![] };
        let xml = domain_xml::clone_xml(&golden.header.xml, &golden_identity, &identity, run_id)?;
        let state = dir.join("state.save");
        saveimage::write_with_xml(&golden.state_path(), &golden.header, &xml, &state)?;
        let conn = self.conn()?;
        let restored = conn.restore_domain_flags(&state.to_string_lossy(), None, virt::sys::VIR_DOMAIN_SAVE_RUNNING);
        let _ = std::fs::remove_file(&state);
        restored.map_err(HypervisorError::libvirt(format!("restore clone {clone_name}")))?;
        let domain = conn.lookup_domain_by_name(clone_name).map_err(HypervisorError::libvirt(format!("find restored clone {clone_name}")))?;
        clone.channel = Some(DomainChannel(domain.clone()));
        clone.domain = Some(domain);
        Ok(clone)
    }

    /// Destroys `patchlab-` domains and removes clone directories of runs that are no longer alive.
    pub fn reap(&self) -> Result<Vec<String>, HypervisorError> {
        let mut reaped = Vec::new();
        let domains = self.conn()?.list_all_domains(0).map_err(HypervisorError::libvirt("list domains"))?;
        for domain in domains {
            let Ok(name) = domain.name() else { continue };
            if !name.starts_with(NAME_PREFIX) {
                continue;
            }
            let run = domain.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(domain_xml::METADATA_URI), 0).ok().and_then(|m| metadata_run(&m));
            match run {
                Some(run) if runlock::is_alive(&self.dirs, &run) => continue,
                // A patchlab- name without our metadata was not made by patchlab: leave it alone.
                None => continue,
                Some(_) => {}
            }
            // Run locks live in this cache directory: a domain whose files are in another one
            // belongs to a patchlab using that cache (`--cache-dir`), whose runs this one cannot see.
            let root = format!("'{}/", self.dirs.root.display());
            if !domain.xml_desc(0).is_ok_and(|xml| xml.contains(&root) || xml.contains(&root.replace('\'', "\""))) {
                continue;
            }
            let _ = domain.destroy();
            let _ = domain.undefine();
            reaped.push(name);
        }
        if let Ok(entries) = std::fs::read_dir(self.dirs.clones()) {
            for entry in entries.flatten() {
                let run = entry.file_name().to_string_lossy().into_owned();
                if !runlock::is_alive(&self.dirs, &run) {
                    let _ = std::fs::remove_dir_all(entry.path());
                    reaped.push(entry.path().display().to_string());
                }
            }
        }
        Ok(reaped)
    }

    /// This machine's cores and available memory, under libvirt's name for it.
    pub fn facts(&self) -> Result<super::HostFacts, HypervisorError> {
        let hostname = self.conn()?.hostname().map_err(HypervisorError::libvirt("read the host name"))?;
        Ok(super::HostFacts { hostname, cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), free_mib: super::local_available_mib() })
    }

    /// Names of every `patchlab-` domain on the host, running or defined.
    pub fn patchlab_domains(&self) -> Result<Vec<String>, HypervisorError> {
        let domains = self.conn()?.list_all_domains(0).map_err(HypervisorError::libvirt("list domains"))?;
        Ok(domains.iter().filter_map(|d| d.name().ok()).filter(|n| n.starts_with(NAME_PREFIX)).collect())
    }
}

/// This machine's host name as libvirt reports it.
pub(super) fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Opens a connection to libvirt at `uri`, with libvirt's own printing of errors switched off.
pub(super) fn open_connection(uri: &str) -> Result<Connect, HypervisorError> {
    // Without this libvirt prints every error, expected ones included, on stderr.
    QUIET.call_once(virt::error::clear_error_callback);
    Connect::open(Some(uri)).map_err(|e| HypervisorError::Connect { uri: uri.into(), message: e.message().to_string() })
}

/// What patchlab needs from a snapshot's domain definition to boot its disk state again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotFacts {
    creation_time: String,
    disk: PathBuf,
    kernel: Option<(PathBuf, PathBuf, String)>,
    memory_mib: u32,
    vcpus: u32,
}

impl SnapshotFacts {
    fn parse(xml: &str) -> Result<SnapshotFacts, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable snapshot XML: {e}"))?;
        let root = doc.root_element();
        fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
            node.children().find(|c| c.has_tag_name(name))
        }
        fn text(node: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
            node.and_then(|n| n.text()).map(|t| t.trim().to_string())
        }
        let creation_time = text(child(root, "creationTime")).ok_or("no creationTime")?;
        let internal = root.descendants().filter(|n| n.has_tag_name("disk") && n.parent().is_some_and(|p| p.has_tag_name("disks"))).all(|d| matches!(d.attribute("snapshot"), Some("internal") | Some("no") | None));
        if !internal {
            return Err("only internal snapshots (the default of `virsh snapshot-create-as`) are supported".into());
        }
        let domain = child(root, "domain").ok_or("the snapshot carries no domain definition")?;
        let devices = child(domain, "devices").ok_or("no devices")?;
        let disks: Vec<_> = devices.children().filter(|d| d.has_tag_name("disk") && d.attribute("device").unwrap_or("disk") == "disk").collect();
        if disks.len() != 1 {
            return Err(format!("patchlab clones domains with exactly one disk; this one has {}", disks.len()));
        }
        let disk = child(disks[0], "source").and_then(|s| s.attribute("file")).ok_or("the disk is not a file")?;
        if child(disks[0], "driver").and_then(|d| d.attribute("type")) != Some("qcow2") {
            return Err("the disk is not qcow2, so it cannot hold internal snapshots".into());
        }
        let os = child(domain, "os").ok_or("no <os>")?;
        let kernel = match (text(child(os, "kernel")), text(child(os, "initrd"))) {
            (Some(k), Some(i)) => Some((PathBuf::from(k), PathBuf::from(i), text(child(os, "cmdline")).unwrap_or_default())),
            _ => None,
        };
        let memory = child(domain, "memory").ok_or("no <memory>")?;
        let amount: u64 = memory.text().unwrap_or("").trim().parse().map_err(|_| "unreadable <memory>")?;
        let memory_mib = match memory.attribute("unit").unwrap_or("KiB") {
            "KiB" | "k" => amount / 1024,
            "MiB" | "M" => amount,
            "GiB" | "G" => amount * 1024,
            other => return Err(format!("memory unit {other} not understood")),
        } as u32;
        let vcpus = text(child(domain, "vcpu")).and_then(|v| v.parse().ok()).unwrap_or(1);
        Ok(SnapshotFacts { creation_time, disk: disk.into(), kernel, memory_mib, vcpus })
    }
}

struct BootPlan {
    backing: PathBuf,
    kernel: Option<(PathBuf, PathBuf, String)>,
    memory_mib: u32,
    vcpus: u32,
    services: Vec<String>,
}

/// The run id in patchlab's metadata element as libvirt returns it: libvirt drops the prefix the
/// element was written with (`<instance><run>ID</run>...`), so match on local names.
pub(super) fn metadata_run(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let run = doc.descendants().find(|n| n.is_element() && n.tag_name().name() == "run")?.text()?.trim().to_string();
    (!run.is_empty()).then_some(run)
}


pub(super) fn golden_key(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(GOLDEN_FORMAT.to_le_bytes());
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Boots the golden domain `xml`, waits until the guest is up and its services run, warms it
/// (see [`super::golden::WARM_UP`]) and saves it running to `state`, a path on the libvirt host.
/// Returns the milliseconds from start to warm.
pub(super) fn boot_warm_and_save(conn: &Connect, platform: &str, xml: &str, identity: &Identity, services: &[String], state: &Path, cancel: &CancellationToken) -> Result<u64, HypervisorError> {
    let started = Instant::now();
    tracing::info!(platform, domain = identity.name, "booting golden state (first use of this image on this host; cached afterwards)");
    let domain = conn.create_domain_xml(xml, 0).map_err(HypervisorError::libvirt(format!("start golden domain {}", identity.name)))?;
    let guard = DestroyOnDrop(Some(domain.clone()));
    let channel = DomainChannel(domain.clone());
    let agent = Agent::new(&channel, cancel.clone());
    let agent_err = |e: AgentError| HypervisorError::Golden { platform: platform.into(), reason: format!("{e} (console log: {})", identity.console.display()) };
    agent.wait_ready(BOOT_DEADLINE).map_err(agent_err)?;
    agent.wait_booted(services, BOOT_DEADLINE.saturating_sub(started.elapsed())).map_err(agent_err)?;
    agent.run_ok("/bin/sh", &["-c", super::golden::WARM_UP], Duration::from_secs(300)).map_err(agent_err)?;
    let boot_ms = started.elapsed().as_millis() as u64;
    save_running(&domain, state)?;
    std::mem::forget(guard); // a saved transient domain no longer exists
    Ok(boot_ms)
}

fn save_running(domain: &Domain, to: &Path) -> Result<(), HypervisorError> {
    let path = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).map_err(|_| HypervisorError::Golden { platform: to.display().to_string(), reason: "path contains NUL".into() })?;
    // virt 0.5 has no safe wrapper for virDomainSaveFlags.
    let rc = unsafe { virt::sys::virDomainSaveFlags(domain.as_ptr(), path.as_ptr(), std::ptr::null(), virt::sys::VIR_DOMAIN_SAVE_RUNNING) };
    if rc < 0 {
        return Err(HypervisorError::Libvirt { action: format!("save running state to {}", to.display()), message: virt::error::Error::last_error().message().to_string() });
    }
    Ok(())
}

fn make_read_only(path: &Path) -> Result<(), HypervisorError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).map_err(HypervisorError::io(format!("make {} read-only", path.display())))
}

/// A free TCP port on 127.0.0.1, as the kernel hands it out; QEMU binds it right after.
fn free_port() -> Result<u16, HypervisorError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(HypervisorError::io("find a free port on 127.0.0.1"))?;
    Ok(listener.local_addr().map_err(HypervisorError::io("find a free port"))?.port())
}

struct DestroyOnDrop(Option<Domain>);

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = d.destroy();
        }
    }
}

/// The guest agent reached through libvirt's `virDomainQemuAgentCommand`.
pub struct DomainChannel(pub Domain);

impl AgentChannel for DomainChannel {
    fn call(&self, request: &str, timeout: Duration) -> Result<String, AgentError> {
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        self.0.qemu_agent_command(request, secs, 0).map_err(|e| {
            if e.code().is(ErrorNumber::AgentCommandTimeout) {
                AgentError::Timeout(timeout)
            } else if e.code().is(ErrorNumber::AgentCommandFailed) {
                AgentError::Refused { command: "agent", message: e.message().to_string() }
            } else if !self.0.connect().and_then(|c| c.is_alive()).unwrap_or(false) {
                AgentError::Unreachable(format!("the connection to libvirtd was lost (libvirtd restarted or stopped?): {}", e.message()))
            } else {
                AgentError::Unreachable(e.message().to_string())
            }
        })
    }
}

/// A running clone. Dropping it destroys the domain and removes its directory.
pub struct LibvirtClone {
    name: String,
    /// The host's URI: teardown connects again when the clone's connection died.
    uri: String,
    dir: PathBuf,
    domain: Option<Domain>,
    channel: Option<DomainChannel>,
    ports: Vec<(u16, u16)>,
    console: PathBuf,
    torn_down: bool,
    golden: super::golden::GoldenRef,
}

impl LibvirtClone {
    pub fn domain(&self) -> Option<&Domain> {
        self.domain.as_ref()
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Machine for LibvirtClone {
    fn name(&self) -> &str {
        &self.name
    }

    fn agent_channel(&self) -> &dyn AgentChannel {
        self.channel.as_ref().expect("a restored clone has a channel")
    }

    fn forwarded(&self, guest_port: u16) -> Option<std::net::SocketAddr> {
        self.ports.iter().find(|(_, g)| *g == guest_port).map(|(h, _)| std::net::SocketAddr::from(([127, 0, 0, 1], *h)))
    }

    fn console_log(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.console).ok()
    }

    fn teardown(&mut self) -> Result<(), HypervisorError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.channel = None;
        let mut result = Ok(());
        if let Some(domain) = self.domain.take() {
            if let Err(e) = domain.destroy() {
                // Unless the domain is gone, destroy it again through a new connection: the one it
                // was restored on dies with libvirtd (restarted mid-run) while QEMU keeps running.
                if !e.code().is(ErrorNumber::NoDomain) {
                    tracing::warn!(clone = %self.name, "destroy failed ({}); trying again on a new connection", e.message());
                    result = destroy_by_name(&self.uri, &self.name);
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound && result.is_ok() {
                result = Err(HypervisorError::io(format!("remove {}", self.dir.display()))(e));
            }
        }
        // The run directory goes when its last clone does.
        if let Some(run_dir) = self.dir.parent() {
            let _ = std::fs::remove_dir(run_dir);
        }
        result
    }

    fn golden(&self) -> Option<&super::golden::GoldenRef> {
        Some(&self.golden)
    }
}

/// How long teardown waits for libvirtd to answer again (restarted under a running cell).
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// Destroys the domain `name` through a new connection to `uri`, waiting for libvirtd to come back
/// if it is not running; a domain that is gone or no longer running is fine.
fn destroy_by_name(uri: &str, name: &str) -> Result<(), HypervisorError> {
    destroy_by_name_on(&open_connection_waiting(uri)?, name)
}

/// Opens a connection to `uri`, waiting up to [`RECONNECT_DEADLINE`] for libvirtd to answer.
pub(super) fn open_connection_waiting(uri: &str) -> Result<Connect, HypervisorError> {
    let started = Instant::now();
    loop {
        match open_connection(uri) {
            Ok(conn) => return Ok(conn),
            Err(e) if started.elapsed() > RECONNECT_DEADLINE => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Destroys the domain `name`; one that is gone or no longer running is fine.
pub(super) fn destroy_by_name_on(conn: &Connect, name: &str) -> Result<(), HypervisorError> {
    let domain = match conn.lookup_domain_by_name(name) {
        Ok(domain) => domain,
        Err(e) if e.code().is(ErrorNumber::NoDomain) => return Ok(()),
        Err(e) => return Err(HypervisorError::libvirt(format!("find clone {name} to destroy it"))(e)),
    };
    match domain.destroy() {
        Err(e) if !e.code().is(ErrorNumber::NoDomain) && domain.is_active().unwrap_or(true) => Err(HypervisorError::libvirt(format!("destroy clone {name}"))(e)),
        _ => Ok(()),
    }
}

impl Drop for LibvirtClone {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(clone = %self.name, "teardown failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_run_id_is_read_from_metadata_as_libvirt_returns_it() {
        // What virDomainGetMetadata returns: the prefix the element was written with is gone.
        assert_eq!(super::metadata_run("<instance>\n  <run>20250101T000000Z-abcdef</run>\n  <role>clone</role>\n</instance>").as_deref(), Some("20250101T000000Z-abcdef"));
        let written = super::domain_xml::metadata_element("r1", "clone");
        assert_eq!(super::metadata_run(&written).as_deref(), Some("r1"));
        assert_eq!(super::metadata_run("<instance><role>clone</role></instance>"), None);
        assert_eq!(super::metadata_run("not xml"), None);
    }
}
