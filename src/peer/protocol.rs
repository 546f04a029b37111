//! The peer protocol: one JSON object per line each way (see docs/protocol.md).
//!
//! Decoding is two-staged on purpose: first the line is split into raw
//! fields, which only fails for bytes that are not a JSON object; then each
//! field is typed on its own. That way a request with an ill-typed field
//! still gets its `id` echoed in the error reply, and every failure lands in
//! exactly one [`FailReason`].

use serde::Deserialize;
use serde_json::value::RawValue;

/// The reason a failure is counted under: defined with the other label
/// values, below both the protocol and telemetry (see its module).
pub use crate::telemetry::labels::FailReason;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest `id` accepted, in bytes of JSON text as sent. The id is echoed in
/// the reply, so without a bound a peer could make every reply as large as
/// its request (a deeply nested id costs two bytes per level).
pub const MAX_ID_BYTES: usize = 256;
/// Longest unknown `op` quoted back in the error, in characters: enough to
/// recognise a typo, too little to turn an error reply into a large one.
const MAX_OP_ECHO_CHARS: usize = 64;

/// Whether a line (without its `\n`) is blank: empty, or only spaces, tabs
/// and `\r`. Blank lines are skipped without a reply; anything else,
/// including other control characters such as a form feed, is a message.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

/// A decoded, well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A liveness check; outbound peers send one every `network.ping_interval`.
    Ping,
    /// Read a key.
    Get {
        /// 1 to [`MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
    },
    /// Store a value, replacing any.
    Put {
        /// 1 to [`MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
        /// Any UTF-8 string.
        value: String,
    },
    /// Remove a key.
    Delete {
        /// 1 to [`MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
    },
}

/// A failed message: the reason (for metrics) and the text for the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Which `messages_failed_total` series counts it.
    pub reason: FailReason,
    /// The error text in the reply to the peer.
    pub message: String,
}

impl Failure {
    /// A failure for `reason`, answering the peer with `message`.
    pub fn new(reason: FailReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A request's `id` as sent, copied out of the line (it is at most
/// [`MAX_ID_BYTES`], see [`decode`]), so that the line's buffer can be
/// released while the request runs and the reply still echoes the id.
///
/// Short ids (numbers, short strings: what peers send in practice) are
/// kept inline, longer ones on the heap. Holding all 256 possible bytes
/// inline made every request's state about 270 bytes larger, and the
/// futures that carry it through the handler and the connection task are
/// moved by `memcpy`, which measured more instructions per local get
/// (callgrind; docs/performance-history.md, "The agent's own instructions
/// per message, and two fixes").
#[derive(Clone)]
pub struct EchoId(IdBytes);

/// Longest id kept inline: with its length byte and the variant tag, an
/// `EchoId` is 32 bytes.
const INLINE_ID_BYTES: usize = 30;

#[derive(Clone)]
enum IdBytes {
    Inline {
        len: u8,
        bytes: [u8; INLINE_ID_BYTES],
    },
    Heap(Box<[u8]>),
}

impl EchoId {
    /// The id's JSON text; None if it is longer than [`MAX_ID_BYTES`]
    /// (which [`decode`] never returns).
    pub fn new(raw: &RawValue) -> Option<Self> {
        let text = raw.get().as_bytes();
        if text.len() > MAX_ID_BYTES {
            return None;
        }
        let mut bytes = [0; INLINE_ID_BYTES];
        Some(Self(match bytes.get_mut(..text.len()) {
            Some(inline) => {
                inline.copy_from_slice(text);
                // At most INLINE_ID_BYTES, so it fits.
                IdBytes::Inline {
                    len: text.len() as u8,
                    bytes,
                }
            }
            None => IdBytes::Heap(text.into()),
        }))
    }

    /// The JSON text, exactly as the peer sent it.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            IdBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IdBytes::Heap(bytes) => bytes,
        }
    }
}

/// The outcome of a request, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; nothing to return (ping, put).
    Ok,
    /// A get's value; None when the key is absent.
    Value(Option<String>),
    /// A delete's result: whether the key existed.
    Deleted(bool),
    /// Answered with an error, counted by its reason.
    Failed(Failure),
}

/// Borrowed view of one request line; fields stay raw until typed.
#[derive(Deserialize)]
struct RawRequest<'a> {
    // `deserialize_with` keeps an explicit `null` as Some: a null `id` is
    // echoed, and a null `op`, `key` or `value` is ill-typed, not missing.
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
}

fn present<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes one line (without its newline). Returns the raw `id`, if the line
/// had one, so that even a failure can echo it.
pub fn decode(line: &[u8]) -> (Option<&RawValue>, Result<Request, Failure>) {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(_) => {
            return (
                None,
                Err(Failure::new(
                    FailReason::Parse,
                    "message is not valid UTF-8",
                )),
            )
        }
    };
    // A derived struct also deserializes from an array, taking the fields in
    // order; only an object is a request.
    let is_object = text.trim_start().starts_with('{');
    let raw: RawRequest<'_> = match serde_json::from_str(text) {
        Ok(r) if is_object => r,
        Err(e) if !e.is_data() => {
            return (
                None,
                Err(Failure::new(
                    FailReason::Parse,
                    format!("invalid JSON: {e}"),
                )),
            )
        }
        // An object can only fail this way by repeating a field.
        Err(e) if is_object => {
            return (
                None,
                Err(Failure::new(
                    FailReason::Invalid,
                    format!("invalid request: {e}"),
                )),
            )
        }
        _ => {
            return (
                None,
                Err(Failure::new(
                    FailReason::Invalid,
                    "message must be a JSON object",
                )),
            )
        }
    };
    if let Some(id) = raw.id.filter(|id| id.get().len() > MAX_ID_BYTES) {
        // Too long to echo: the reply says so without it.
        return (
            None,
            Err(Failure::new(
                FailReason::Invalid,
                format!(
                    "field \"id\" is {} bytes, the limit is {MAX_ID_BYTES}",
                    id.get().len()
                ),
            )),
        );
    }
    (raw.id, typed(&raw))
}

fn typed(raw: &RawRequest<'_>) -> Result<Request, Failure> {
    let op = string_field("op", raw.op)?;
    match op.as_str() {
        "ping" => Ok(Request::Ping),
        "get" => Ok(Request::Get { key: key(raw)? }),
        "put" => {
            let key = key(raw)?;
            let value = string_field("value", raw.value)?;
            Ok(Request::Put { key, value })
        }
        "delete" => Ok(Request::Delete { key: key(raw)? }),
        _ => Err(Failure::new(
            FailReason::UnknownOp,
            format!(
                "unknown op {}: expected ping, put, get or delete",
                quoted_prefix(&op, MAX_OP_ECHO_CHARS)
            ),
        )),
    }
}

fn key(raw: &RawRequest<'_>) -> Result<String, Failure> {
    let key = string_field("key", raw.key)?;
    if key.is_empty() {
        return Err(Failure::new(
            FailReason::Invalid,
            "field \"key\" must not be empty",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Failure::new(
            FailReason::Invalid,
            format!(
                "field \"key\" is {} bytes, the limit is {MAX_KEY_BYTES}",
                key.len()
            ),
        ));
    }
    Ok(key)
}

fn string_field(name: &str, raw: Option<&RawValue>) -> Result<String, Failure> {
    let raw =
        raw.ok_or_else(|| Failure::new(FailReason::Invalid, format!("missing field {name:?}")))?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
        // The line already parsed as JSON, so a string token that does not
        // decode can only hold an escape that is not Unicode.
        let message = match unpaired_surrogate(raw.get()) {
            Some(escape) if raw.get().starts_with('"') => format!(
                "field {name:?} is not valid Unicode: {escape} is an unpaired UTF-16 surrogate"
            ),
            _ => format!("field {name:?} must be a string"),
        };
        Failure::new(FailReason::Invalid, message)
    })
}

/// The first `\uXXXX` escape in a JSON string token that is a surrogate
/// without its partner (a high one not followed by a low one, or a lone low
/// one); JSON allows it, but it is not a Unicode character.
fn unpaired_surrogate(token: &str) -> Option<&str> {
    let bytes = token.as_bytes();
    let escape_at = |i: usize| -> Option<u16> {
        let hex = token.get(i + 2..i + 6)?;
        (bytes.get(i) == Some(&b'\\') && bytes.get(i + 1) == Some(&b'u'))
            .then(|| u16::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        match escape_at(i) {
            Some(0xD800..=0xDBFF) if matches!(escape_at(i + 6), Some(0xDC00..=0xDFFF)) => i += 12,
            Some(0xD800..=0xDFFF) => return token.get(i..i + 6),
            Some(_) => i += 6,
            // A two-character escape such as \" or \\.
            None => i += 2,
        }
    }
    None
}

/// `s` as a quoted JSON-style string, cut to `max` characters (with `...`
/// after the closing quote when cut).
fn quoted_prefix(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{:?}...", &s[..end]),
        None => format!("{s:?}"),
    }
}

/// Appends a ping request with a numeric `id` (and its newline) to `out`:
/// what the agent sends its outbound peers, in the same codec the peers'
/// requests are read with.
pub fn encode_ping(out: &mut Vec<u8>, id: u64) {
    use std::io::Write as _;
    let _ = writeln!(out, "{{\"id\":{id},\"op\":\"ping\"}}");
}

/// Whether `line` is the successful reply to the ping with `id`: a JSON
/// object whose `id` is that number and whose `ok` is true (field order and
/// spacing are the sender's business).
pub fn is_ping_reply(line: &[u8], id: u64) -> bool {
    #[derive(serde::Deserialize)]
    struct Reply {
        id: Option<u64>,
        ok: bool,
    }
    serde_json::from_slice::<Reply>(line).is_ok_and(|r| r.ok && r.id == Some(id))
}

/// Appends the reply line (with its newline) for `outcome` to `out`; `id`
/// is the request's id as sent (JSON text), echoed verbatim.
pub fn encode(out: &mut Vec<u8>, id: Option<&[u8]>, outcome: &Outcome) {
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(id);
        out.push(b',');
    }
    match outcome {
        Outcome::Ok => out.extend_from_slice(b"\"ok\":true"),
        Outcome::Value(None) => out.extend_from_slice(b"\"ok\":true,\"value\":null"),
        Outcome::Value(Some(v)) => {
            out.extend_from_slice(b"\"ok\":true,\"value\":");
            // Room for the value as it usually encodes (quotes, few
            // escapes), so a large one is not copied through doublings.
            out.reserve(v.len() + 4);
            write_json_str(out, v);
        }
        Outcome::Deleted(d) => {
            out.extend_from_slice(if *d {
                b"\"ok\":true,\"deleted\":true"
            } else {
                b"\"ok\":true,\"deleted\":false"
            });
        }
        Outcome::Failed(f) => {
            out.extend_from_slice(b"\"ok\":false,\"error\":");
            write_json_str(out, &f.message);
        }
    }
    out.extend_from_slice(b"}\n");
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(line: &[u8], outcome_for_ok: Outcome) -> String {
        let (id, req) = decode(line);
        let outcome = match req {
            Ok(_) => outcome_for_ok,
            Err(f) => Outcome::Failed(f),
        };
        let mut out = Vec::new();
        let id = id.map(|id| EchoId::new(id).expect("decode bounds the id"));
        encode(&mut out, id.as_ref().map(EchoId::as_bytes), &outcome);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn decodes_every_op() {
        assert_eq!(decode(br#"{"op":"ping"}"#).1, Ok(Request::Ping));
        assert_eq!(
            decode(br#"{"op":"put","key":"k","value":"v\n\u00e9"}"#).1,
            Ok(Request::Put {
                key: "k".into(),
                value: "v\n\u{e9}".into()
            })
        );
        assert_eq!(
            decode(br#"{"op":"get","key":"k"}"#).1,
            Ok(Request::Get { key: "k".into() })
        );
        assert_eq!(
            decode(br#"{"op":"delete","key":"k"}"#).1,
            Ok(Request::Delete { key: "k".into() })
        );
    }

    #[test]
    fn echoes_id_exactly_and_omits_absent_id() {
        assert_eq!(
            reply(br#"{"id":1,"op":"ping"}"#, Outcome::Ok),
            "{\"id\":1,\"ok\":true}\n"
        );
        assert_eq!(
            reply(br#"{"id":{"a":[1, 2]},"op":"ping"}"#, Outcome::Ok),
            "{\"id\":{\"a\":[1, 2]},\"ok\":true}\n"
        );
        assert_eq!(
            reply(br#"{"id":null,"op":"ping"}"#, Outcome::Ok),
            "{\"id\":null,\"ok\":true}\n"
        );
        assert_eq!(reply(br#"{"op":"ping"}"#, Outcome::Ok), "{\"ok\":true}\n");
        assert_eq!(
            reply(br#"{"id":"x","op":"get","key":"k"}"#, Outcome::Value(None)),
            "{\"id\":\"x\",\"ok\":true,\"value\":null}\n"
        );
        assert_eq!(
            reply(
                br#"{"id":7,"op":"delete","key":"k"}"#,
                Outcome::Deleted(false)
            ),
            "{\"id\":7,\"ok\":true,\"deleted\":false}\n"
        );
    }

    #[test]
    fn classifies_every_failure() {
        let long_key = format!(
            r#"{{"op":"get","key":"{}"}}"#,
            "k".repeat(MAX_KEY_BYTES + 1)
        );
        let exact_key = format!(r#"{{"op":"get","key":"{}"}}"#, "k".repeat(MAX_KEY_BYTES));
        assert!(decode(exact_key.as_bytes()).1.is_ok());
        let cases: Vec<(&[u8], FailReason)> = vec![
            (b"not json", FailReason::Parse),
            (b"{\"op\":", FailReason::Parse),
            (b"\xff\xfe{}", FailReason::Parse),
            (b"[1,2]", FailReason::Invalid),
            (br#"[1,"ping"]"#, FailReason::Invalid),
            (b"42", FailReason::Invalid),
            (b"{}", FailReason::Invalid),
            (br#"{"op":5}"#, FailReason::Invalid),
            (br#"{"op":"get"}"#, FailReason::Invalid),
            (br#"{"op":"get","key":""}"#, FailReason::Invalid),
            (br#"{"op":"get","key":7}"#, FailReason::Invalid),
            (br#"{"op":"put","key":"k"}"#, FailReason::Invalid),
            (br#"{"op":"put","key":"k","value":1}"#, FailReason::Invalid),
            (br#"{"op":"get","op":"get","key":"k"}"#, FailReason::Invalid),
            (long_key.as_bytes(), FailReason::Invalid),
            (br#"{"op":"frobnicate"}"#, FailReason::UnknownOp),
        ];
        for (line, reason) in cases {
            let got = decode(line).1.expect_err(&String::from_utf8_lossy(line));
            assert_eq!(got.reason, reason, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn blank_means_spaces_tabs_and_cr_only() {
        for blank in [&b""[..], b" ", b"\t", b"\r", b" \t\r \r"] {
            assert!(is_blank(blank), "{blank:?}");
        }
        for not_blank in [&b"\x0c"[..], b"\x0b", b" \x0c ", b"\0", b"x"] {
            assert!(!is_blank(not_blank), "{not_blank:?}");
        }
    }

    #[test]
    fn ids_inline_and_on_the_heap_echo_alike() {
        // Both sides of the inline limit, and the largest id allowed.
        for len in [
            INLINE_ID_BYTES - 2,
            INLINE_ID_BYTES - 1,
            INLINE_ID_BYTES,
            MAX_ID_BYTES - 2,
        ] {
            let id = format!(r#""{}""#, "é".repeat(len / 2) + &"i".repeat(len % 2));
            let line = format!(r#"{{"id":{id},"op":"ping"}}"#);
            assert_eq!(
                reply(line.as_bytes(), Outcome::Ok),
                format!("{{\"id\":{id},\"ok\":true}}\n"),
                "{} bytes",
                id.len()
            );
        }
        // What keeps the request's state, and the futures carrying it, small.
        assert!(std::mem::size_of::<EchoId>() <= 32);
    }

    #[test]
    fn id_longer_than_the_limit_is_rejected_without_echo() {
        let exact = format!(r#""{}""#, "i".repeat(MAX_ID_BYTES - 2));
        let line = format!(r#"{{"id":{exact},"op":"ping"}}"#);
        assert_eq!(
            reply(line.as_bytes(), Outcome::Ok),
            format!("{{\"id\":{exact},\"ok\":true}}\n")
        );
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let line = format!(r#"{{"id":{nested},"op":"ping"}}"#);
        assert_eq!(
            reply(line.as_bytes(), Outcome::Ok),
            "{\"ok\":false,\"error\":\"field \\\"id\\\" is 20000 bytes, the limit is 256\"}\n"
        );
        assert_eq!(
            decode(line.as_bytes()).1.unwrap_err().reason,
            FailReason::Invalid
        );
    }

    #[test]
    fn unpaired_surrogates_are_named() {
        let cases = [
            (r#"{"op":"get","key":"\ud800"}"#, Some(r"\ud800")),
            (r#"{"op":"get","key":"a\uDC00b"}"#, Some(r"\uDC00")),
            (
                r#"{"op":"get","key":"\ud83d\ude00\ud83d"}"#,
                Some(r"\ud83d"),
            ),
            (r#"{"op":"get","key":"\\ud800"}"#, None),
            (r#"{"op":"get","key":"\ud83d\ude00"}"#, None),
        ];
        for (line, escape) in cases {
            let got = decode(line.as_bytes()).1;
            match escape {
                Some(e) => assert_eq!(
                    got.unwrap_err(),
                    Failure::new(
                        FailReason::Invalid,
                        format!(
                            "field \"key\" is not valid Unicode: {e} is an unpaired UTF-16 surrogate"
                        )
                    ),
                    "{line}"
                ),
                None => assert!(got.is_ok(), "{line}: {got:?}"),
            }
        }
        let (_, got) = decode(br#"{"op":"put","key":"k","value":"\udfff"}"#);
        assert!(got
            .unwrap_err()
            .message
            .starts_with("field \"value\" is not valid Unicode"));
    }

    #[test]
    fn a_long_unknown_op_is_quoted_cut_short() {
        let op = "x".repeat(10_000);
        let line = format!(r#"{{"op":"{op}"}}"#);
        let got = decode(line.as_bytes()).1.unwrap_err();
        assert_eq!(got.reason, FailReason::UnknownOp);
        assert_eq!(
            got.message,
            format!(
                "unknown op \"{}\"...: expected ping, put, get or delete",
                "x".repeat(MAX_OP_ECHO_CHARS)
            )
        );
    }

    #[test]
    fn ill_typed_field_still_echoes_id() {
        assert_eq!(
            reply(br#"{"id":3,"op":"get","key":1}"#, Outcome::Ok),
            "{\"id\":3,\"ok\":false,\"error\":\"field \\\"key\\\" must be a string\"}\n"
        );
    }

    #[test]
    fn ping_round_trips_through_the_codec() {
        let mut out = Vec::new();
        encode_ping(&mut out, 7);
        assert_eq!(out, b"{\"id\":7,\"op\":\"ping\"}\n");
        let (id, request) = decode(&out[..out.len() - 1]);
        assert!(matches!(request, Ok(Request::Ping)));
        let mut reply = Vec::new();
        encode(&mut reply, id.map(|r| r.get().as_bytes()), &Outcome::Ok);
        assert!(is_ping_reply(&reply[..reply.len() - 1], 7));
        assert!(is_ping_reply(br#"{ "ok" : true, "id" : 7 }"#, 7));
        assert!(!is_ping_reply(br#"{"id":8,"ok":true}"#, 7));
        assert!(!is_ping_reply(br#"{"id":7,"ok":false,"error":"x"}"#, 7));
        assert!(!is_ping_reply(b"\x1b[31mjunk", 7));
    }
}
