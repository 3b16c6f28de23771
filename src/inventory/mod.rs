//! The inventory: the real hosts a patch targets (name, platform, role, criticality), and coverage
//! (condition 1): the share of those hosts whose platform a lab platform on which the patch passed
//! represents. Loading reads one file; [`coverage`] is a pure function.
//!
//! ```toml
//! [hosts.web-01]
//! os = "debian"
//! version = "12"
//! arch = "x86_64"
//! role = "web"
//! criticality = "low"   # low | medium | high | critical
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::lab::LabError;
use crate::report::{Coverage, HostCoverage, InventoryRef, PlatformRef, Status};

/// The default coverage threshold: strictly more than half of the hosts (a majority).
pub const DEFAULT_THRESHOLD_PERCENT: u32 = 50;

/// How bad it is when the host breaks. Ordered: `Low < Medium < High < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    Low,
    Medium,
    High,
    Critical,
}

impl Criticality {
    pub fn as_str(self) -> &'static str {
        match self {
            Criticality::Low => "low",
            Criticality::Medium => "medium",
            Criticality::High => "high",
            Criticality::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Criticality> {
        [Criticality::Low, Criticality::Medium, Criticality::High, Criticality::Critical].into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a host runs (or a lab platform simulates): `debian 12 x86_64`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Platform {
    pub os: String,
    pub version: String,
    pub arch: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.os, self.version, self.arch)
    }
}

/// A lab platform as coverage sees it: its name in the lab and what it simulates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformId {
    pub name: String,
    pub os: String,
    pub version: String,
    pub arch: String,
}

impl PlatformId {
    /// A report's platform, when it says what it simulates (all of os, version and arch).
    pub fn from_report(p: &PlatformRef) -> Option<PlatformId> {
        Some(PlatformId { name: p.name.clone(), os: p.os.clone()?, version: p.version.clone()?, arch: p.arch.clone()? })
    }

    fn matches(&self, p: &Platform) -> bool {
        self.os == p.os && self.version == p.version && self.arch == p.arch
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub platform: Platform,
    pub role: String,
    pub criticality: Criticality,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub path: PathBuf,
    /// sha256 of the file's bytes, lowercase hex: what reports and plans bind.
    pub sha256: String,
    /// Sorted by name.
    pub hosts: Vec<Host>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    hosts: BTreeMap<Spanned<String>, RawHost>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    os: Spanned<String>,
    version: Spanned<String>,
    arch: Spanned<String>,
    role: Spanned<String>,
    criticality: Spanned<Criticality>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, LabError> {
        let text = std::fs::read_to_string(path).map_err(|e| LabError::whole_file(path, format!("cannot read the inventory file: {e}")))?;
        Inventory::parse(path, &text)
    }

    /// Parses and validates inventory `text`; errors name `path`, line and column.
    pub fn parse(path: &Path, text: &str) -> Result<Inventory, LabError> {
        let err = |span: std::ops::Range<usize>, message: String| LabError::at(path, text, span, message);
        if text.trim().is_empty() {
            return Err(LabError::whole_file(path, "the inventory file is empty: list each host as a [hosts.NAME] table with os, version, arch, role and criticality".into()));
        }
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let mut e = LabError::from_toml(path, text, &e);
            // The lab's wording, in the inventory's terms.
            e.message = e.message.replace(": each platform, patch and check is one table", ": each host is one table");
            if e.message.contains("expected a string") {
                e.message.push_str(" (quote it, e.g. version = \"12\")");
            }
            if e.message.starts_with("missing field") {
                e.message.push_str(": each host needs os, version, arch, role and criticality");
            }
            e
        })?;
        if raw.hosts.is_empty() {
            return Err(LabError::whole_file(path, "the inventory has no hosts: add at least one [hosts.NAME] table".into()));
        }
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        for (name, h) in &raw.hosts {
            check_host_name(name.get_ref()).map_err(|m| err(name.span(), format!("host name: {m}")))?;
            for (key, value) in [("os", &h.os), ("version", &h.version), ("arch", &h.arch), ("role", &h.role)] {
                let v = value.get_ref();
                if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(err(value.span(), format!("host {}: `{key}` must be a non-empty word without spaces, e.g. {}", name.get_ref(), example(key))));
                }
            }
            hosts.push(Host {
                name: name.get_ref().clone(),
                platform: Platform { os: h.os.get_ref().clone(), version: h.version.get_ref().clone(), arch: h.arch.get_ref().clone() },
                role: h.role.get_ref().clone(),
                criticality: *h.criticality.get_ref(),
            });
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Inventory { path: path.to_path_buf(), sha256: hex::encode(Sha256::digest(text.as_bytes())), hosts })
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

fn example(key: &str) -> &'static str {
    match key {
        "os" => "os = \"debian\"",
        "version" => "version = \"12\"",
        "arch" => "arch = \"x86_64\"",
        _ => "role = \"web\"",
    }
}

fn check_host_name(name: &str) -> Result<(), String> {
    const RULE: &str = "host names use letters, digits, `-`, `_` and `.`, start with a letter or digit, at most 253 characters";
    crate::lab::plain_name(name, 253, RULE)?;
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("`{name}`: {RULE}"));
    }
    Ok(())
}

/// Coverage of `inventory` by the lab platforms on which the patch passed. A host is covered when a
/// lab platform with the same os, version and arch exists and `passed(its name)`; when several
/// match, a passing one is preferred. The status is `pass` when `covered * 100 > threshold * total`
/// (strictly above the threshold), and `fail` otherwise, including when the inventory is empty.
pub fn coverage(inventory: &Inventory, inventory_file: &str, lab_platforms: &[PlatformId], passed: &dyn Fn(&str) -> bool, threshold_percent: u32) -> Coverage {
    let mut hosts = Vec::with_capacity(inventory.hosts.len());
    let mut uncovered = BTreeSet::new();
    for h in &inventory.hosts {
        let matching: Vec<&PlatformId> = lab_platforms.iter().filter(|p| p.matches(&h.platform)).collect();
        let passing = matching.iter().find(|p| passed(&p.name));
        let (lab_platform, covered) = match (passing, matching.first()) {
            (Some(p), _) => (Some(p.name.clone()), true),
            (None, Some(p)) => (Some(p.name.clone()), false),
            (None, None) => (None, false),
        };
        if !covered {
            uncovered.insert(h.platform.to_string());
        }
        hosts.push(HostCoverage { host: h.name.clone(), platform: h.platform.to_string(), role: h.role.clone(), criticality: h.criticality.to_string(), lab_platform, covered });
    }
    let total = hosts.len() as u64;
    let covered = hosts.iter().filter(|h| h.covered).count() as u64;
    let status = if total > 0 && covered * 100 > u64::from(threshold_percent) * total { Status::Pass } else { Status::Fail };
    Coverage {
        status,
        inventory: Some(InventoryRef { file: inventory_file.to_string(), sha256: inventory.sha256.clone() }),
        threshold_percent,
        covered_hosts: covered as u32,
        total_hosts: total as u32,
        hosts,
        uncovered_platforms: uncovered.into_iter().collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An inventory from `(name, "os version arch", criticality)` triples; role is the name's prefix.
    pub(crate) fn inv(hosts: &[(&str, &str, &str)]) -> Inventory {
        let mut hosts: Vec<Host> = hosts
            .iter()
            .map(|(name, platform, crit)| {
                let mut p = platform.split(' ');
                Host {
                    name: name.to_string(),
                    platform: Platform { os: p.next().unwrap().into(), version: p.next().unwrap().into(), arch: p.next().unwrap().into() },
                    role: name.split('-').next().unwrap().into(),
                    criticality: Criticality::parse(crit).unwrap(),
                }
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Inventory { path: "inv.toml".into(), sha256: "ab".repeat(32), hosts }
    }

    pub(crate) fn lab(name: &str, platform: &str) -> PlatformId {
        let mut p = platform.split(' ');
        PlatformId { name: name.into(), os: p.next().unwrap().into(), version: p.next().unwrap().into(), arch: p.next().unwrap().into() }
    }

    #[test]
    fn coverage_table() {
        let d12 = "debian 12 x86_64";
        let d13 = "debian 13 x86_64";
        let d10 = "debian 10 x86_64";
        // (case, hosts, lab platforms, failed lab platforms, threshold, covered, total, status, uncovered)
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str, &'a str)>, Vec<PlatformId>, Vec<&'a str>, u32, u32, u32, Status, Vec<&'a str>);
        let table: Vec<Case> = vec![
            ("1 of 2 is not a majority", vec![("a", d12, "low"), ("b", d10, "low")], vec![lab("l12", d12)], vec![], 50, 1, 2, Status::Fail, vec![d10]),
            ("2 of 3 is a majority", vec![("a", d12, "low"), ("b", d12, "high"), ("c", d10, "low")], vec![lab("l12", d12)], vec![], 50, 2, 3, Status::Pass, vec![d10]),
            ("2 of 3 is not above 75%", vec![("a", d12, "low"), ("b", d12, "high"), ("c", d10, "low")], vec![lab("l12", d12)], vec![], 75, 2, 3, Status::Fail, vec![d10]),
            (
                "3 of 4 is exactly 75%, not above",
                vec![("a", d12, "low"), ("b", d12, "low"), ("c", d13, "low"), ("d", d10, "low")],
                vec![lab("l12", d12), lab("l13", d13)],
                vec![],
                75,
                3,
                4,
                Status::Fail,
                vec![d10],
            ),
            (
                "4 of 5 is above 75%",
                vec![("a", d12, "low"), ("b", d12, "low"), ("c", d13, "low"), ("d", d13, "low"), ("e", d10, "low")],
                vec![lab("l12", d12), lab("l13", d13)],
                vec![],
                75,
                4,
                5,
                Status::Pass,
                vec![d10],
            ),
            ("all covered at 100% is not above 100%", vec![("a", d12, "low")], vec![lab("l12", d12)], vec![], 100, 1, 1, Status::Fail, vec![]),
            ("all covered at threshold 0", vec![("a", d12, "low")], vec![lab("l12", d12)], vec![], 0, 1, 1, Status::Pass, vec![]),
            ("no hosts fails", vec![], vec![lab("l12", d12)], vec![], 50, 0, 0, Status::Fail, vec![]),
            ("platform present but failed", vec![("a", d12, "low"), ("b", d12, "low"), ("c", d13, "low")], vec![lab("l12", d12), lab("l13", d13)], vec!["l12"], 50, 1, 3, Status::Fail, vec![d12]),
            ("arch must match too", vec![("a", "debian 12 aarch64", "low"), ("b", d12, "low"), ("c", d12, "low")], vec![lab("l12", d12)], vec![], 50, 2, 3, Status::Pass, vec!["debian 12 aarch64"]),
            ("a passing duplicate platform wins", vec![("a", d12, "low")], vec![lab("x", d12), lab("y", d12)], vec!["x"], 50, 1, 1, Status::Pass, vec![]),
        ];
        for (case, hosts, labs, failed, threshold, covered, total, status, uncovered) in table {
            let inventory = inv(&hosts);
            let passed = |name: &str| !failed.contains(&name);
            let c = coverage(&inventory, "inv.toml", &labs, &passed, threshold);
            assert_eq!((c.covered_hosts, c.total_hosts, c.status), (covered, total, status), "{case}");
            assert_eq!(c.uncovered_platforms, uncovered, "{case}");
            assert_eq!(c.threshold_percent, threshold, "{case}");
            assert_eq!(c.inventory.as_ref().unwrap().sha256, inventory.sha256, "{case}");
            assert_eq!(c.hosts.len(), hosts.len(), "{case}");
        }
    }

    #[test]
    fn coverage_names_the_lab_platform_even_when_it_failed() {
        let inventory = inv(&[("a", "debian 12 x86_64", "low"), ("b", "debian 10 x86_64", "critical")]);
        let c = coverage(&inventory, "inv.toml", &[lab("l12", "debian 12 x86_64")], &|_| false, 50);
        assert_eq!(c.hosts[0], HostCoverage { host: "a".into(), platform: "debian 12 x86_64".into(), role: "a".into(), criticality: "low".into(), lab_platform: Some("l12".into()), covered: false });
        assert_eq!(c.hosts[1].lab_platform, None);
        assert_eq!(c.hosts[1].criticality, "critical");
    }

    #[test]
    fn parse_sorts_and_validates() {
        let text = "[hosts.web-02]\nos = \"debian\"\nversion = \"12\"\narch = \"x86_64\"\nrole = \"web\"\ncriticality = \"high\"\n\n[hosts.db-01]\nos = \"debian\"\nversion = \"13\"\narch = \"x86_64\"\nrole = \"db\"\ncriticality = \"critical\"\n";
        let i = Inventory::parse(Path::new("i.toml"), text).unwrap();
        assert_eq!(i.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["db-01", "web-02"]);
        assert_eq!(i.hosts[0].criticality, Criticality::Critical);
        assert_eq!(i.hosts[1].platform.to_string(), "debian 12 x86_64");
        assert_eq!(i.sha256, hex::encode(Sha256::digest(text.as_bytes())));

        let bad = text.replace("criticality = \"high\"", "criticality = \"urgent\"");
        let e = Inventory::parse(Path::new("i.toml"), &bad).unwrap_err();
        assert_eq!((e.line, e.column), (6, 15), "{e}");
        assert!(e.message.contains("urgent"), "{e}");

        let bad = text.replace("role = \"web\"", "role = \"web\"\nrack = 4");
        let e = Inventory::parse(Path::new("i.toml"), &bad).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("rack"), "{e}");

        let bad = text.replace("[hosts.web-02]", "[hosts.\"web 02\"]");
        let e = Inventory::parse(Path::new("i.toml"), &bad).unwrap_err();
        assert_eq!(e.line, 1, "{e}");

        assert_eq!(Inventory::parse(Path::new("i.toml"), "  \n").unwrap_err().line, 0);
        assert_eq!(Inventory::parse(Path::new("i.toml"), "hosts = {}\n").unwrap_err().line, 0);
    }

    #[test]
    fn criticality_is_ordered() {
        assert!(Criticality::Low < Criticality::Medium && Criticality::Medium < Criticality::High && Criticality::High < Criticality::Critical);
        assert_eq!(Criticality::parse("critical"), Some(Criticality::Critical));
        assert_eq!(Criticality::parse("Critical"), None);
    }
}
