//! Shared helpers of the real-guest tests: finding the lab, sharing golden states, and the leak
//! check every real-guest test ends with.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use patchlab::hypervisor::golden::Golden;
use patchlab::hypervisor::libvirt::LibvirtHost;
use patchlab::hypervisor::{Accel, AccelChoice, Dirs, accel};

pub const URI: &str = "qemu:///system";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dirs() -> Dirs {
    Dirs::new(std::env::var_os("PATCHLAB_CACHE_DIR").map(PathBuf::from).unwrap_or_else(patchlab::image::default_cache_dir))
}

/// Connects to the lab host. Under `cargo xtask test` (PATCHLAB_REQUIRE_LAB=1) an unusable lab is
/// a failure; a bare `cargo test` on a machine without libvirt skips, and says so.
pub fn host() -> Option<LibvirtHost> {
    match LibvirtHost::connect(URI, dirs()) {
        Ok(host) => Some(host),
        Err(e) if std::env::var_os("PATCHLAB_REQUIRE_LAB").is_none() => {
            eprintln!("SKIPPED: no usable libvirt ({e}); `cargo xtask test` sets the lab up and runs this test");
            None
        }
        Err(e) => panic!("the lab is required (PATCHLAB_REQUIRE_LAB) but unusable: {e}"),
    }
}

pub fn accel_for(image: &patchlab::image::BuiltImage) -> Accel {
    accel::decide_cached(AccelChoice::Auto, "qemu-system-x86_64", &image.kernel, &dirs().root).expect("accelerator").accel
}

/// The golden state of an image recipe, prepared once and shared by every test that needs it.
pub fn golden(host: &LibvirtHost, platform: &str, recipe: &str, run_id: &str) -> Golden {
    let image = patchlab::image::ensure_built(&root().join(recipe), &dirs().root).expect("image builds");
    host.golden_from_image(platform, &image, accel_for(&image), run_id, &Default::default()).expect("golden state")
}

/// What must be true after any real-guest test: nothing of the run is left, goldens untouched.
pub struct LeakCheck<'a> {
    pub host: &'a LibvirtHost,
    pub run_id: String,
    pub goldens: Vec<(PathBuf, String, String)>,
    /// The TMPDIRs the test gave the `patchlab` processes it ran ([`cli_tmpdir`]): must be empty.
    pub tmpdirs: Vec<PathBuf>,
    /// Remote hosts (`qemu+tcp://...`) the run also used: no clone volume of the run may remain
    /// in their `patchlab` storage pool.
    pub remote_uris: Vec<String>,
}

/// A TMPDIR of its own for the `patchlab` processes a test runs, in `parent` (the test's own
/// temporary directory): [`LeakCheck::with_tmpdir`] then checks they left no temporary file.
pub fn cli_tmpdir(parent: &Path) -> PathBuf {
    let dir = parent.join("cli-tmp");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Asserts that `dir`, a TMPDIR from [`cli_tmpdir`], still exists and is empty.
pub fn assert_tmpdir_empty(dir: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read the test's TMPDIR {}: {e}", dir.display())).flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "temporary files left behind in TMPDIR {}: {left:?}", dir.display());
}

impl<'a> LeakCheck<'a> {
    pub fn new(host: &'a LibvirtHost, run_id: &str, goldens: &[&Golden]) -> Self {
        let goldens = goldens.iter().map(|g| (g.dir.clone(), g.record.disk_sha256.clone(), g.record.state_sha256.clone())).collect();
        LeakCheck { host, run_id: run_id.to_string(), goldens, tmpdirs: Vec::new(), remote_uris: Vec::new() }
    }

    /// Also checks the storage pool of the remote host at `uri`.
    pub fn with_remote(mut self, uri: &str) -> Self {
        self.remote_uris.push(uri.to_string());
        self
    }

    /// Also checks that `dir`, the TMPDIR of the `patchlab` processes the test ran, is empty.
    pub fn with_tmpdir(mut self, dir: &Path) -> Self {
        self.tmpdirs.push(dir.to_path_buf());
        self
    }

    /// Asserts that no domain, overlay, state copy or temporary file of the run remains and that the
    /// goldens are unchanged.
    pub fn assert_clean(&self) {
        let domains: Vec<String> = self.host.patchlab_domains().unwrap().into_iter().filter(|d| d.contains(&self.run_id)).collect();
        assert!(domains.is_empty(), "domains left behind: {domains:?}");
        for uri in &self.remote_uris {
            let remote = patchlab::hypervisor::remote::PoolHost::connect(uri, self.host.dirs.clone()).unwrap();
            let volumes: Vec<String> = remote.clone_volumes().unwrap().into_iter().filter(|v| v.contains(&self.run_id)).collect();
            assert!(volumes.is_empty(), "clone volumes left behind on {uri}: {volumes:?}");
        }
        let clone_dir = self.host.dirs.clones().join(&self.run_id);
        assert!(!clone_dir.exists(), "clone files left behind in {}: {:?}", clone_dir.display(), std::fs::read_dir(&clone_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()));
        // No half-written file of patchlab's own: interrupted image builds, golden records, reports.
        let stray: Vec<PathBuf> = [self.host.dirs.images(), self.host.dirs.golden()]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .map(|e| e.path())
            .flat_map(|p| std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()).chain(std::iter::once(p)).collect::<Vec<_>>())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-") || n.to_string_lossy().ends_with(".json.tmp")))
            .collect();
        assert!(stray.is_empty(), "temporary files left behind: {stray:?}");
        self.tmpdirs.iter().for_each(|d| assert_tmpdir_empty(d));
        for (dir, disk, state) in &self.goldens {
            let golden = Golden::load(dir).unwrap().expect("golden still there");
            assert_eq!(&golden.record.disk_sha256, disk);
            golden.verify_digests().unwrap_or_else(|e| panic!("golden in {} changed: {e}", dir.display()));
            assert_eq!(&golden.record.state_sha256, state);
        }
    }
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))).unwrap()
}

/// The status of `GET /` on 127.0.0.1:port, with plain std (HTTP/1.0, no proxies).
pub fn http_status(addr: std::net::SocketAddr) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}
