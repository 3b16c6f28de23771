//! Hosts reached through a remote libvirt URI (`qemu+tcp://host/system`, `qemu+ssh://user@host/system`,
//! `qemu+tls://...`): everything goes through libvirt's own APIs and nothing assumes that the
//! host's files are local.
//!
//! - Files live in one storage pool per host, `patchlab` (a `dir` pool, defined at
//!   [`DEFAULT_POOL_DIR`] when the host has none), as volumes:
//!   `image-<digest>-{base.qcow2,vmlinuz,initrd,complete}` (the image, uploaded through streams),
//!   `golden-<platform>-<key>-{disk.qcow2,state.save,console.log,golden.json}` (one golden state per
//!   host, booted and saved on that host; `golden.json` is uploaded last),
//!   `clone-<orchestrator>-<run>--<clone>-{disk.qcow2,state.save,console.log}` (one clone).
//! - A clone's overlay is a volume whose backing store is the golden disk; its state is a copy of
//!   the golden state made by the host (`virStorageVolCreateXMLFrom`), whose header and XML area are
//!   then overwritten in place by a small upload (same length, so the migration stream keeps its
//!   offset); it is restored with `virDomainRestoreFlags` by the volume's path on the host.
//! - Console logs come back by download; forwarded ports are bound to the address the URI names,
//!   which is where the checks connect.
//! - Clean-up: a run's clone volumes and domains carry the orchestrating machine's name and the
//!   run id; `reap` removes only this machine's dead runs.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::domain_xml::{self, BootSpec, Identity};
use super::golden::{GOLDEN_FORMAT, GoldenOrigin, GoldenRecord};
use super::libvirt::{DomainChannel, NAME_PREFIX, boot_warm_and_save, golden_key, metadata_run};
use super::{Accel, AccelChoice, AccelDecision, Dirs, HypervisorError, Machine, runlock, saveimage};
use crate::guest::AgentChannel;
use crate::image::BuiltImage;

pub const POOL: &str = "patchlab";
/// Where the `patchlab` pool is defined on a host that has none.
pub const DEFAULT_POOL_DIR: &str = "/var/lib/libvirt/patchlab";
const CHUNK: usize = 1 << 20;
/// Console logs kept as evidence are cut to their last bytes beyond this.
const CONSOLE_LIMIT: u64 = 16 << 20;
const PROBE_DEADLINE: Duration = Duration::from_secs(20);

/// The host part of a libvirt URI, if it names one: `qemu+tcp://10.0.0.5/system` → `10.0.0.5`;
/// `qemu:///system` and `qemu+unix:///system` name none (the local daemon).
pub fn uri_host(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// A URI that names a host is handled by [`PoolHost`], even when it names this machine: that is
/// how the remote path is tested (`qemu+tcp://127.0.0.1/system`).
pub fn is_remote(uri: &str) -> bool {
    uri_host(uri).is_some()
}

/// This machine's name as it appears in the names of the volumes and domains it creates on
/// remote hosts, so that two machines sharing a host never reap each other's runs.
fn orchestrator() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { 'x' }).collect();
    if name.is_empty() { "host".into() } else { name }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;")
}

pub struct PoolHost {
    pub uri: String,
    /// Opened again when it died (libvirtd restarted on the host): see [`PoolHost::session`].
    session: std::sync::Mutex<(Connect, StoragePool)>,
    pool_dir: PathBuf,
    forward_ip: IpAddr,
    dirs: Dirs,
    orchestrator: String,
}

/// A golden state on a remote host: its record, and the header read back from its state volume.
#[derive(Debug, Clone)]
pub struct PoolGolden {
    pub record: GoldenRecord,
    pub header: saveimage::SaveHeader,
    prefix: String,
    disk_capacity: u64,
}

impl PoolGolden {
    fn state_vol(&self) -> String {
        format!("{}-state.save", self.prefix)
    }
    fn disk_vol(&self) -> String {
        format!("{}-disk.qcow2", self.prefix)
    }
}

impl PoolHost {
    pub fn connect(uri: &str, dirs: Dirs) -> Result<PoolHost, HypervisorError> {
        let host = uri_host(uri).ok_or_else(|| HypervisorError::Connect { uri: uri.into(), message: "the URI names no host".into() })?;
        let forward_ip = (host.as_str(), 0).to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip()).ok_or_else(|| HypervisorError::Connect { uri: uri.into(), message: format!("cannot resolve `{host}`, where the checks reach forwarded ports") })?;
        let conn = super::libvirt::open_connection(uri)?;
        let (pool, pool_dir) = ensure_pool(&conn)?;
        Ok(PoolHost { uri: uri.into(), session: std::sync::Mutex::new((conn, pool)), pool_dir, forward_ip, dirs, orchestrator: orchestrator() })
    }

    /// The connection and the pool, opened again when libvirtd on the host was restarted (a clone
    /// restored on the old connection loses its agent channel and is torn down through a new one).
    /// When the host cannot be reached, the dead pair is returned and the next call reports it.
    fn session(&self) -> (Connect, StoragePool) {
        let mut session = self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !session.0.is_alive().unwrap_or(false) {
            tracing::warn!(uri = %self.uri, "the connection to libvirt was lost (libvirtd restarted?); connecting again");
            if let Ok(conn) = super::libvirt::open_connection(&self.uri) {
                if let Ok((pool, _)) = ensure_pool(&conn) {
                    *session = (conn, pool);
                }
            }
        }
        session.clone()
    }

    fn conn(&self) -> Connect {
        self.session().0
    }

    fn pool(&self) -> StoragePool {
        self.session().1
    }

    pub fn pool_dir(&self) -> &Path {
        &self.pool_dir
    }

    fn vol(&self, name: &str) -> Option<StorageVol> {
        self.pool().lookup_storage_vol_by_name(name).ok()
    }

    fn vol_path(&self, vol: &StorageVol) -> Result<PathBuf, HypervisorError> {
        vol.path().map(PathBuf::from).map_err(HypervisorError::libvirt("read a volume's path"))
    }

    fn create_vol(&self, xml: &str, what: &str) -> Result<StorageVol, HypervisorError> {
        StorageVol::create_xml(&self.pool(), xml, 0).map_err(HypervisorError::libvirt(format!("create volume {what} on {}", self.uri)))
    }

    fn raw_vol(&self, name: &str, bytes: u64) -> Result<StorageVol, HypervisorError> {
        self.create_vol(&format!("<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity><target><format type='raw'/></target></volume>", esc(name)), name)
    }

    fn overlay_vol(&self, name: &str, backing: &Path, capacity: u64) -> Result<StorageVol, HypervisorError> {
        self.create_vol(
            &format!(
                "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity><target><format type='qcow2'/></target><backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
                esc(name),
                esc(&backing.display().to_string())
            ),
            name,
        )
    }

    fn delete_vol(&self, name: &str) {
        if let Some(vol) = self.vol(name) {
            let _ = vol.delete(0);
        }
    }

    /// Writes `data` into the volume at `offset` through a stream; the rest of the volume stays.
    fn upload(&self, vol: &StorageVol, offset: u64, len: u64, data: &mut dyn Read, what: &str) -> Result<(), HypervisorError> {
        let fail = HypervisorError::libvirt(format!("upload {what} to {}", self.uri));
        let stream = Stream::new(&self.conn(), 0).map_err(HypervisorError::libvirt("open a stream"))?;
        vol.upload(&stream, offset, len, 0).map_err(HypervisorError::libvirt(format!("upload {what} to {}", self.uri)))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = stream.abort();
                    return Err(HypervisorError::io(format!("read {what}"))(e));
                }
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                match stream.send(chunk) {
                    Ok(sent) if sent > 0 => chunk = &chunk[sent as usize..],
                    Ok(_) => {
                        let _ = stream.abort();
                        return Err(HypervisorError::Libvirt { action: format!("upload {what} to {}", self.uri), message: "the stream accepted no data".into() });
                    }
                    Err(e) => {
                        let _ = stream.abort();
                        return Err(fail(e));
                    }
                }
            }
        }
        stream.finish().map_err(fail)
    }

    fn upload_file(&self, name: &str, path: &Path) -> Result<StorageVol, HypervisorError> {
        let mut file = std::fs::File::open(path).map_err(HypervisorError::io(format!("open {}", path.display())))?;
        let len = file.metadata().map_err(HypervisorError::io(format!("read {}", path.display())))?.len();
        let vol = self.raw_vol(name, len)?;
        self.upload(&vol, 0, len, &mut file, &path.display().to_string())?;
        Ok(vol)
    }

    fn upload_bytes(&self, name: &str, bytes: &[u8]) -> Result<StorageVol, HypervisorError> {
        let vol = self.raw_vol(name, bytes.len() as u64)?;
        self.upload(&vol, 0, bytes.len() as u64, &mut &bytes[..], name)?;
        Ok(vol)
    }

    /// Reads `len` bytes (0: to the end) of a volume from `offset` into `sink`; returns the count.
    fn download(&self, vol: &StorageVol, offset: u64, len: u64, sink: &mut dyn Write, what: &str) -> Result<u64, HypervisorError> {
        let fail = HypervisorError::libvirt(format!("download {what} from {}", self.uri));
        let stream = Stream::new(&self.conn(), 0).map_err(HypervisorError::libvirt("open a stream"))?;
        vol.download(&stream, offset, len, 0).map_err(HypervisorError::libvirt(format!("download {what} from {}", self.uri)))?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match stream.recv(&mut buf) {
                Ok(n) if n > 0 => n as usize,
                Ok(_) => break,
                Err(e) => {
                    let _ = stream.abort();
                    return Err(fail(e));
                }
            };
            if let Err(e) = sink.write_all(&buf[..n]) {
                let _ = stream.abort();
                return Err(HypervisorError::io(format!("write {what}"))(e));
            }
            total += n as u64;
        }
        stream.finish().map_err(fail)?;
        Ok(total)
    }

    fn download_bytes(&self, vol: &StorageVol, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, HypervisorError> {
        let mut out = Vec::new();
        self.download(vol, offset, len, &mut out, what)?;
        Ok(out)
    }

    fn sha256_vol(&self, vol: &StorageVol, what: &str) -> Result<String, HypervisorError> {
        use sha2::{Digest, Sha256};
        struct Hashing(Sha256);
        impl Write for Hashing {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.update(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut h = Hashing(Sha256::new());
        self.download(vol, 0, 0, &mut h, what)?;
        Ok(hex::encode(h.0.finalize()))
    }

    /// The image's files on this host, uploaded once (`...-complete` is written last).
    fn image_vols(&self, image: &BuiltImage) -> Result<ImageVols, HypervisorError> {
        let prefix = format!("image-{}-{}", &image.recipe_digest[..16.min(image.recipe_digest.len())], &image.disk_sha256[..16.min(image.disk_sha256.len())]);
        let names = [format!("{prefix}-base.qcow2"), format!("{prefix}-vmlinuz"), format!("{prefix}-initrd")];
        let complete = format!("{prefix}-complete");
        if self.vol(&complete).is_none() {
            let _lock = self.local_lock(&prefix)?;
            if self.vol(&complete).is_none() {
                tracing::info!(host = self.uri, image = %image.dir.display(), "uploading image through libvirt streams (first use on this host)");
                for name in names.iter().chain([&complete]) {
                    self.delete_vol(name);
                }
                let uploaded = (|| {
                    for (name, file) in names.iter().zip([&image.disk, &image.kernel, &image.initrd]) {
                        self.upload_file(name, file)?;
                    }
                    self.upload_bytes(&complete, image.disk_sha256.as_bytes())
                })();
                if let Err(e) = uploaded {
                    for name in &names {
                        self.delete_vol(name);
                    }
                    return Err(e);
                }
            }
        }
        let path = |name: &str| self.vol(name).ok_or_else(|| HypervisorError::Libvirt { action: format!("find volume {name} on {}", self.uri), message: "missing although the image is marked complete".into() }).and_then(|v| self.vol_path(&v));
        Ok(ImageVols { base: path(&names[0])?, kernel: path(&names[1])?, initrd: path(&names[2])?, virtual_size: qcow2_virtual_size(&image.disk)? })
    }

    /// Serialises preparations by processes of this machine (another machine preparing the same
    /// golden state on the same host is not guarded against).
    fn local_lock(&self, what: &str) -> Result<std::fs::File, HypervisorError> {
        use sha2::{Digest, Sha256};
        let dir = self.dirs.golden();
        std::fs::create_dir_all(&dir).map_err(HypervisorError::io(format!("create {}", dir.display())))?;
        let key = hex::encode(&Sha256::digest(format!("{}\0{what}", self.uri))[..8]);
        let path = dir.join(format!("remote-{key}.lock"));
        let lock = std::fs::File::create(&path).map_err(HypervisorError::io(format!("create {}", path.display())))?;
        lock.lock().map_err(HypervisorError::io(format!("lock {}", path.display())))?;
        Ok(lock)
    }

    fn load_golden(&self, prefix: &str) -> Result<Option<PoolGolden>, HypervisorError> {
        let Some(record_vol) = self.vol(&format!("{prefix}-golden.json")) else { return Ok(None) };
        let text = self.download_bytes(&record_vol, 0, 0, "golden.json")?;
        let record: GoldenRecord = serde_json::from_slice(&text).map_err(|e| HypervisorError::Golden { platform: prefix.into(), reason: format!("{prefix}-golden.json on {} is unreadable: {e}", self.uri) })?;
        let state_name = format!("{prefix}-state.save");
        let state = self.vol(&state_name).ok_or_else(|| HypervisorError::Golden { platform: record.platform.clone(), reason: format!("volume {state_name} is missing on {}; delete {prefix}-golden.json there to rebuild it", self.uri) })?;
        let head = self.download_bytes(&state, 0, saveimage::HEADER_LEN as u64, &state_name)?;
        let area = saveimage::area_len(&head).ok_or_else(|| saveimage::SaveImageError::BadMagic { path: format!("{}:{state_name}", self.uri) })?;
        let header = saveimage::parse_header_bytes(&self.download_bytes(&state, 0, area, &state_name)?, &format!("{}:{state_name}", self.uri))?;
        let disk = self.vol(&format!("{prefix}-disk.qcow2")).ok_or_else(|| HypervisorError::Golden { platform: record.platform.clone(), reason: format!("volume {prefix}-disk.qcow2 is missing on {}", self.uri) })?;
        let disk_capacity = disk.info().map_err(HypervisorError::libvirt("read the golden disk's size"))?.capacity;
        Ok(Some(PoolGolden { record, header, prefix: prefix.into(), disk_capacity }))
    }

    /// Returns this host's golden state of an image platform, uploading the image and booting and
    /// saving it on the host once if needed.
    pub fn golden_from_image(&self, platform: &str, image: &BuiltImage, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<PoolGolden, HypervisorError> {
        let key = golden_key(&[&image.recipe_digest, accel.as_str(), &image.disk_sha256]);
        let prefix = format!("golden-{platform}-{key}");
        if let Some(golden) = self.load_golden(&prefix)? {
            return Ok(golden);
        }
        let _lock = self.local_lock(&prefix)?;
        if let Some(golden) = self.load_golden(&prefix)? {
            return Ok(golden);
        }
        let parts = ["disk.qcow2", "state.save", "console.log", "golden.json"].map(|p| format!("{prefix}-{p}"));
        for name in &parts {
            self.delete_vol(name);
        }
        let origin = GoldenOrigin::Image { recipe: image.recipe.name.clone(), recipe_digest: image.recipe_digest.clone(), image_disk_sha256: image.disk_sha256.clone() };
        let result = self.boot_and_save(platform, &prefix, image, origin, accel, run_id, cancel);
        if result.is_err() {
            for name in &parts {
                self.delete_vol(name);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn boot_and_save(&self, platform: &str, prefix: &str, image: &BuiltImage, origin: GoldenOrigin, accel: Accel, run_id: &str, cancel: &CancellationToken) -> Result<PoolGolden, HypervisorError> {
        let vols = self.image_vols(image)?;
        let disk = self.overlay_vol(&format!("{prefix}-disk.qcow2"), &vols.base, vols.virtual_size)?;
        let state = self.raw_vol(&format!("{prefix}-state.save"), 0)?;
        let console = self.raw_vol(&format!("{prefix}-console.log"), 0)?;
        let identity = Identity {
            name: format!("{NAME_PREFIX}golden-{}-{prefix}", self.orchestrator),
            uuid: uuid::Uuid::new_v4().to_string(),
            disk: self.vol_path(&disk)?,
            console: self.vol_path(&console)?,
            ports: vec![],
        };
        let spec = BootSpec { identity: identity.clone(), accel, memory_mib: image.recipe.memory_mib, vcpus: image.recipe.vcpus, kernel: Some((vols.kernel, vols.initrd, image.cmdline.clone())) };
        let xml = domain_xml::boot_xml(&spec, run_id, "golden");
        let boot_ms = boot_warm_and_save(&self.conn(), platform, &xml, &identity, &image.recipe.services, &self.vol_path(&state)?, cancel)?;
        let record = GoldenRecord {
            format: GOLDEN_FORMAT,
            platform: platform.into(),
            origin,
            accel,
            memory_mib: image.recipe.memory_mib,
            domain_name: identity.name.clone(),
            domain_uuid: identity.uuid.clone(),
            disk: identity.disk.clone(),
            console: identity.console.clone(),
            disk_sha256: self.sha256_vol(&disk, "golden disk")?,
            state_sha256: self.sha256_vol(&state, "golden state")?,
            boot_ms,
            created_at: jiff::Timestamp::now().to_string(),
        };
        self.upload_bytes(&format!("{prefix}-golden.json"), serde_json::to_string_pretty(&record).expect("record serializes").as_bytes())?;
        tracing::info!(platform, host = self.uri, boot_ms, "golden state saved on the host");
        self.load_golden(prefix)?.ok_or_else(|| HypervisorError::Golden { platform: platform.into(), reason: format!("{prefix}-golden.json vanished from {}", self.uri) })
    }

    /// Downloads the golden disk and state and compares their digests with the record.
    pub fn verify_digests(&self, golden: &PoolGolden) -> Result<(), HypervisorError> {
        for (name, recorded) in [(golden.disk_vol(), &golden.record.disk_sha256), (golden.state_vol(), &golden.record.state_sha256)] {
            let vol = self.vol(&name).ok_or_else(|| HypervisorError::Golden { platform: golden.record.platform.clone(), reason: format!("golden volume {name} is missing on {}", self.uri) })?;
            let actual = self.sha256_vol(&vol, &name)?;
            if &actual != recorded {
                return Err(HypervisorError::Golden {
                    platform: golden.record.platform.clone(),
                    reason: format!("golden volume {name} on {} is corrupt: sha256 {actual}, recorded {recorded} when it was saved; delete {}-golden.json there to rebuild it", self.uri, golden.prefix),
                });
            }
        }
        Ok(())
    }

    /// Chooses the accelerator on the host itself: `auto` asks libvirt whether the host offers KVM,
    /// then boots the image's kernel under KVM with `panic=-1` (as the local probe does) and uses
    /// KVM only if the domain is gone within the deadline. The outcome is cached per host.
    pub fn decide_accel(&self, choice: AccelChoice, image: Option<&BuiltImage>) -> Result<AccelDecision, HypervisorError> {
        let offers_kvm = self.conn().domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0).is_ok();
        match choice {
            AccelChoice::Tcg => return Ok(AccelDecision { accel: Accel::Tcg, reason: "tcg requested".into() }),
            AccelChoice::Kvm if offers_kvm => return Ok(AccelDecision { accel: Accel::Kvm, reason: "kvm requested".into() }),
            AccelChoice::Kvm => return Err(HypervisorError::Libvirt { action: format!("use KVM on {}", self.uri), message: "libvirt there offers no KVM domains (no /dev/kvm, or no access to it); fix the host or pass --accel tcg".into() }),
            AccelChoice::Auto if !offers_kvm => return Ok(AccelDecision { accel: Accel::Tcg, reason: format!("{} offers no KVM", self.uri) }),
            AccelChoice::Auto => {}
        }
        let Some(image) = image else { return Ok(AccelDecision { accel: Accel::Tcg, reason: "no image kernel to probe KVM with".into() }) };
        let version = format!("{}-{}", self.conn().lib_version().unwrap_or(0), self.conn().hyp_version().unwrap_or(0));
        let cache = self.dirs.root.join(format!("accel-probe-{}.json", hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(self.uri.as_bytes())[..8])));
        if let Some((v, accel, reason)) = std::fs::read_to_string(&cache).ok().and_then(|t| serde_json::from_str::<(String, Accel, String)>(&t).ok()) {
            if v == version {
                return Ok(AccelDecision { accel, reason: format!("{reason} (cached probe)") });
            }
        }
        let vols = self.image_vols(image)?;
        let name = format!("{NAME_PREFIX}probe-{}-{}", self.orchestrator, uuid::Uuid::new_v4().simple());
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><metadata>{}</metadata><memory unit='MiB'>256</memory><os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><cmdline>panic=-1 console=ttyS0</cmdline></os><on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash><devices><memballoon model='none'/></devices></domain>",
            domain_xml::metadata_element("accel-probe", "probe"),
            esc(&vols.kernel.display().to_string())
        );
        let started = Instant::now();
        let domain = self.conn().create_domain_xml(&xml, 0).map_err(HypervisorError::libvirt(format!("start the KVM probe on {}", self.uri)))?;
        let mut finished = false;
        while started.elapsed() < PROBE_DEADLINE {
            if !domain.is_active().unwrap_or(false) {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = domain.destroy();
        let decision = if finished {
            AccelDecision { accel: Accel::Kvm, reason: format!("KVM probe on {} finished in {:.1} s", self.uri, started.elapsed().as_secs_f64()) }
        } else {
            AccelDecision { accel: Accel::Tcg, reason: format!("KVM probe on {} did not finish in {} s", self.uri, PROBE_DEADLINE.as_secs()) }
        };
        let _ = std::fs::write(&cache, serde_json::to_string(&(version, decision.accel, decision.reason.clone())).expect("serializes"));
        Ok(decision)
    }

    /// Restores a clone of `golden` on this host under its own name, overlay, console and ports.
    pub fn restore_clone(&self, golden: &PoolGolden, run_id: &str, clone_name: &str, guest_ports: &[u16]) -> Result<PoolClone, HypervisorError> {
        assert!(clone_name.starts_with(NAME_PREFIX), "clone names start with {NAME_PREFIX}");
        let prefix = format!("clone-{}-{run_id}--{clone_name}", self.orchestrator);
        let mut clone = PoolClone { name: clone_name.into(), conn: self.conn(), pool: self.pool(), uri: self.uri.clone(), volumes: vec![], domain: None, channel: None, ports: vec![], forward_ip: self.forward_ip, console: None, torn_down: false };
        let disk_name = format!("{prefix}-disk.qcow2");
        clone.volumes.push(disk_name.clone());
        let disk = self.overlay_vol(&disk_name, &golden.record.disk, golden.disk_capacity)?;
        let console_name = format!("{prefix}-console.log");
        clone.volumes.push(console_name.clone());
        let console = self.raw_vol(&console_name, 0)?;
        clone.console = Some(console_name);
        let golden_state = self.vol(&golden.state_vol()).ok_or_else(|| HypervisorError::Golden { platform: golden.record.platform.clone(), reason: format!("golden volume {} is missing on {}", golden.state_vol(), self.uri) })?;
        let state_name = format!("{prefix}-state.save");
        let golden_identity = Identity { name: golden.record.domain_name.clone(), uuid: golden.record.domain_uuid.clone(), disk: golden.record.disk.clone(), console: golden.record.console.clone(), ports: vec![] };
        // A port is chosen without seeing the host's sockets: when QEMU cannot bind it there,
        // the restore fails and another is tried.
        let mut attempt = 0;
        loop {
            attempt += 1;
            clone.ports = guest_ports.iter().map(|g| (random_port(), *g)).collect();
            let identity = Identity { name: clone_name.into(), uuid: uuid::Uuid::new_v4().to_string(), disk: self.vol_path(&disk)?, console: self.vol_path(&console)?, ports: clone.ports.clone() };
            let xml = domain_xml::clone_xml_bound(&golden.header.xml, &golden_identity, &identity, run_id, self.forward_ip)?;
            let header = saveimage::encode_header_in_place(&golden.header, &xml)?;
            clone.volumes.push(state_name.clone());
            let state_xml = format!("<volume><name>{}</name><capacity unit='bytes'>0</capacity><target><format type='raw'/></target></volume>", esc(&state_name));
            let state = StorageVol::create_xml_from(&self.pool(), &state_xml, &golden_state, 0).map_err(HypervisorError::libvirt(format!("copy the golden state for {clone_name} on {}", self.uri)))?;
            self.upload(&state, 0, header.len() as u64, &mut &header[..], &format!("{clone_name}'s state header"))?;
            let restored = self.conn().restore_domain_flags(&self.vol_path(&state)?.to_string_lossy(), None, virt::sys::VIR_DOMAIN_SAVE_RUNNING);
            let _ = state.delete(0);
            clone.volumes.retain(|v| *v != state_name);
            match restored {
                Ok(_) => break,
                Err(e) if attempt < 5 && e.message().contains("forward") => {
                    tracing::warn!(clone = clone_name, "forwarded port taken on {}: {}; trying others", self.uri, e.message());
                }
                Err(e) => return Err(HypervisorError::libvirt(format!("restore clone {clone_name} on {}", self.uri))(e)),
            }
        }
        let domain = self.conn().lookup_domain_by_name(clone_name).map_err(HypervisorError::libvirt(format!("find restored clone {clone_name}")))?;
        clone.channel = Some(DomainChannel(domain.clone()));
        clone.domain = Some(domain);
        Ok(clone)
    }

    /// Destroys this machine's `patchlab-` domains on the host and deletes its clone volumes,
    /// for runs that are no longer alive.
    pub fn reap(&self) -> Result<Vec<String>, HypervisorError> {
        let mut reaped = Vec::new();
        let mine = format!("clone-{}-", self.orchestrator);
        let domains = self.conn().list_all_domains(0).map_err(HypervisorError::libvirt("list domains"))?;
        for domain in domains {
            let Ok(name) = domain.name() else { continue };
            if !name.starts_with(NAME_PREFIX) {
                continue;
            }
            let Some(run) = domain.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(domain_xml::METADATA_URI), 0).ok().and_then(|m| metadata_run(&m)) else { continue };
            if runlock::is_alive(&self.dirs, &run) {
                continue;
            }
            let ours = format!("{}/{mine}{run}--", self.pool_dir.display());
            if !domain.xml_desc(0).is_ok_and(|xml| xml.contains(&ours)) {
                continue;
            }
            let _ = domain.destroy();
            let _ = domain.undefine();
            reaped.push(name);
        }
        for name in self.pool().list_volumes().map_err(HypervisorError::libvirt("list volumes"))? {
            let Some(run) = name.strip_prefix(&mine).and_then(|rest| rest.split_once("--")).map(|(run, _)| run.to_string()) else { continue };
            if !runlock::is_alive(&self.dirs, &run) {
                self.delete_vol(&name);
                reaped.push(format!("{}:{name}", self.uri));
            }
        }
        Ok(reaped)
    }

    /// The host's active CPUs and free memory, as its libvirt reports them. Free memory there
    /// excludes the page cache, so this errs on the side of fewer clones.
    pub fn facts(&self) -> Result<super::HostFacts, HypervisorError> {
        let hostname = self.conn().hostname().map_err(HypervisorError::libvirt(format!("read the host name of {}", self.uri)))?;
        let info = self.conn().node_info().map_err(HypervisorError::libvirt(format!("read the node info of {}", self.uri)))?;
        let free = self.conn().free_memory().map_err(HypervisorError::libvirt(format!("read the free memory of {}", self.uri)))?;
        // The loopback transports reach this machine: count its memory the way local hosts do.
        let local = super::libvirt::local_hostname();
        let free_mib = if hostname == local || hostname.split('.').next() == Some(local.as_str()) { super::local_available_mib() } else { free >> 20 };
        Ok(super::HostFacts { hostname, cpus: info.cpus as usize, free_mib })
    }

    /// Volumes of this machine's clones on the host (what a leak check looks for).
    pub fn clone_volumes(&self) -> Result<Vec<String>, HypervisorError> {
        let mine = format!("clone-{}-", self.orchestrator);
        let _ = self.pool().refresh(0);
        Ok(self.pool().list_volumes().map_err(HypervisorError::libvirt("list volumes"))?.into_iter().filter(|n| n.starts_with(&mine)).collect())
    }
}

struct ImageVols {
    base: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    virtual_size: u64,
}

/// The `patchlab` pool of the host, defined, built and started when missing.
fn ensure_pool(conn: &Connect) -> Result<(StoragePool, PathBuf), HypervisorError> {
    let pool = match conn.lookup_storage_pool_by_name(POOL) {
        Ok(pool) => pool,
        Err(_) => {
            let xml = format!("<pool type='dir'><name>{POOL}</name><target><path>{DEFAULT_POOL_DIR}</path><permissions><mode>0711</mode></permissions></target></pool>");
            let pool = conn.define_storage_pool_xml(&xml, 0).map_err(HypervisorError::libvirt(format!("define storage pool {POOL}")))?;
            pool.build(0).map_err(HypervisorError::libvirt(format!("build storage pool {POOL} at {DEFAULT_POOL_DIR}")))?;
            let _ = pool.set_autostart(true);
            pool
        }
    };
    if !pool.is_active().unwrap_or(false) {
        pool.create(0).map_err(HypervisorError::libvirt(format!("start storage pool {POOL}")))?;
    }
    let xml = pool.xml_desc(0).map_err(HypervisorError::libvirt(format!("read storage pool {POOL}")))?;
    let doc = roxmltree::Document::parse(&xml).map_err(|e| HypervisorError::Libvirt { action: format!("read storage pool {POOL}"), message: e.to_string() })?;
    let dir = doc.descendants().find(|n| n.has_tag_name("target")).and_then(|t| t.children().find(|c| c.has_tag_name("path"))).and_then(|p| p.text()).ok_or_else(|| HypervisorError::Libvirt { action: format!("read storage pool {POOL}"), message: "it has no target path; patchlab needs a `dir` pool".into() })?;
    Ok((pool, PathBuf::from(dir.trim())))
}

fn qcow2_virtual_size(path: &Path) -> Result<u64, HypervisorError> {
    let out = super::run_tool("qemu-img", &["info".as_ref(), "--output=json".as_ref(), "-U".as_ref(), path.as_os_str()])?;
    serde_json::from_str::<serde_json::Value>(&out).ok().and_then(|v| v["virtual-size"].as_u64()).ok_or_else(|| HypervisorError::Command { command: format!("qemu-img info {}", path.display()), stderr: "no virtual-size".into() })
}

fn random_port() -> u16 {
    (20000 + uuid::Uuid::new_v4().as_u128() % 40000) as u16
}

/// A running clone on a remote host. Dropping it destroys the domain and deletes its volumes.
pub struct PoolClone {
    name: String,
    conn: Connect,
    pool: StoragePool,
    uri: String,
    volumes: Vec<String>,
    domain: Option<Domain>,
    channel: Option<DomainChannel>,
    ports: Vec<(u16, u16)>,
    forward_ip: IpAddr,
    console: Option<String>,
    torn_down: bool,
}

impl PoolClone {
    pub fn domain(&self) -> Option<&Domain> {
        self.domain.as_ref()
    }
}

impl Machine for PoolClone {
    fn name(&self) -> &str {
        &self.name
    }

    fn agent_channel(&self) -> &dyn AgentChannel {
        self.channel.as_ref().expect("a restored clone has a channel")
    }

    fn forwarded(&self, guest_port: u16) -> Option<SocketAddr> {
        self.ports.iter().find(|(_, g)| *g == guest_port).map(|(h, _)| SocketAddr::new(self.forward_ip, *h))
    }

    fn console_log(&self) -> Option<Vec<u8>> {
        let vol = self.pool.lookup_storage_vol_by_name(self.console.as_deref()?).ok()?;
        // The pool's idea of the file's size is the one it had when created (empty): read to the end.
        PoolHostRef { conn: &self.conn, uri: &self.uri }.download_head(&vol, CONSOLE_LIMIT).ok()
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
                // was restored on dies with libvirtd (restarted on the host) while QEMU keeps running.
                if !e.code().is(ErrorNumber::NoDomain) {
                    tracing::warn!(clone = %self.name, "destroy failed ({}); trying again on a new connection", e.message());
                    match super::libvirt::open_connection_waiting(&self.uri) {
                        Ok(conn) => {
                            result = super::libvirt::destroy_by_name_on(&conn, &self.name);
                            if let Ok((pool, _)) = ensure_pool(&conn) {
                                (self.conn, self.pool) = (conn, pool);
                            }
                        }
                        Err(e) => result = Err(e),
                    }
                }
            }
        }
        for name in std::mem::take(&mut self.volumes) {
            if let Ok(vol) = self.pool.lookup_storage_vol_by_name(&name) {
                if let Err(e) = vol.delete(0) {
                    if result.is_ok() {
                        result = Err(HypervisorError::libvirt(format!("delete volume {name} on {}", self.uri))(e));
                    }
                }
            }
        }
        result
    }
}

impl Drop for PoolClone {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(clone = %self.name, "teardown failed: {e}");
        }
    }
}

/// Downloads through a connection without a whole [`PoolHost`] (a clone keeps only its connection).
struct PoolHostRef<'a> {
    conn: &'a Connect,
    uri: &'a str,
}

impl PoolHostRef<'_> {
    /// The first `limit` bytes of a volume, read to its end; a console a guest floods is cut there.
    fn download_head(&self, vol: &StorageVol, limit: u64) -> Result<Vec<u8>, HypervisorError> {
        let stream = Stream::new(self.conn, 0).map_err(HypervisorError::libvirt("open a stream"))?;
        vol.download(&stream, 0, 0, 0).map_err(HypervisorError::libvirt(format!("download a console log from {}", self.uri)))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stream.recv(&mut buf) {
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n as usize]),
                Ok(_) => break,
                Err(e) => {
                    let _ = stream.abort();
                    return Err(HypervisorError::libvirt("download a console log")(e));
                }
            }
            if out.len() as u64 >= limit {
                out.truncate(limit as usize);
                let _ = stream.abort();
                return Ok(out);
            }
        }
        stream.finish().map_err(HypervisorError::libvirt("download a console log"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_that_name_a_host_are_remote() {
        for (uri, host) in [
            ("qemu:///system", None),
            ("qemu+unix:///system", None),
            ("qemu:///system?socket=/run/x", None),
            ("qemu+tcp://127.0.0.1/system", Some("127.0.0.1")),
            ("qemu+ssh://ops@lab-1.example.org/system", Some("lab-1.example.org")),
            ("qemu+ssh://ops@lab-1:2222/system?keyfile=/k", Some("lab-1")),
            ("qemu+tls://[::1]:16514/system", Some("::1")),
            ("not a uri", None),
        ] {
            assert_eq!(uri_host(uri).as_deref(), host, "{uri}");
            assert_eq!(is_remote(uri), host.is_some(), "{uri}");
        }
    }

    #[test]
    fn the_orchestrator_name_is_safe_in_volume_names() {
        let name = orchestrator();
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
    }
}
