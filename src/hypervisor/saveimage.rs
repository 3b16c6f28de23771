//! The QEMU save image header libvirt writes in front of a domain's migration stream.
//!
//! libvirt refuses to restore a saved state under another name or UUID, and two running domains
//! cannot share either, so N parallel clones of one golden state need N state files whose embedded
//! domain XML differs. The header layout is libvirt's documented `virQEMUSaveHeader`
//! (src/qemu/qemu_saveimage.h): 16 bytes of magic, then `version`, `data_len`, `was_running`,
//! `compressed` (the stream format) and `cookieOffset` as native-endian u32, then 14 unused u32:
//! 92 bytes, as measured on the files libvirt 11.3 writes.
//! `data_len` bytes follow, holding the NUL-terminated domain XML, the NUL-terminated migration
//! cookie at `cookieOffset`, and zero padding; the QEMU migration stream starts right after.
//! A clone's state file is the golden header with the clone's XML, followed by the unchanged stream.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

pub const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
pub const HEADER_LEN: usize = 16 + 4 * 5 + 4 * 14;
/// The only version whose layout is described above; anything else is refused rather than guessed.
pub const SUPPORTED_VERSION: u32 = 2;
/// The XML area is padded so that an edited XML that grows a little keeps the stream offset.
const PAD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SaveImageError {
    #[error("read saved state {path}")]
    Io { path: String, #[source] source: io::Error },
    #[error("{path} is not a libvirt QEMU save image (bad magic)")]
    BadMagic { path: String },
    #[error("{path} has save image version {version}; only version {SUPPORTED_VERSION} is understood")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path} has a corrupt header: {reason}")]
    Corrupt { path: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveHeader {
    pub version: u32,
    pub was_running: u32,
    pub format: u32,
    pub xml: String,
    pub cookie: Option<Vec<u8>>,
    /// Offset of the migration stream from the start of the file.
    pub stream_offset: u64,
}

fn u32_at(buf: &[u8], index: usize) -> u32 {
    let at = 16 + index * 4;
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

pub fn read_header(path: &Path) -> Result<SaveHeader, SaveImageError> {
    let name = path.display().to_string();
    let io_err = |source| SaveImageError::Io { path: name.clone(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let mut head = [0u8; HEADER_LEN];
    file.read_exact(&mut head).map_err(io_err)?;
    parse_header(&head, &mut file, &name)
}

/// Parses a header from the first bytes of a save image (at least the header and its XML area),
/// as read from a remote host's volume.
pub fn parse_header_bytes(bytes: &[u8], name: &str) -> Result<SaveHeader, SaveImageError> {
    let head: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or_else(|| SaveImageError::Corrupt { path: name.into(), reason: format!("shorter than the {HEADER_LEN}-byte header") })?;
    parse_header(head, &mut &bytes[HEADER_LEN..], name)
}

/// Bytes of the header and XML area [`parse_header_bytes`] needs, read from a header's first
/// [`HEADER_LEN`] bytes: a remote state is read in two small downloads.
pub fn area_len(head: &[u8]) -> Option<u64> {
    (head.len() >= HEADER_LEN && &head[..16] == MAGIC).then(|| HEADER_LEN as u64 + u32_at(head, 1) as u64)
}

/// Encodes a header for `xml` that fills exactly the golden's header and XML area, so it can be
/// written over a copy of the golden state in place and the migration stream keeps its offset.
/// The area libvirt writes is padded (by at least 1 KiB), which is the room a clone's longer
/// names and paths may take.
pub fn encode_header_in_place(golden: &SaveHeader, xml: &str) -> Result<Vec<u8>, SaveImageError> {
    let area = golden.stream_offset as usize;
    let mut out = encode_header(golden, xml);
    let used = HEADER_LEN + xml.len() + 1 + golden.cookie.as_ref().map_or(0, |c| c.len() + 1);
    if used > area {
        return Err(SaveImageError::Corrupt { path: "clone state".into(), reason: format!("the clone's XML needs {used} bytes; the golden's XML area holds {area}") });
    }
    out.resize(area, 0);
    let data_len = (area - HEADER_LEN) as u32;
    out[16 + 4..16 + 8].copy_from_slice(&data_len.to_ne_bytes());
    Ok(out)
}

fn parse_header(head: &[u8; HEADER_LEN], rest: &mut impl Read, name: &str) -> Result<SaveHeader, SaveImageError> {
    if &head[..16] != MAGIC {
        return Err(SaveImageError::BadMagic { path: name.to_string() });
    }
    let version = u32_at(head, 0);
    if version != SUPPORTED_VERSION {
        return Err(SaveImageError::UnsupportedVersion { path: name.to_string(), version });
    }
    let data_len = u32_at(head, 1) as usize;
    let was_running = u32_at(head, 2);
    let format = u32_at(head, 3);
    let cookie_offset = u32_at(head, 4) as usize;
    let corrupt = |reason: String| SaveImageError::Corrupt { path: name.to_string(), reason };
    if data_len == 0 || data_len > 64 << 20 {
        return Err(corrupt(format!("implausible XML area length {data_len}")));
    }
    let mut data = vec![0u8; data_len];
    rest.read_exact(&mut data).map_err(|source| SaveImageError::Io { path: name.to_string(), source })?;
    let xml_end = data.iter().position(|b| *b == 0).ok_or_else(|| corrupt("domain XML is not NUL-terminated".into()))?;
    let xml = String::from_utf8(data[..xml_end].to_vec()).map_err(|_| corrupt("domain XML is not UTF-8".into()))?;
    let cookie = if cookie_offset == 0 {
        None
    } else {
        if cookie_offset <= xml_end || cookie_offset >= data_len {
            return Err(corrupt(format!("cookie offset {cookie_offset} outside the XML area")));
        }
        let tail = &data[cookie_offset..];
        let end = tail.iter().position(|b| *b == 0).ok_or_else(|| corrupt("cookie is not NUL-terminated".into()))?;
        Some(tail[..end].to_vec())
    };
    Ok(SaveHeader { version, was_running, format, xml, cookie, stream_offset: (HEADER_LEN + data_len) as u64 })
}

/// Encodes a header for `xml` (keeping the golden's cookie, format and running flag).
pub fn encode_header(golden: &SaveHeader, xml: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(xml.len() + PAD);
    data.extend_from_slice(xml.as_bytes());
    data.push(0);
    let cookie_offset = match &golden.cookie {
        Some(cookie) => {
            let at = data.len();
            data.extend_from_slice(cookie);
            data.push(0);
            at as u32
        }
        None => 0,
    };
    data.resize(data.len() + PAD, 0);
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(MAGIC);
    for field in [golden.version, data.len() as u32, golden.was_running, golden.format, cookie_offset] {
        out.extend_from_slice(&field.to_ne_bytes());
    }
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(&data);
    out
}

/// Writes `dest`: a header carrying `xml`, then the golden file's migration stream, unchanged.
/// The stream is copied with `io::copy`, which uses `copy_file_range` between files on Linux.
pub fn write_with_xml(golden_path: &Path, golden: &SaveHeader, xml: &str, dest: &Path) -> Result<(), SaveImageError> {
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| SaveImageError::Io { path, source }
    };
    let mut src = File::open(golden_path).map_err(io_err(golden_path))?;
    src.seek(SeekFrom::Start(golden.stream_offset)).map_err(io_err(golden_path))?;
    let mut out = File::create(dest).map_err(io_err(dest))?;
    out.write_all(&encode_header(golden, xml)).map_err(io_err(dest))?;
    io::copy(&mut src, &mut out).map_err(io_err(dest))?;
    // No fsync: the copy is read back at once by the restore and deleted after it; a crash in
    // between leaves a clone directory that `patchlab clean` removes.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(cookie: Option<&[u8]>) -> SaveHeader {
        SaveHeader {
            version: 2,
            was_running: 1,
            format: 0,
            xml: "<domain><name>golden</name></domain>".into(),
            cookie: cookie.map(|c| c.to_vec()),
            stream_offset: 0,
        }
    }

    fn roundtrip(header: &SaveHeader, xml: &str) -> SaveHeader {
        let bytes = encode_header(header, xml);
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        parse_header(&head, &mut &bytes[HEADER_LEN..], "test").unwrap()
    }

    #[test]
    fn an_in_place_header_fills_the_golden_area_exactly() {
        for cookie in [None, Some(&b"<qemu-migration/>"[..])] {
            let mut g = golden(cookie);
            g.stream_offset = 4096;
            let bytes = encode_header_in_place(&g, "<domain><name>a-longer-clone-name</name></domain>").unwrap();
            assert_eq!(bytes.len(), 4096);
            assert_eq!(area_len(&bytes), Some(4096));
            let back = parse_header_bytes(&bytes, "t").unwrap();
            assert_eq!((back.xml.as_str(), back.cookie.clone(), back.stream_offset), ("<domain><name>a-longer-clone-name</name></domain>", g.cookie.clone(), 4096));
            let too_long = "x".repeat(4096);
            assert!(encode_header_in_place(&g, &too_long).unwrap_err().to_string().contains("holds 4096"));
        }
        assert_eq!(area_len(b"short"), None);
    }

    #[test]
    fn header_is_92_bytes_as_libvirt_writes_it() {
        assert_eq!(HEADER_LEN, 92);
    }

    #[test]
    fn roundtrip_keeps_cookie_and_flags_and_replaces_xml() {
        for cookie in [None, Some(&b"<qemu-migration/>"[..])] {
            let g = golden(cookie);
            let back = roundtrip(&g, "<domain><name>clone-1</name></domain>");
            assert_eq!(back.xml, "<domain><name>clone-1</name></domain>");
            assert_eq!(back.cookie, g.cookie);
            assert_eq!((back.version, back.was_running, back.format), (2, 1, 0));
            assert_eq!(back.stream_offset as usize, encode_header(&g, &back.xml).len());
        }
    }

    #[test]
    fn refuses_foreign_files_and_versions() {
        let mut bytes = encode_header(&golden(None), "<domain/>");
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let mut other = head;
        other[..16].copy_from_slice(b"LibvirtQemudPart");
        assert!(matches!(parse_header(&other, &mut &bytes[HEADER_LEN..], "x"), Err(SaveImageError::BadMagic { .. })));
        bytes[16..20].copy_from_slice(&3u32.to_ne_bytes());
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        assert!(matches!(
            parse_header(&head, &mut &bytes[HEADER_LEN..], "x"),
            Err(SaveImageError::UnsupportedVersion { version: 3, .. })
        ));
    }

    #[test]
    fn stream_is_copied_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let golden_path = dir.path().join("golden.save");
        let g = golden(Some(b"cookie"));
        let mut bytes = encode_header(&g, &g.xml);
        let stream: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        bytes.extend_from_slice(&stream);
        std::fs::write(&golden_path, &bytes).unwrap();
        let parsed = read_header(&golden_path).unwrap();
        let clone_path = dir.path().join("clone.save");
        write_with_xml(&golden_path, &parsed, "<domain><name>a-much-longer-clone-name</name></domain>", &clone_path).unwrap();
        let clone = read_header(&clone_path).unwrap();
        assert_eq!(clone.xml, "<domain><name>a-much-longer-clone-name</name></domain>");
        let written = std::fs::read(&clone_path).unwrap();
        assert_eq!(&written[clone.stream_offset as usize..], &stream[..]);
    }
}
