//! Bytes from the network on their way to a log: a peer's lines, a
//! remote-write receiver's answers.
//!
//! The other end controls what it sends: written verbatim, its bytes could
//! forge log lines, smuggle terminal escape sequences to whoever reads the
//! log, or fill the disk (a peer answering with a 1 MiB line once produced
//! 100 MB of log in 10 s). So only a short, escaped preview is ever logged;
//! repeated warnings go through `telemetry::Throttle`.

use std::fmt::Write as _;

/// Most bytes of remote input shown in a log line.
pub(crate) const PREVIEW_BYTES: usize = 200;

/// At most the first [`PREVIEW_BYTES`] of `bytes`, with everything but
/// printable ASCII escaped (`\x1b`, `\n`, `\xff`, ...), and the total length
/// when cut: safe to log whatever the other end sent.
pub(crate) fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(PREVIEW_BYTES)];
    let mut text = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        let _ = write!(text, "... ({} bytes)", bytes.len());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_escapes_and_truncates() {
        assert_eq!(preview(b"{\"ok\":true}"), r#"{\"ok\":true}"#);
        assert_eq!(
            preview(b"\x1b[31mred\x1b[0m\r\n\xff\xfe\0"),
            r"\x1b[31mred\x1b[0m\r\n\xff\xfe\x00"
        );
        let junk = vec![0x1bu8; 1 << 20];
        let shown = preview(&junk);
        assert!(shown.starts_with(r"\x1b\x1b"));
        assert!(shown.ends_with("... (1048576 bytes)"), "{shown}");
        assert_eq!(shown.len(), PREVIEW_BYTES * 4 + "... (1048576 bytes)".len());
        assert!(shown.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    }
}
