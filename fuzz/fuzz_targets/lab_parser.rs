//! The lab parser on arbitrary text: an error with a location or a lab, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = patchlab::lab::Lab::parse(std::path::Path::new("/nonexistent-fuzz-root/labs/fuzz.toml"), text);
    }
});
