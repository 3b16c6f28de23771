//! Guest image recipes: a small, strict TOML file per guest flavour (`images/*.toml`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ImageError;

/// Bump whenever the builder's output for the same recipe changes (steps, files written into the
/// guest, kernel command line, disk layout, ...). It is part of [`Recipe::digest`], so bumping it
/// invalidates every cached image.
pub const BUILDER_VERSION: &str = "patchlab-image-builder/3";

fn default_mirror() -> String {
    "http://deb.debian.org/debian".to_string()
}

fn default_security_mirror() -> String {
    "http://deb.debian.org/debian-security".to_string()
}

fn default_kernel_package() -> String {
    "linux-image-amd64".to_string()
}

/// One guest image recipe, as read from `images/NAME.toml`.
///
/// Unknown keys are rejected so a typo never silently yields a different image than the author
/// meant. Every field takes part in [`Recipe::digest`] (except `source`, where the file was read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Image name; also the cache directory prefix. `[a-z0-9._-]+`.
    pub name: String,
    /// Only `debian` is supported.
    pub os: String,
    /// Release number, informational ("12").
    pub version: String,
    /// Only `x86_64` is supported (debootstrap arch `amd64`).
    pub arch: String,
    /// Debian suite codename given to debootstrap ("bookworm").
    pub suite: String,
    /// Main archive mirror.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// Add `SUITE-security` (from `security_mirror`) and `SUITE-updates` (from `mirror`) to the
    /// image's sources and install the updates available at build time.
    #[serde(default)]
    pub security_updates: bool,
    /// Mirror for `SUITE-security`.
    #[serde(default = "default_security_mirror")]
    pub security_mirror: String,
    /// Extra packages on top of the builder's fixed base set.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Package trees (relative to the recipe file) built with `dpkg-deb` and installed into the
    /// image, e.g. the v1 of a fixture package that an `upgrade` patch then upgrades. Their
    /// contents take part in the digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_packages: Vec<String>,
    /// systemd units enabled at boot (a bare name means `NAME.service`).
    #[serde(default)]
    pub services: Vec<String>,
    /// Kernel package installed into the image.
    #[serde(default = "default_kernel_package")]
    pub kernel_package: String,
    /// Guest hostname; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Size of the root filesystem (the qcow2's virtual size).
    pub disk_size_mib: u32,
    /// Memory for guests booted from this image.
    pub memory_mib: u32,
    /// vCPUs for guests booted from this image.
    pub vcpus: u32,
    /// Where the recipe was read from (not part of the digest, not serialised).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Feeds every file under `dir` (relative path, mode, contents), in sorted order, into `h`.
fn tree_digest(root: &Path, dir: &Path, h: &mut Sha256) {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0u8]);
        if path.is_dir() {
            tree_digest(root, &path, h);
        } else if let Ok(data) = std::fs::read(&path) {
            let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o111 != 0).unwrap_or(false);
            h.update([mode as u8]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(&data);
        }
    }
}

impl Recipe {
    /// Reads, parses and validates a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::ReadRecipe {
            path: path.to_path_buf(),
            source,
        })?;
        let mut recipe = Recipe::parse(&text, path)?;
        recipe.source = Some(path.to_path_buf());
        Ok(recipe)
    }

    /// Parses and validates recipe text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, ImageError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| ImageError::ParseRecipe {
            path: path.to_path_buf(),
            message: e.message().to_string(),
            line: e
                .span()
                .map(|s| 1 + text[..s.start.min(text.len())].matches('\n').count()),
        })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// The hostname the guest gets.
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }

    /// Debian architecture name for `arch`.
    pub fn debian_arch(&self) -> &'static str {
        match self.arch.as_str() {
            "x86_64" => "amd64",
            _ => "amd64",
        }
    }

    /// Unit names of `services`, with `.service` added to bare names.
    pub fn service_units(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|s| {
                if s.contains('.') {
                    s.clone()
                } else {
                    format!("{s}.service")
                }
            })
            .collect()
    }

    /// sha256 (hex) of the canonical recipe content (its JSON serialisation, fields in declaration
    /// order, `source` excluded) plus [`BUILDER_VERSION`].
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("recipe serialises to JSON");
        let mut h = Sha256::new();
        h.update(BUILDER_VERSION.as_bytes());
        h.update([0u8]);
        h.update(&canonical);
        for dir in self.local_package_dirs() {
            tree_digest(&dir, &dir, &mut h);
        }
        hex::encode(h.finalize())
    }

    /// The `local_packages` trees, resolved against the recipe file's directory.
    pub fn local_package_dirs(&self) -> Vec<PathBuf> {
        let base = self.source.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
        self.local_packages.iter().map(|p| base.join(p)).collect()
    }

    /// Directory name of this recipe's image in the cache: `NAME-DIGEST16`.
    pub fn cache_key(&self) -> String {
        format!("{}-{}", self.name, &self.digest()[..16])
    }

    fn validate(&self, path: &Path) -> Result<(), ImageError> {
        let bad = |key: &str, reason: String| ImageError::InvalidRecipe {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let simple = |s: &str, extra: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(c))
        };
        if !simple(&self.name, "._-") || self.name.starts_with('.') {
            return Err(bad(
                "name",
                format!("{:?} is not a name of [a-z0-9._-]", self.name),
            ));
        }
        if self.os != "debian" {
            return Err(bad(
                "os",
                format!("{:?} is not supported (only \"debian\")", self.os),
            ));
        }
        if self.arch != "x86_64" {
            return Err(bad(
                "arch",
                format!("{:?} is not supported (only \"x86_64\")", self.arch),
            ));
        }
        if self.version.is_empty() {
            return Err(bad("version", "is empty".into()));
        }
        if !simple(&self.suite, "-") {
            return Err(bad(
                "suite",
                format!("{:?} is not a suite codename", self.suite),
            ));
        }
        for (key, url) in [
            ("mirror", &self.mirror),
            ("security_mirror", &self.security_mirror),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.chars().any(|c| c.is_whitespace())
            {
                return Err(bad(key, format!("{url:?} is not an http(s) URL")));
            }
        }
        for p in self
            .packages
            .iter()
            .chain(std::iter::once(&self.kernel_package))
        {
            // Debian package names: [a-z0-9][a-z0-9+.-]+ ; refuse anything that apt could read as
            // an option or a version/release pin.
            if !simple(p, "+.-") || p.starts_with(['-', '+', '.']) {
                return Err(bad(
                    "packages",
                    format!("{p:?} is not a Debian package name"),
                ));
            }
        }
        for s in &self.services {
            if !simple(s, "@._-") || s.starts_with(['-', '.']) {
                return Err(bad("services", format!("{s:?} is not a systemd unit name")));
            }
        }
        if let Some(h) = &self.hostname {
            if !simple(h, "-") || h.starts_with('-') || h.len() > 63 {
                return Err(bad("hostname", format!("{h:?} is not a hostname label")));
            }
        } else if !simple(&self.name, "-") || self.name.len() > 63 {
            return Err(bad(
                "hostname",
                format!(
                    "is required because name {:?} is not a valid hostname",
                    self.name
                ),
            ));
        }
        if self.disk_size_mib < 512 {
            return Err(bad(
                "disk_size_mib",
                format!("{} is below 512", self.disk_size_mib),
            ));
        }
        if self.memory_mib < 128 {
            return Err(bad(
                "memory_mib",
                format!("{} is below 128", self.memory_mib),
            ));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(bad("vcpus", format!("{} is not within 1..=64", self.vcpus)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "debian-12"
os = "debian"
version = "12"
arch = "x86_64"
suite = "bookworm"
mirror = "http://deb.debian.org/debian"
security_updates = true
packages = ["nginx"]
services = ["nginx"]
disk_size_mib = 2048
memory_mib = 512
vcpus = 1
"#;

    fn parse(text: &str) -> Result<Recipe, ImageError> {
        Recipe::parse(text, Path::new("images/test.toml"))
    }

    #[test]
    fn parses_good_recipe() {
        let r = parse(GOOD).unwrap();
        assert_eq!(r.name, "debian-12");
        assert_eq!(r.suite, "bookworm");
        assert_eq!(r.services, vec!["nginx"]);
        assert_eq!(r.service_units(), vec!["nginx.service"]);
        assert_eq!(r.hostname(), "debian-12");
        assert_eq!(r.kernel_package, "linux-image-amd64");
        assert_eq!(r.security_mirror, "http://deb.debian.org/debian-security");
        assert_eq!((r.memory_mib, r.vcpus, r.disk_size_mib), (512, 1, 2048));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse(&format!("{GOOD}\nmemroy_mib = 3\n")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::ParseRecipe { .. }), "{msg}");
        assert!(msg.contains("memroy_mib"), "{msg}");
        assert!(msg.contains("images/test.toml"), "{msg}");
        assert!(msg.starts_with("parse recipe"), "{msg}");
    }

    #[test]
    fn missing_key_is_rejected() {
        let text = GOOD.replace("vcpus = 1\n", "");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("vcpus"), "{msg}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (from, to, key) in [
            ("arch = \"x86_64\"", "arch = \"aarch64\"", "arch"),
            ("os = \"debian\"", "os = \"ubuntu\"", "os"),
            (
                "packages = [\"nginx\"]",
                "packages = [\"-oFoo=1\"]",
                "packages",
            ),
            (
                "services = [\"nginx\"]",
                "services = [\"ng inx\"]",
                "services",
            ),
            ("name = \"debian-12\"", "name = \"../x\"", "name"),
            ("memory_mib = 512", "memory_mib = 16", "memory_mib"),
            (
                "mirror = \"http://deb.debian.org/debian\"",
                "mirror = \"file:///x\"",
                "mirror",
            ),
        ] {
            let err = parse(&GOOD.replace(from, to)).unwrap_err();
            match &err {
                ImageError::InvalidRecipe { key: k, .. } => assert_eq!(k, key, "{err}"),
                other => panic!("expected InvalidRecipe for {key}, got {other}"),
            }
        }
    }

    #[test]
    fn digest_is_stable_and_ignores_formatting() {
        let a = parse(GOOD).unwrap();
        let reordered = format!("vcpus = 1\n{}", GOOD.replace("vcpus = 1\n", "# comment\n"));
        let b = parse(&reordered).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
        assert_eq!(a.digest().len(), 64);
        // the source path does not take part
        let mut c = a.clone();
        c.source = Some(PathBuf::from("/elsewhere.toml"));
        assert_eq!(a.digest(), c.digest());
        assert!(a.cache_key().starts_with("debian-12-"));
        assert_eq!(a.cache_key().len(), "debian-12-".len() + 16);
    }

    #[test]
    fn digest_changes_when_a_field_changes() {
        let a = parse(GOOD).unwrap();
        for (from, to) in [
            ("suite = \"bookworm\"", "suite = \"trixie\""),
            ("packages = [\"nginx\"]", "packages = [\"nginx\", \"curl\"]"),
            ("services = [\"nginx\"]", "services = []"),
            ("memory_mib = 512", "memory_mib = 1024"),
            ("security_updates = true", "security_updates = false"),
            ("disk_size_mib = 2048", "disk_size_mib = 4096"),
        ] {
            let b = parse(&GOOD.replace(from, to)).unwrap();
            assert_ne!(a.digest(), b.digest(), "{from} -> {to}");
        }
    }

    #[test]
    fn shipped_recipes_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        for (file, suite) in [
            ("debian-11.toml", "bullseye"),
            ("debian-12.toml", "bookworm"),
            ("debian-13.toml", "trixie"),
        ] {
            let r = Recipe::load(&dir.join(file)).unwrap();
            assert_eq!(r.suite, suite);
            assert_eq!(format!("{}.toml", r.name), file);
            assert!(r.services.iter().any(|s| s == "nginx"));
        }
    }
}
