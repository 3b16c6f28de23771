//! `patchlab verify` on arbitrary report and signature bytes: problems listed, never a panic.
//! Input: a 2-byte little-endian length, that many bytes of signature, then the report.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("patchlab-fuzz-verify-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

const SIGNERS: &str = "fuzz@patchlab namespaces=\"patchlab-report\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHSnMGldyVcHLM/lauqsWWgs3EWwQIZXBxhHnC657wo0\n";

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (sig, report) = data[2..].split_at(n);
    let _ = patchlab::report::sign::verify_signature(report, &String::from_utf8_lossy(sig), SIGNERS, None);
    let _ = patchlab::report::sign::verify_signature(report, &String::from_utf8_lossy(sig), &String::from_utf8_lossy(report), Some("fuzz@patchlab"));
    let path = dir().join("report.json");
    std::fs::write(&path, report).unwrap();
    std::fs::write(dir().join("report.json.sig"), sig).unwrap();
    let _ = patchlab::report::sign::verify_report(&path, SIGNERS, None);
});
