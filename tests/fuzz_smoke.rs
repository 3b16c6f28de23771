//! Fuzzing on stable Rust (issue 6): a seeded byte mutator over the lab corpus (every lab in
//! `labs/` and the invalid-lab corpus) and over a signed report, its signature and its
//! allowed_signers file. Every input must give a value or an error, never a panic.
//!
//! In the suite it runs for a few seconds; `PATCHLAB_FUZZ_SECS=600 cargo test --release --test
//! fuzz_smoke -- --nocapture` runs it for ten minutes (the cargo-fuzz targets are in `fuzz/`).
//! Inputs that panic are written to `target/fuzz-findings/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchlab::report::sign;
use patchlab::report::{CellResult, Conditions, EvidenceRef, LabRef, PlatformRef, Report, SCHEMA_VERSION, Tool, Verdict};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const TOKENS: &[&[u8]] = &[
    b"\"", b"'", b"[", b"]", b"[[", b"]]", b"{", b"}", b"=", b"\n", b"\\", b"\\u0000", b"\"\"\"", b"'''", b",", b".", b"#", b"\0", b"\xff\xfe",
    b"9999999999999999999999", b"-1", b"0", b"inf", b"nan", b"1e309", b"-0x7f", b"1979-05-27T07:32:00Z", b"\"30s\"", b"\"PT5M\"", b"\"0s\"", b"\"25h\"",
    b"[platforms.a]\n", b"[patches.p]\nkind = \"script\"\n", b"[checks.c]\nkind = \"http\"\n", b"[settings]\n", b"image = \"/etc/passwd\"\n", b"files = [\"../../../../etc/shadow\"]\n",
    b"\"\xe2\x80\xae\"", b"\xf0\x9f\x92\xa9", b"{\"a\":", b"null", b"true", b"[]", b"{}", b"-----BEGIN SSH SIGNATURE-----\n", b"-----END SSH SIGNATURE-----\n", b"AAAA", b"ssh-ed25519 ",
    b"valid-after=\"20990101\" ", b"namespaces=\"*\" ", b"cert-authority ", b"\"schema_version\":", b"\"path\":\"../x\"", b"\"sha256\":\"",
];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => {
                let end = (at + rng.below(64)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, t.iter().copied());
            }
            4 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = (a + rng.below(256)).min(other.len());
                data.splice(at..at, other[a..b].iter().copied());
            }
            5 if !data.is_empty() => {
                // Repeat a slice: long strings, deep nesting.
                let a = rng.below(data.len());
                let b = (a + 1 + rng.below(16)).min(data.len());
                let piece = data[a..b].repeat(1 + rng.below(2000));
                data.splice(at..at, piece);
            }
            _ => data.truncate(at),
        }
    }
    data
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab_seeds() -> Vec<(PathBuf, Vec<u8>)> {
    let mut seeds = Vec::new();
    for dir in ["labs", "fixtures/labs/invalid"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                seeds.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    assert!(seeds.len() > 40, "the corpus is there");
    seeds
}

fn report() -> Report {
    let now = jiff::Timestamp::now();
    let cell = |p: &str| CellResult { platform: p.into(), patch: "fix".into(), verdict: Verdict::Pass, host: "qemu:///system".into(), clone: format!("patchlab-x-{p}"), error: None, conditions: Conditions::default(), phases: vec![], duration_ms: 1, evidence: vec![EvidenceRef { path: format!("evidence/{p}.log"), sha256: "0".repeat(64), bytes: 3 }] };
    let platform = PlatformRef { name: "debian-12".into(), origin: "image:debian-12".into(), os: Some("debian".into()), version: Some("12".into()), arch: Some("x86_64".into()), image_recipe_digest: None, image_disk_sha256: None, golden_disk_sha256: "f".repeat(64), golden_state_sha256: "0".repeat(64) };
    Report {
        schema_version: SCHEMA_VERSION,
        run_id: "fuzz".into(),
        complete: true,
        verdict: Verdict::Pass,
        lab: LabRef { name: "fuzz".into(), file: "labs/fuzz.toml".into(), sha256: "a".repeat(64) },
        patchlab: Tool { version: "0.1.0".into(), commit: "x".into() },
        hosts: vec![],
        started_at: now.to_string(),
        finished_at: now.to_string(),
        platforms: vec![platform],
        patches: vec![],
        coverage: Default::default(),
        results: vec![cell("debian-12"), cell("<script>alert(1)</script>")],
        signer: None,
    }
}

fn save_finding(kind: &str, i: u64, parts: &[&[u8]]) -> PathBuf {
    let dir = root().join("target/fuzz-findings");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{kind}-{i}"));
    std::fs::write(&path, parts.join(&b"\n=====PART=====\n"[..])).unwrap();
    path
}

#[test]
fn lab_parser_and_verify_survive_mutated_inputs() {
    let secs: u64 = std::env::var("PATCHLAB_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let seed: u64 = std::env::var("PATCHLAB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1ab5);
    let mut rng = Rng(seed | 1);
    let labs = lab_seeds();
    let keydir = tempfile::tempdir().unwrap();
    let keys = sign::keygen(keydir.path(), "fuzz@patchlab").unwrap();
    let signers = std::fs::read(&keys.allowed_signers).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report_path = report().write(dir.path()).unwrap();
    sign::sign(&report_path, &keys.private_key).unwrap();
    let report_bytes = std::fs::read(&report_path).unwrap();
    let sig_bytes = std::fs::read(sign::signature_path(&report_path)).unwrap();
    assert!(sign::verify_signature(&report_bytes, std::str::from_utf8(&sig_bytes).unwrap(), std::str::from_utf8(&signers).unwrap(), None).is_ok(), "the seed verifies");

    // Silence the default panic message: findings are collected and reported below.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut lab_execs, mut verify_execs, mut findings) = (0u64, 0u64, Vec::new());
    let fuzz_dir = tempfile::tempdir().unwrap();
    let fuzz_report = fuzz_dir.path().join("report.json");
    while Instant::now() < deadline {
        // The lab parser.
        for _ in 0..50 {
            let (path, text) = &labs[rng.below(labs.len())];
            let other = &labs[rng.below(labs.len())].1;
            let input = mutate(&mut rng, text, other);
            let parsed = std::panic::catch_unwind(|| {
                if let Ok(text) = std::str::from_utf8(&input) {
                    let _ = patchlab::lab::Lab::parse(Path::new(path), text);
                }
            });
            lab_execs += 1;
            if parsed.is_err() {
                findings.push(save_finding("lab", lab_execs, &[path.to_string_lossy().as_bytes(), &input]));
            }
        }
        // `patchlab verify`: mutate the report, the signature or the allowed signers (or several).
        for _ in 0..20 {
            let which = rng.below(7) + 1;
            let r = if which & 1 != 0 { mutate(&mut rng, &report_bytes, &sig_bytes) } else { report_bytes.clone() };
            let s = if which & 2 != 0 { mutate(&mut rng, &sig_bytes, &report_bytes) } else { sig_bytes.clone() };
            let a = if which & 4 != 0 { mutate(&mut rng, &signers, &sig_bytes) } else { signers.clone() };
            let verified = std::panic::catch_unwind(|| {
                let a_text = String::from_utf8_lossy(&a);
                let _ = sign::verify_signature(&r, &String::from_utf8_lossy(&s), &a_text, Some("fuzz@patchlab"));
                std::fs::write(&fuzz_report, &r).unwrap();
                std::fs::write(sign::signature_path(&fuzz_report), &s).unwrap();
                let v = sign::verify_report(&fuzz_report, &a_text, None);
                // Only the untouched bytes may verify.
                assert!(!v.is_valid(), "a report without its evidence files verified");
            });
            verify_execs += 1;
            if verified.is_err() {
                findings.push(save_finding("verify", verify_execs, &[&r, &s, &a]));
            }
        }
    }
    std::panic::set_hook(hook);
    eprintln!("fuzz: {lab_execs} lab parser and {verify_execs} verify executions in {secs} s (seed {seed:#x}); {} findings", findings.len());
    assert!(findings.is_empty(), "inputs that panicked: {findings:?}");
}
