//! The peer protocol: one JSON object per line each way (see docs/protocol.md).
//!
//! Decoding is two-staged on purpose: first the line is split into raw
//! fields, which only fails for bytes that are not a JSON object; then each
//! field is typed on its own. That way a request with an ill-typed field
//! still gets its `id` echoed in the error reply, and every failure lands in
//! exactly one [`FailReason`].

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// A decoded, well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Get { key: String },
    Put { key: String, value: String },
    Delete { key: String },
}

/// Why a message was answered with an error: the `reason` label of
/// `messages_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// Not UTF-8, or not JSON.
    Parse,
    /// JSON, but not a request: not an object, a missing or ill-typed field, a bad key.
    Invalid,
    UnknownOp,
    /// Longer than `network.max_message_bytes`.
    TooLarge,
    /// Well-formed, but the storage backend failed.
    Storage,
}

impl FailReason {
    pub const ALL: [FailReason; 5] = [
        FailReason::Parse,
        FailReason::Invalid,
        FailReason::UnknownOp,
        FailReason::TooLarge,
        FailReason::Storage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Parse => "parse",
            FailReason::Invalid => "invalid",
            FailReason::UnknownOp => "unknown_op",
            FailReason::TooLarge => "too_large",
            FailReason::Storage => "storage",
        }
    }
}

/// A failed message: the reason (for metrics) and the text for the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: FailReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The outcome of a request, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Value(Option<String>),
    Deleted(bool),
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
    (raw.id, typed(&raw))
}

fn typed(raw: &RawRequest<'_>) -> Result<Request, Failure> {
    let op = match raw.op {
        None => return Err(Failure::new(FailReason::Invalid, "missing field \"op\"")),
        Some(op) => serde_json::from_str::<String>(op.get())
            .map_err(|_| Failure::new(FailReason::Invalid, "field \"op\" must be a string"))?,
    };
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
            format!("unknown op {op:?}: expected ping, put, get or delete"),
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
        Failure::new(
            FailReason::Invalid,
            format!("field {name:?} must be a string"),
        )
    })
}

/// Appends the reply line (with its newline) for `outcome` to `out`.
pub fn encode(out: &mut Vec<u8>, id: Option<&RawValue>, outcome: &Outcome) {
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(id.get().as_bytes());
        out.push(b',');
    }
    match outcome {
        Outcome::Ok => out.extend_from_slice(b"\"ok\":true"),
        Outcome::Value(None) => out.extend_from_slice(b"\"ok\":true,\"value\":null"),
        Outcome::Value(Some(v)) => {
            out.extend_from_slice(b"\"ok\":true,\"value\":");
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
        encode(&mut out, id, &outcome);
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
    fn ill_typed_field_still_echoes_id() {
        assert_eq!(
            reply(br#"{"id":3,"op":"get","key":1}"#, Outcome::Ok),
            "{\"id\":3,\"ok\":false,\"error\":\"field \\\"key\\\" must be a string\"}\n"
        );
    }
}
