//! The lab file as written: strict, so a typo is an error and not a silently ignored key.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLab {
    pub name: Option<Spanned<String>>,
    // Keys are spanned so that errors about a table point at its `[kind.NAME]` header.
    #[serde(default)]
    pub platforms: BTreeMap<Spanned<String>, RawPlatform>,
    #[serde(default)]
    pub patches: BTreeMap<Spanned<String>, RawPatch>,
    #[serde(default)]
    pub checks: BTreeMap<Spanned<String>, RawCheck>,
    #[serde(default)]
    pub settings: RawSettings,
    /// The real hosts the patches target, for coverage (condition 1).
    pub inventory: Option<Spanned<String>>,
    #[serde(default)]
    pub coverage: RawCoverage,
    #[serde(default)]
    pub removal: RawRemoval,
    /// libvirt URIs the cells are spread over, round-robin (`patchlab run --host` overrides).
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoverage {
    pub threshold_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemoval {
    #[serde(default)]
    pub watch: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlatform {
    pub image: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
    pub snapshot: Option<Spanned<String>>,
    /// What the platform simulates, for coverage; image platforms default to their recipe's.
    pub os: Option<Spanned<String>>,
    pub version: Option<Spanned<String>>,
    pub arch: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPatch {
    /// Required; optional here so that a missing `kind` gets a message that names the valid kinds.
    pub kind: Option<Spanned<RawPatchKind>>,
    #[serde(default)]
    pub files: Vec<Spanned<String>>,
    #[serde(default)]
    pub package_trees: Vec<Spanned<String>>,
    /// Digests the files must have (file name → sha256), e.g. from the vendor's advisory.
    #[serde(default)]
    pub sha256: BTreeMap<String, Spanned<String>>,
    /// `upgrade`: the exact packages to restore on removal, when the guest cannot provide them.
    #[serde(default)]
    pub rollback_files: Vec<Spanned<String>>,
    /// `script`: the command that installs, and the one that removes (argv, no shell).
    pub install: Option<Spanned<Vec<String>>>,
    pub remove: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawPatchKind {
    Deb,
    Upgrade,
    Script,
}

/// A check as written: one flat table whose `kind` decides which other keys apply. Numbers are read
/// as i64 and range-checked in `lab::check_kind`, so that `port = 0` or `port = 70000` gets a message
/// about ports rather than about integer types.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// Required; optional here so that a missing `kind` gets a message that names the valid kinds.
    pub kind: Option<Spanned<RawCheckKind>>,
    pub port: Option<Spanned<i64>>,
    pub path: Option<Spanned<String>>,
    pub status: Option<Spanned<i64>>,
    pub body_contains: Option<Spanned<String>>,
    pub argv: Option<Spanned<Vec<String>>>,
    pub exit_code: Option<Spanned<i64>>,
    pub stdout_contains: Option<Spanned<String>>,
    pub timeout: Option<Spanned<toml::Value>>,
    pub retries: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawCheckKind {
    Http,
    Tcp,
    Command,
}

/// What a smoke check looks at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CheckKind {
    /// An HTTP request from the host through the clone's forwarded port.
    Http { port: u16, path: String, status: u16, body_contains: Option<String> },
    /// A TCP connection from the host through the forwarded port.
    Tcp { port: u16 },
    /// A command in the guest (no shell), by exit status and optionally stdout.
    Command { argv: Vec<String>, exit_code: i64, stdout_contains: Option<String> },
}

impl CheckKind {
    pub fn guest_port(&self) -> Option<u16> {
        match self {
            CheckKind::Http { port, .. } | CheckKind::Tcp { port } => Some(*port),
            CheckKind::Command { .. } => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    // Durations are read as any value so that `timeout = 30` can be told to add a unit.
    pub install_timeout: Option<Spanned<toml::Value>>,
    pub remove_timeout: Option<Spanned<toml::Value>>,
    /// Refuse to qualify when a check fails on the untouched clone.
    pub require_baseline: Option<bool>,
    /// Keep the patch installed this long, repeating the checks every `burn_in_interval`.
    pub burn_in: Option<Spanned<toml::Value>>,
    pub burn_in_interval: Option<Spanned<toml::Value>>,
}
