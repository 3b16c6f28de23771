//! Guest image builder: turns a recipe (`images/*.toml`) into a read-only base image
//! (`base.qcow2` + `kernel` + `initrd` for direct kernel boot) in a content-addressed cache.
//!
//! Layout: `<cache>/images/<name>-<digest16>/{base.qcow2,kernel,initrd,image.json}`. `image.json` is
//! written last and the directory is renamed into place atomically, so a directory that has an
//! `image.json` is complete; anything else (`.tmp-*` directories) is a crashed build and is removed
//! by the next build of the same recipe.

mod build;
mod recipe;
mod sys;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use build::build;
pub use recipe::{Recipe, BUILDER_VERSION};

/// Name of the metadata file that marks a complete image directory.
pub const IMAGE_JSON: &str = "image.json";

/// Errors of the image builder. Messages are lowercase and read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("read recipe {path}: {source}")]
    ReadRecipe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse recipe {path}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    ParseRecipe {
        path: PathBuf,
        message: String,
        line: Option<usize>,
    },
    #[error("validate recipe {path}: key `{key}`: {reason}")]
    InvalidRecipe {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("build image {name}: building needs root (debootstrap, chroot and mount); running as uid {uid}")]
    NotRoot { name: String, uid: u32 },
    #[error("start `{program}` for step {step}: {source}")]
    Spawn {
        step: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: `{command}` exited with {status}: {stderr_tail}")]
    Command {
        step: String,
        command: String,
        status: String,
        stderr_tail: String,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock image cache {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} image metadata {path}: {source}")]
    Metadata {
        action: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("build image {name}: {reason}")]
    Build { name: String, reason: String },
}

impl ImageError {
    pub(crate) fn io(action: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            action: action.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A built, complete, read-only guest base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub recipe: Recipe,
    /// `<cache>/images/<name>-<digest16>`
    pub dir: PathBuf,
    /// `dir/base.qcow2` (0444; boot clones from overlays on it, never from it directly)
    pub disk: PathBuf,
    /// `dir/kernel` (0444)
    pub kernel: PathBuf,
    /// `dir/initrd` (0444)
    pub initrd: PathBuf,
    /// Kernel command line for direct kernel boot.
    pub cmdline: String,
    pub disk_sha256: String,
    pub recipe_digest: String,
}

/// Contents of `image.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    pub builder_version: String,
    pub recipe: Recipe,
    pub recipe_digest: String,
    pub debootstrap_suite: String,
    pub kernel_version: String,
    pub cmdline: String,
    pub disk: FileMeta,
    pub kernel: FileMeta,
    pub initrd: FileMeta,
    pub disk_virtual_size_bytes: u64,
    pub build_seconds: f64,
    pub built_at: String,
    /// `dpkg-query` listing of the image: `name version` per line.
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileMeta {
    pub file: String,
    pub size_bytes: u64,
    pub sha256: String,
}

impl BuiltImage {
    /// Reads a complete image directory (one with `image.json` whose files exist with the
    /// recorded sizes). Does not hash the disk: use [`BuiltImage::verify`] for that.
    pub fn open(dir: &Path) -> Result<BuiltImage, ImageError> {
        let meta = read_meta(dir)?;
        for f in [&meta.disk, &meta.kernel, &meta.initrd] {
            let p = dir.join(&f.file);
            let md = fs::metadata(&p).map_err(|e| ImageError::io("stat image file", &p, e))?;
            if md.len() != f.size_bytes {
                return Err(ImageError::Build {
                    name: meta.recipe.name.clone(),
                    reason: format!(
                        "{} has {} bytes but image.json records {}",
                        p.display(),
                        md.len(),
                        f.size_bytes
                    ),
                });
            }
        }
        Ok(BuiltImage {
            dir: dir.to_path_buf(),
            disk: dir.join(&meta.disk.file),
            kernel: dir.join(&meta.kernel.file),
            initrd: dir.join(&meta.initrd.file),
            cmdline: meta.cmdline,
            disk_sha256: meta.disk.sha256,
            recipe_digest: meta.recipe_digest,
            recipe: meta.recipe,
        })
    }

    /// Full metadata from `image.json`.
    pub fn meta(&self) -> Result<ImageMeta, ImageError> {
        read_meta(&self.dir)
    }

    /// Re-hashes the disk and compares it with the recorded sha256.
    pub fn verify(&self) -> Result<(), ImageError> {
        let actual = sys::sha256_file(&self.disk)?;
        if actual != self.disk_sha256 {
            return Err(ImageError::Build {
                name: self.recipe.name.clone(),
                reason: format!(
                    "verify {}: sha256 is {actual}, image.json records {}",
                    self.disk.display(),
                    self.disk_sha256
                ),
            });
        }
        Ok(())
    }
}

fn read_meta(dir: &Path) -> Result<ImageMeta, ImageError> {
    let p = dir.join(IMAGE_JSON);
    let text = fs::read(&p).map_err(|e| ImageError::io("read", &p, e))?;
    serde_json::from_slice(&text).map_err(|source| ImageError::Metadata {
        action: "parse".into(),
        path: p,
        source,
    })
}

/// The image cache directory.
///
/// `$PATCHLAB_CACHE_DIR` if set; else `/var/cache/patchlab` when running as root — not
/// `/root/.cache`, because QEMU started by libvirt runs as `libvirt-qemu` and cannot traverse
/// `/root` (mode 0700) to open the base image; else `$XDG_CACHE_HOME/patchlab` or
/// `~/.cache/patchlab`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PATCHLAB_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if sys::euid() == 0 {
        return PathBuf::from("/var/cache/patchlab");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("patchlab");
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("patchlab")
}

/// The complete image in `dir` if it was built from `recipe` (same digest); the returned image
/// carries `recipe` as loaded (with its `source`).
fn open_cached(dir: &Path, recipe: &Recipe) -> Option<BuiltImage> {
    match BuiltImage::open(dir) {
        Ok(img) if img.recipe_digest == recipe.digest() => Some(BuiltImage {
            recipe: recipe.clone(),
            ..img
        }),
        Ok(img) => {
            tracing::warn!(dir = %dir.display(), recorded = %img.recipe_digest, "image.json digest does not match the recipe; rebuilding");
            None
        }
        Err(e) => {
            if dir.exists() {
                tracing::warn!(dir = %dir.display(), "cached image is incomplete ({e}); rebuilding");
            }
            None
        }
    }
}

/// Returns the cached image for the recipe at `recipe_path`, building it first if needed.
///
/// A complete image is `<cache>/images/<name>-<digest16>/image.json` plus its files. Otherwise the
/// build runs under an exclusive lock on `<cache>/images/<name>-<digest16>.lock` (a concurrent
/// caller waits on the lock, then reuses the image the first one built), into a `.tmp-` directory
/// inside `<cache>/images` that is renamed into place only when complete and is removed on every
/// failure path.
pub fn ensure_built(recipe_path: &Path, cache_dir: &Path) -> Result<BuiltImage, ImageError> {
    let recipe = Recipe::load(recipe_path)?;
    let key = recipe.cache_key();
    let images = cache_dir.join("images");
    sys::create_dir_all_mode(&images, 0o755)?;
    let final_dir = images.join(&key);

    if let Some(img) = open_cached(&final_dir, &recipe) {
        tracing::info!(image = %key, dir = %final_dir.display(), "using cached image");
        return Ok(img);
    }

    let lock_path = images.join(format!("{key}.lock"));
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| ImageError::Lock {
            path: lock_path.clone(),
            source,
        })?;
    if lock_file.try_lock().is_err() {
        tracing::info!(image = %key, lock = %lock_path.display(), "another build holds the lock; waiting");
        lock_file.lock().map_err(|source| ImageError::Lock {
            path: lock_path.clone(),
            source,
        })?;
    }
    // The lock is released when `lock_file` is dropped (also on every error return below).

    if let Some(img) = open_cached(&final_dir, &recipe) {
        tracing::info!(image = %key, "image was built by another process while waiting");
        return Ok(img);
    }

    // We hold the lock: any temp dir of this key is from a crashed build, and a final dir without
    // a valid image.json is incomplete. Remove both.
    let tmp_prefix = format!(".tmp-{key}-");
    if let Ok(rd) = fs::read_dir(&images) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&tmp_prefix) {
                tracing::info!(dir = %e.path().display(), "removing leftover of a crashed build");
                sys::remove_tree(&e.path())?;
            }
        }
    }
    if final_dir.exists() {
        tracing::info!(dir = %final_dir.display(), "removing incomplete image directory");
        sys::remove_tree(&final_dir)?;
    }

    let tmp = images.join(format!("{tmp_prefix}{}", std::process::id()));
    let guard = sys::TreeGuard::new(tmp.clone());
    let built = build(&recipe, &tmp)?;
    fs::rename(&tmp, &final_dir)
        .map_err(|e| ImageError::io("rename built image into", &final_dir, e))?;
    guard.disarm();
    sys::fsync_dir(&images);
    tracing::info!(image = %key, dir = %final_dir.display(), "image ready");
    Ok(BuiltImage {
        dir: final_dir.clone(),
        disk: final_dir.join(built.disk.file_name().expect("disk file name")),
        kernel: final_dir.join(built.kernel.file_name().expect("kernel file name")),
        initrd: final_dir.join(built.initrd.file_name().expect("initrd file name")),
        ..built
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_honours_env() {
        // Only this test touches PATCHLAB_CACHE_DIR in this crate's image tests.
        let old = std::env::var_os("PATCHLAB_CACHE_DIR");
        unsafe { std::env::set_var("PATCHLAB_CACHE_DIR", "/tmp/plc") };
        assert_eq!(default_cache_dir(), PathBuf::from("/tmp/plc"));
        match old {
            Some(v) => unsafe { std::env::set_var("PATCHLAB_CACHE_DIR", v) },
            None => unsafe { std::env::remove_var("PATCHLAB_CACHE_DIR") },
        }
    }

    #[test]
    fn error_messages_read_after_failed_to() {
        let e = ImageError::Command {
            step: "debootstrap bookworm".into(),
            command: "debootstrap --variant=minbase bookworm /x".into(),
            status: "exit status: 1".into(),
            stderr_tail: "E: couldn't download".into(),
        };
        let s = format!("failed to {e}");
        assert!(
            s.starts_with("failed to debootstrap bookworm: `debootstrap"),
            "{s}"
        );
        let e = ImageError::NotRoot {
            name: "debian-12".into(),
            uid: 1000,
        };
        assert!(e.to_string().starts_with("build image debian-12"));
    }

    #[test]
    fn ensure_built_rejects_bad_recipe_without_touching_cache() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("bad.toml");
        fs::write(&recipe, "name = \"x\"\nbogus = 1\n").unwrap();
        let cache = dir.path().join("cache");
        let err = ensure_built(&recipe, &cache).unwrap_err();
        assert!(matches!(err, ImageError::ParseRecipe { .. }), "{err}");
        assert!(!cache.exists());
    }

    fn write_fake_image(dir: &Path, recipe: &Recipe) {
        fs::create_dir_all(dir).unwrap();
        let fm = |f: &str| {
            fs::write(dir.join(f), f).unwrap();
            FileMeta {
                file: f.into(),
                size_bytes: f.len() as u64,
                sha256: "x".into(),
            }
        };
        let meta = ImageMeta {
            builder_version: BUILDER_VERSION.into(),
            recipe: recipe.clone(),
            recipe_digest: recipe.digest(),
            debootstrap_suite: recipe.suite.clone(),
            kernel_version: "0".into(),
            cmdline: "c".into(),
            disk: fm("base.qcow2"),
            kernel: fm("kernel"),
            initrd: fm("initrd"),
            disk_virtual_size_bytes: 0,
            build_seconds: 0.0,
            built_at: "now".into(),
            packages: vec![],
        };
        fs::write(dir.join(IMAGE_JSON), serde_json::to_string(&meta).unwrap()).unwrap();
    }

    /// A caller that finds the lock held waits, then reuses what the holder built, without
    /// building (which would need root and network).
    #[test]
    fn waiter_reuses_image_built_under_lock() {
        let dir = tempfile::tempdir().unwrap();
        let recipe_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-12.toml");
        let recipe = Recipe::load(&recipe_path).unwrap();
        let cache = dir.path().to_path_buf();
        let images = cache.join("images");
        fs::create_dir_all(&images).unwrap();
        let lock = File::create(images.join(format!("{}.lock", recipe.cache_key()))).unwrap();
        lock.lock().unwrap();
        let c2 = cache.clone();
        let rp = recipe_path.clone();
        let waiter = std::thread::spawn(move || ensure_built(&rp, &c2));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!waiter.is_finished(), "ensure_built must wait on the lock");
        write_fake_image(&images.join(recipe.cache_key()), &recipe);
        lock.unlock().unwrap();
        let img = waiter.join().unwrap().unwrap();
        assert_eq!(img.dir, images.join(recipe.cache_key()));
        assert_eq!(img.recipe.source.as_deref(), Some(recipe_path.as_path()));
        assert_eq!(img.cmdline, "c");
        // and a cache hit needs no lock at all
        assert_eq!(ensure_built(&recipe_path, &cache).unwrap(), img);
    }

    /// A failed build leaves nothing behind, and leftovers of a crashed build (`.tmp-KEY-*`) and an
    /// incomplete final directory are removed. The mirror is a closed local port, so the build
    /// fails fast at debootstrap (or at the root check when not root, or at spawn without
    /// debootstrap): all three are failure paths after the cleanup.
    #[test]
    fn failed_build_cleans_up_and_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../images/debian-12.toml").replace(
            "http://deb.debian.org/debian\"",
            "http://127.0.0.1:9/debian\"",
        );
        let recipe_path = dir.path().join("r.toml");
        fs::write(&recipe_path, &text).unwrap();
        let recipe = Recipe::load(&recipe_path).unwrap();
        let images = dir.path().join("cache/images");
        let leftover = images.join(format!(".tmp-{}-1", recipe.cache_key()));
        fs::create_dir_all(leftover.join("rootfs/etc")).unwrap();
        fs::create_dir_all(images.join(recipe.cache_key())).unwrap(); // no image.json
        let err = ensure_built(&recipe_path, &dir.path().join("cache")).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Command { .. } | ImageError::NotRoot { .. } | ImageError::Spawn { .. }
            ),
            "{err}"
        );
        let left: Vec<_> = fs::read_dir(&images)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?} after: {err}");
        eprintln!("expected failure: failed to {err}");
    }

    #[test]
    fn open_rejects_wrong_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let recipe =
            Recipe::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-13.toml"))
                .unwrap();
        write_fake_image(dir.path(), &recipe);
        assert!(BuiltImage::open(dir.path()).is_ok());
        fs::write(dir.path().join("kernel"), "truncated?").unwrap();
        assert!(BuiltImage::open(dir.path()).is_err());
    }

    #[test]
    fn open_rejects_incomplete_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(BuiltImage::open(dir.path()).is_err());
    }

    /// Real build, opt-in: `PATCHLAB_IMAGE_BUILD_TEST=1 [PATCHLAB_IMAGE_BUILD_RECIPES=debian-12,debian-13]
    /// cargo test --lib image::tests::real_build -- --nocapture`. Needs root and the Debian mirror;
    /// builds into `default_cache_dir()`.
    #[test]
    fn real_build() {
        if std::env::var("PATCHLAB_IMAGE_BUILD_TEST").as_deref() != Ok("1") {
            return;
        }
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let names =
            std::env::var("PATCHLAB_IMAGE_BUILD_RECIPES").unwrap_or_else(|_| "debian-12".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        for name in names.split(',').filter(|s| !s.is_empty()) {
            let t = std::time::Instant::now();
            let img = ensure_built(&root.join(format!("{name}.toml")), &default_cache_dir())
                .unwrap_or_else(|e| panic!("failed to {e}"));
            let meta = img.meta().unwrap();
            println!(
                "IMAGE {name}: dir={} disk={} bytes kernel={} build_seconds={:.1} ensure_seconds={:.1} cmdline={:?}",
                img.dir.display(),
                meta.disk.size_bytes,
                meta.kernel_version,
                meta.build_seconds,
                t.elapsed().as_secs_f64(),
                img.cmdline
            );
            // A second call is a cache hit.
            let again =
                ensure_built(&root.join(format!("{name}.toml")), &default_cache_dir()).unwrap();
            assert_eq!(again, img);
        }
    }
}
