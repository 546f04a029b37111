//! The peer protocol over real TCP against the real agent binary: every op,
//! every error case, id echo, framing, the line-length limit, pipelining and
//! the connection limit (docs/protocol.md).

mod common;

use std::io::Write;
use std::time::Duration;

use agent::telemetry::defs::{
    AGENT_CONNECTIONS_REJECTED_TOTAL, AGENT_PEERS_CONNECTED, MESSAGES_FAILED_TOTAL,
    MESSAGES_RECEIVED_TOTAL,
};
use common::*;

/// Sends each raw line (newline added) and asserts the exact reply, then a
/// ping, which proves the connection is still open after an error.
fn assert_replies(peer: &mut Peer, cases: &[(&str, &str)]) {
    for (i, (request, want)) in cases.iter().enumerate() {
        assert_eq!(peer.request(request), *want, "request {request}");
        let ping = format!(r#"{{"id":"after-{i}","op":"ping"}}"#);
        assert_eq!(
            peer.request(&ping),
            format!(r#"{{"id":"after-{i}","ok":true}}"#),
            "after {request}"
        );
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn every_op_replies_exactly() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    assert_replies(
        &mut peer,
        &[
            (r#"{"id":1,"op":"ping"}"#, r#"{"id":1,"ok":true}"#),
            (
                r#"{"id":1,"op":"get","key":"k"}"#,
                r#"{"id":1,"ok":true,"value":null}"#,
            ),
            (
                r#"{"id":1,"op":"delete","key":"k"}"#,
                r#"{"id":1,"ok":true,"deleted":false}"#,
            ),
            (
                r#"{"id":1,"op":"put","key":"k","value":"v"}"#,
                r#"{"id":1,"ok":true}"#,
            ),
            (
                r#"{"id":1,"op":"get","key":"k"}"#,
                r#"{"id":1,"ok":true,"value":"v"}"#,
            ),
            (
                r#"{"id":2,"op":"put","key":"k","value":"v2"}"#,
                r#"{"id":2,"ok":true}"#,
            ),
            (
                r#"{"id":3,"op":"get","key":"k"}"#,
                r#"{"id":3,"ok":true,"value":"v2"}"#,
            ),
            (
                r#"{"id":1,"op":"delete","key":"k"}"#,
                r#"{"id":1,"ok":true,"deleted":true}"#,
            ),
            (
                r#"{"id":1,"op":"delete","key":"k"}"#,
                r#"{"id":1,"ok":true,"deleted":false}"#,
            ),
            (
                r#"{"id":1,"op":"get","key":"k"}"#,
                r#"{"id":1,"ok":true,"value":null}"#,
            ),
            // An empty value is a value, not an absence.
            (
                r#"{"id":1,"op":"put","key":"empty","value":""}"#,
                r#"{"id":1,"ok":true}"#,
            ),
            (
                r#"{"id":1,"op":"get","key":"empty"}"#,
                r#"{"id":1,"ok":true,"value":""}"#,
            ),
            // Without an id, the reply has none.
            (r#"{"op":"ping"}"#, r#"{"ok":true}"#),
            (r#"{"op":"put","key":"n","value":"x"}"#, r#"{"ok":true}"#),
            (r#"{"op":"get","key":"n"}"#, r#"{"ok":true,"value":"x"}"#),
            (
                r#"{"op":"get","key":"absent"}"#,
                r#"{"ok":true,"value":null}"#,
            ),
            (
                r#"{"op":"delete","key":"n"}"#,
                r#"{"ok":true,"deleted":true}"#,
            ),
            (
                r#"{"op":"delete","key":"n"}"#,
                r#"{"ok":true,"deleted":false}"#,
            ),
            // Unknown fields are ignored, whatever their type; field order is free.
            (
                r#"{"extra":{"x":[1,2]},"value":"w","key":"k2","op":"put","id":9,"ts":1.5}"#,
                r#"{"id":9,"ok":true}"#,
            ),
            (
                r#"{"key":"k2","op":"get","id":10}"#,
                r#"{"id":10,"ok":true,"value":"w"}"#,
            ),
            // A ping ignores key and value.
            (
                r#"{"id":11,"op":"ping","key":5,"value":null}"#,
                r#"{"id":11,"ok":true}"#,
            ),
            // Whitespace around and inside the object is fine.
            (
                "  { \"id\" : 12 , \"op\" : \"ping\" }  ",
                r#"{"id":12,"ok":true}"#,
            ),
        ],
    );
}

#[test]
fn values_and_keys_round_trip_exactly() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    let values = [
        "plain",
        "line1\nline2\r\n\ttab",
        r#"quotes " and \ backslash"#,
        "unicode é 中文 😀",
        "control \u{1} \u{1f} nul \u{0}",
        "{\"op\":\"ping\"}\n",
    ];
    for (i, value) in values.iter().enumerate() {
        let key = format!("kéy {i} 😀/\"x\"");
        let put = serde_json::json!({"id": i, "op": "put", "key": key, "value": value}).to_string();
        assert_eq!(peer.request(&put), format!(r#"{{"id":{i},"ok":true}}"#));
        let get = serde_json::json!({"id": i, "op": "get", "key": key}).to_string();
        let want = format!(r#"{{"id":{i},"ok":true,"value":{}}}"#, json_str(value));
        assert_eq!(peer.request(&get), want);
    }
    // JSON escapes in the request are decoded: \u00e9 and é are the same key.
    assert_eq!(
        peer.request(r#"{"op":"put","key":"caf\u00e9","value":"\u0041\n"}"#),
        r#"{"ok":true}"#
    );
    assert_eq!(
        peer.request(r#"{"op":"get","key":"café"}"#),
        r#"{"ok":true,"value":"A\n"}"#
    );
    // A large value (100 KB) within the default line limit.
    let big = "x".repeat(100_000);
    assert_eq!(peer.put("big", &big), serde_json::json!({"ok": true}));
    assert_eq!(
        peer.request(r#"{"op":"get","key":"big"}"#),
        format!(r#"{{"ok":true,"value":"{big}"}}"#)
    );
}

#[test]
fn id_is_echoed_exactly_and_omitted_when_absent() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    let ids = [
        "0",
        "1",
        "-7",
        "18446744073709551616",
        "1.50",
        "2e3",
        r#""abc""#,
        r#""""#,
        r#""quote \" and \u00e9""#,
        r#"{"a":[1, 2],"b":{"c":null}}"#,
        "[1,\"x\",true]",
        "true",
        "false",
        // An explicit null is echoed; only an absent id is omitted.
        "null",
    ];
    for id in ids {
        // Echoed byte for byte (no re-encoding), on success...
        assert_eq!(
            peer.request(&format!(r#"{{"id":{id},"op":"ping"}}"#)),
            format!(r#"{{"id":{id},"ok":true}}"#)
        );
        assert_eq!(
            peer.request(&format!(r#"{{"op":"get","key":"k","id":{id}}}"#)),
            format!(r#"{{"id":{id},"ok":true,"value":null}}"#)
        );
        // ...and on error.
        assert_eq!(
            peer.request(&format!(r#"{{"id":{id},"op":"get"}}"#)),
            format!(r#"{{"id":{id},"ok":false,"error":"missing field \"key\""}}"#)
        );
    }
    assert_eq!(peer.request(r#"{"op":"ping"}"#), r#"{"ok":true}"#);
    assert_eq!(
        peer.request(r#"{"op":"get"}"#),
        r#"{"ok":false,"error":"missing field \"key\""}"#
    );
}

#[test]
fn every_error_case_replies_and_keeps_the_connection_open() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    let key_1024 = "k".repeat(1024);
    let key_1025 = "k".repeat(1025);
    // 513 two-byte characters: 513 characters, but 1026 bytes.
    let key_wide = "é".repeat(513);
    let put_1024 = format!(r#"{{"id":1,"op":"put","key":"{key_1024}","value":"v"}}"#);
    let get_1024 = format!(r#"{{"id":1,"op":"get","key":"{key_1024}"}}"#);
    let get_1025 = format!(r#"{{"id":1,"op":"get","key":"{key_1025}"}}"#);
    let put_1025 = format!(r#"{{"id":1,"op":"put","key":"{key_1025}","value":"v"}}"#);
    let del_wide = format!(r#"{{"id":1,"op":"delete","key":"{key_wide}"}}"#);
    let cases: Vec<(&str, &str)> = vec![
        // Not JSON: no id can be known, so none is echoed.
        (
            "not json",
            r#"{"ok":false,"error":"invalid JSON: expected ident at line 1 column 2"}"#,
        ),
        (
            r#"{"id":1,"op":"#,
            r#"{"ok":false,"error":"invalid JSON: EOF while parsing a value at line 1 column 13"}"#,
        ),
        (
            r#"{"id":1,"op":"ping"} trailing"#,
            r#"{"ok":false,"error":"invalid JSON: trailing characters at line 1 column 22"}"#,
        ),
        // JSON, but not an object.
        // (An array must not be read as the fields in order: this one would be a ping.)
        (
            r#"[1,"ping"]"#,
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        (
            "[1,2]",
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        (
            "[]",
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        (
            "42",
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        (
            r#""ping""#,
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        (
            "null",
            r#"{"ok":false,"error":"message must be a JSON object"}"#,
        ),
        // A field given twice.
        (
            r#"{"id":1,"op":"get","op":"get","key":"k"}"#,
            r#"{"ok":false,"error":"invalid request: duplicate field `op` at line 1 column 23"}"#,
        ),
        // Unknown op.
        (
            r#"{"id":1,"op":"frobnicate"}"#,
            r#"{"id":1,"ok":false,"error":"unknown op \"frobnicate\": expected ping, put, get or delete"}"#,
        ),
        (
            r#"{"id":1,"op":"PING"}"#,
            r#"{"id":1,"ok":false,"error":"unknown op \"PING\": expected ping, put, get or delete"}"#,
        ),
        (
            r#"{"id":1,"op":""}"#,
            r#"{"id":1,"ok":false,"error":"unknown op \"\": expected ping, put, get or delete"}"#,
        ),
        // Missing or ill-typed fields.
        ("{}", r#"{"ok":false,"error":"missing field \"op\""}"#),
        (
            r#"{"id":1}"#,
            r#"{"id":1,"ok":false,"error":"missing field \"op\""}"#,
        ),
        (
            r#"{"id":1,"op":5}"#,
            r#"{"id":1,"ok":false,"error":"field \"op\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":null}"#,
            r#"{"id":1,"ok":false,"error":"field \"op\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"get"}"#,
            r#"{"id":1,"ok":false,"error":"missing field \"key\""}"#,
        ),
        (
            r#"{"id":1,"op":"delete"}"#,
            r#"{"id":1,"ok":false,"error":"missing field \"key\""}"#,
        ),
        (
            r#"{"id":1,"op":"put","value":"v"}"#,
            r#"{"id":1,"ok":false,"error":"missing field \"key\""}"#,
        ),
        (
            r#"{"id":1,"op":"put","key":"k"}"#,
            r#"{"id":1,"ok":false,"error":"missing field \"value\""}"#,
        ),
        (
            r#"{"id":1,"op":"get","key":7}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"get","key":null}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"delete","key":["k"]}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"put","key":"k","value":1}"#,
            r#"{"id":1,"ok":false,"error":"field \"value\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"put","key":"k","value":null}"#,
            r#"{"id":1,"ok":false,"error":"field \"value\" must be a string"}"#,
        ),
        (
            r#"{"id":1,"op":"put","key":"k","value":{"a":1}}"#,
            r#"{"id":1,"ok":false,"error":"field \"value\" must be a string"}"#,
        ),
        // Empty key, for every op that takes one.
        (
            r#"{"id":1,"op":"get","key":""}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must not be empty"}"#,
        ),
        (
            r#"{"id":1,"op":"put","key":"","value":"v"}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must not be empty"}"#,
        ),
        (
            r#"{"id":1,"op":"delete","key":""}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" must not be empty"}"#,
        ),
        // Key length: 1024 bytes is fine, 1025 is not; bytes, not characters.
        (&put_1024, r#"{"id":1,"ok":true}"#),
        (&get_1024, r#"{"id":1,"ok":true,"value":"v"}"#),
        (
            &get_1025,
            r#"{"id":1,"ok":false,"error":"field \"key\" is 1025 bytes, the limit is 1024"}"#,
        ),
        (
            &put_1025,
            r#"{"id":1,"ok":false,"error":"field \"key\" is 1025 bytes, the limit is 1024"}"#,
        ),
        (
            &del_wide,
            r#"{"id":1,"ok":false,"error":"field \"key\" is 1026 bytes, the limit is 1024"}"#,
        ),
    ];
    assert_replies(&mut peer, &cases);

    // Invalid UTF-8, as raw bytes: inside and outside a JSON string.
    for bad in [
        &b"\xff\xfe"[..],
        &b"{\"id\":1,\"op\":\"get\",\"key\":\"\xc3\x28\"}"[..],
    ] {
        peer.send_raw(bad);
        peer.send_raw(b"\n");
        assert_eq!(
            peer.read_line().unwrap(),
            r#"{"ok":false,"error":"message is not valid UTF-8"}"#
        );
        assert_eq!(
            peer.request(r#"{"id":2,"op":"ping"}"#),
            r#"{"id":2,"ok":true}"#
        );
    }

    // Every failure was counted under its reason, exactly.
    let text = agent.scrape();
    let failed = |reason: &str| sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", reason)]);
    assert_eq!(failed("parse"), Some(5.0), "{text}");
    assert_eq!(failed("invalid"), Some(27.0), "{text}");
    assert_eq!(failed("unknown_op"), Some(3.0), "{text}");
    assert_eq!(failed("too_large"), Some(0.0), "{text}");
    assert_eq!(failed("storage"), Some(0.0), "{text}");
    // Each case, each ping after it, and the two UTF-8 cases with their pings.
    let received = (cases.len() * 2 + 4) as f64;
    assert_eq!(
        sample(&text, MESSAGES_RECEIVED_TOTAL, &[]),
        Some(received),
        "{text}"
    );
}

#[test]
fn framing_crlf_blank_lines_and_split_writes() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    // "\r\n" endings; blank and whitespace-only lines get no reply at all.
    peer.send_raw(b"\n\r\n   \n\t\r\n{\"id\":1,\"op\":\"ping\"}\r\n\n{\"id\":2,\"op\":\"put\",\"key\":\"k\",\"value\":\"v\\r\"}\r\n");
    assert_eq!(peer.read_line().unwrap(), r#"{"id":1,"ok":true}"#);
    assert_eq!(peer.read_line().unwrap(), r#"{"id":2,"ok":true}"#);
    // Only the one "\r" before "\n" is framing; an escaped \r in a value is data.
    assert_eq!(
        peer.request(r#"{"id":3,"op":"get","key":"k"}"#),
        r#"{"id":3,"ok":true,"value":"v\r"}"#
    );

    // A request split across many writes, byte by byte, with pauses.
    let line = br#"{"id":4,"op":"get","key":"k"}"#;
    for b in line.iter() {
        peer.send_raw(&[*b]);
        peer.writer.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    peer.send_raw(b"\n");
    assert_eq!(
        peer.read_line().unwrap(),
        r#"{"id":4,"ok":true,"value":"v\r"}"#
    );

    // Several requests in one write, the last one completed by a later write.
    peer.send_raw(b"{\"id\":5,\"op\":\"ping\"}\n{\"id\":6,\"op\":\"ping\"}\n{\"id\":7,");
    assert_eq!(peer.read_line().unwrap(), r#"{"id":5,"ok":true}"#);
    assert_eq!(peer.read_line().unwrap(), r#"{"id":6,"ok":true}"#);
    peer.send_raw(b"\"op\":\"ping\"}\n");
    assert_eq!(peer.read_line().unwrap(), r#"{"id":7,"ok":true}"#);

    // An unterminated line when the peer closes its side gets no reply.
    let mut closing = agent.connect();
    closing.send_raw(br#"{"id":8,"op":"ping"}"#);
    closing.writer.shutdown(std::net::Shutdown::Write).unwrap();
    closing.expect_closed();

    // Blank lines are not messages: 7 requests were received, none failed.
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_RECEIVED_TOTAL, &[]),
        Some(7.0),
        "{text}"
    );
}

/// Issue #15, item 8: a form feed is not blank, an unpaired surrogate is
/// named as such, and an id is echoed only up to 256 bytes.
#[test]
fn form_feeds_unpaired_surrogates_and_oversized_ids_get_clear_errors() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    let id_256 = format!(r#""{}""#, "i".repeat(254));
    let id_257 = format!(r#""{}""#, "i".repeat(255));
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let ping_256 = format!(r#"{{"id":{id_256},"op":"ping"}}"#);
    let ping_256_reply = format!(r#"{{"id":{id_256},"ok":true}}"#);
    let ping_257 = format!(r#"{{"id":{id_257},"op":"ping"}}"#);
    let ping_nested = format!(r#"{{"id":{nested},"op":"ping"}}"#);
    let not_json = r#"{"ok":false,"error":"invalid JSON: expected value at line 1 column 1"}"#;
    let cases: Vec<(&str, &str)> = vec![
        // Only spaces, tabs and \r make a line blank: other control
        // characters are a message, which is not JSON.
        ("\x0c", not_json),
        ("\x0b", not_json),
        (
            " \x0c\t",
            r#"{"ok":false,"error":"invalid JSON: expected value at line 1 column 2"}"#,
        ),
        (
            r#"{"id":1,"op":"get","key":"\ud800"}"#,
            r#"{"id":1,"ok":false,"error":"field \"key\" is not valid Unicode: \\ud800 is an unpaired UTF-16 surrogate"}"#,
        ),
        (
            r#"{"id":2,"op":"put","key":"k","value":"a\udc00"}"#,
            r#"{"id":2,"ok":false,"error":"field \"value\" is not valid Unicode: \\udc00 is an unpaired UTF-16 surrogate"}"#,
        ),
        // A pair is a character.
        (
            r#"{"id":3,"op":"put","key":"\ud83d\ude00","value":"v"}"#,
            r#"{"id":3,"ok":true}"#,
        ),
        (
            r#"{"id":4,"op":"get","key":"\ud83d\ude00"}"#,
            r#"{"id":4,"ok":true,"value":"v"}"#,
        ),
        (&ping_256, &ping_256_reply),
        (
            &ping_257,
            r#"{"ok":false,"error":"field \"id\" is 257 bytes, the limit is 256"}"#,
        ),
        (
            &ping_nested,
            r#"{"ok":false,"error":"field \"id\" is 20000 bytes, the limit is 256"}"#,
        ),
    ];
    assert_replies(&mut peer, &cases);

    let text = agent.scrape();
    let failed = |reason: &str| sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", reason)]);
    assert_eq!(failed("parse"), Some(3.0), "{text}");
    assert_eq!(failed("invalid"), Some(4.0), "{text}");
    assert_eq!(
        sample(&text, MESSAGES_RECEIVED_TOTAL, &[]),
        Some((cases.len() * 2) as f64),
        "{text}"
    );
}

#[test]
fn replies_are_counted_in_metrics() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    assert_eq!(
        peer.request(r#"{"id":1,"op":"put","key":"a","value":"x"}"#),
        r#"{"id":1,"ok":true}"#
    );
    assert_eq!(peer.get("a"), serde_json::json!({"ok": true, "value": "x"}));
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_RECEIVED_TOTAL, &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, AGENT_PEERS_CONNECTED, &[]),
        Some(1.0),
        "{text}"
    );
}

const TOO_LARGE: &str = r#"{"ok":false,"error":"message exceeds network.max_message_bytes (1024 bytes); closing connection"}"#;

/// A ping line of exactly `len` bytes (without the newline).
fn ping_of_len(id: u32, len: usize) -> String {
    let head = format!(r#"{{"id":{id},"op":"ping","pad":""#);
    let pad = len - head.len() - 2;
    let line = format!("{head}{}\"}}", "x".repeat(pad));
    assert_eq!(line.len(), len);
    line
}

#[test]
fn line_over_max_message_bytes_gets_an_error_then_the_connection_closes() {
    let agent =
        Agent::start_with(AgentOptions::default().env("AGENT_NETWORK__MAX_MESSAGE_BYTES", 1024));
    let mut bystander = agent.connect();
    assert_eq!(
        bystander.request(r#"{"id":"b1","op":"ping"}"#),
        r#"{"id":"b1","ok":true}"#
    );

    // Exactly at the limit is fine.
    let mut peer = agent.connect();
    assert_eq!(peer.request(&ping_of_len(1, 1024)), r#"{"id":1,"ok":true}"#);

    // One byte over, with requests before it in the same write: those are
    // answered in order, then the error, then EOF.
    let mut batch = String::from("{\"id\":2,\"op\":\"ping\"}\n");
    batch.push_str(&ping_of_len(3, 1025));
    batch.push_str("\n{\"id\":4,\"op\":\"ping\"}\n");
    peer.send_raw(batch.as_bytes());
    assert_eq!(peer.read_line().unwrap(), r#"{"id":2,"ok":true}"#);
    assert_eq!(peer.read_line().unwrap(), TOO_LARGE);
    let closed_after = peer.expect_closed();
    assert!(
        closed_after < Duration::from_secs(5),
        "closed after {closed_after:?}"
    );

    // A line that never ends: the error comes once the limit is passed,
    // without waiting for a newline.
    let mut peer = agent.connect();
    peer.send_raw(&[b'x'; 4096]);
    assert_eq!(peer.read_line().unwrap(), TOO_LARGE);
    peer.expect_closed();

    // A "\r" before the "\n" counts toward the limit.
    let mut peer = agent.connect();
    peer.send_raw(format!("{}\r\n", ping_of_len(5, 1024)).as_bytes());
    assert_eq!(peer.read_line().unwrap(), TOO_LARGE);
    peer.expect_closed();

    // The peer connected all along was not affected.
    assert_eq!(
        bystander.request(r#"{"id":"b2","op":"ping"}"#),
        r#"{"id":"b2","ok":true}"#
    );
    assert_eq!(bystander.put("k", "v"), serde_json::json!({"ok": true}));
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "too_large")]),
        Some(3.0),
        "{text}"
    );
}

#[test]
fn thousand_pipelined_requests_are_answered_in_order() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    let mut requests = String::new();
    let mut expected = Vec::new();
    for i in 0..1000u32 {
        let j = i / 10;
        let (request, reply) = match i % 10 {
            0 => (
                format!(r#"{{"id":{i},"op":"put","key":"k{j}","value":"v{j}"}}"#),
                format!(r#"{{"id":{i},"ok":true}}"#),
            ),
            1 | 5 | 8 => (
                format!(r#"{{"id":{i},"op":"get","key":"k{j}"}}"#),
                format!(r#"{{"id":{i},"ok":true,"value":"v{j}"}}"#),
            ),
            2 => (
                format!(r#"{{"id":"s{i}","op":"ping"}}"#),
                format!(r#"{{"id":"s{i}","ok":true}}"#),
            ),
            3 => (
                format!(r#"{{"id":{i},"op":"get","key":"absent{j}"}}"#),
                format!(r#"{{"id":{i},"ok":true,"value":null}}"#),
            ),
            4 => (
                format!(r#"{{"id":{{"n":{i}}},"op":"ping"}}"#),
                format!(r#"{{"id":{{"n":{i}}},"ok":true}}"#),
            ),
            6 => (
                format!(r#"{{"id":{i},"op":"nope"}}"#),
                format!(
                    r#"{{"id":{i},"ok":false,"error":"unknown op \"nope\": expected ping, put, get or delete"}}"#
                ),
            ),
            7 => (
                format!(r#"{{"id":{i},"op":"ping"}}"#),
                format!(r#"{{"id":{i},"ok":true}}"#),
            ),
            _ => (
                format!(r#"{{"id":{i},"op":"delete","key":"k{j}"}}"#),
                format!(r#"{{"id":{i},"ok":true,"deleted":true}}"#),
            ),
        };
        requests.push_str(&request);
        requests.push('\n');
        expected.push(reply);
    }
    // Everything is written before anything is read.
    peer.send_raw(requests.as_bytes());
    peer.writer.flush().unwrap();
    for (i, want) in expected.iter().enumerate() {
        let mut got = String::new();
        match std::io::BufRead::read_line(&mut peer.reader, &mut got) {
            Ok(n) if n > 0 => {}
            other => panic!("reply {i}: {other:?}; agent log:\n{}", agent.log()),
        }
        assert_eq!(got.trim_end_matches('\n'), want, "reply {i}");
    }
    // Nothing more than one reply per request.
    assert_eq!(
        peer.request(r#"{"id":"end","op":"ping"}"#),
        r#"{"id":"end","ok":true}"#
    );
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_RECEIVED_TOTAL, &[]),
        Some(1001.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "unknown_op")]),
        Some(100.0),
        "{text}"
    );
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let agent = Agent::start_with(AgentOptions::default().env("AGENT_NETWORK__MAX_CONNECTIONS", 2));
    let mut first = agent.connect();
    assert_eq!(
        first.request(r#"{"id":1,"op":"ping"}"#),
        r#"{"id":1,"ok":true}"#
    );
    let mut second = agent.connect();
    assert_eq!(
        second.request(r#"{"id":2,"op":"ping"}"#),
        r#"{"id":2,"ok":true}"#
    );

    // The third is accepted by the kernel, then closed by the agent unread.
    let mut third = agent.connect();
    let closed_after = third.expect_closed();
    assert!(
        closed_after < Duration::from_secs(5),
        "closed after {closed_after:?}"
    );

    // The first two are unaffected.
    assert_eq!(
        first.request(r#"{"id":3,"op":"ping"}"#),
        r#"{"id":3,"ok":true}"#
    );
    assert_eq!(second.put("k", "v"), serde_json::json!({"ok": true}));
    let text = agent.scrape();
    assert_eq!(
        sample(&text, AGENT_CONNECTIONS_REJECTED_TOTAL, &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, AGENT_PEERS_CONNECTED, &[]),
        Some(2.0),
        "{text}"
    );

    // Once one closes and the agent has noticed, a new one is accepted.
    drop(first);
    assert!(
        wait_until(|| sample(&agent.scrape(), AGENT_PEERS_CONNECTED, &[]) == Some(1.0)),
        "the agent never noticed the close:\n{}",
        agent.scrape()
    );
    let mut fourth = agent.connect();
    assert_eq!(
        fourth.request(r#"{"id":4,"op":"get","key":"k"}"#),
        r#"{"id":4,"ok":true,"value":"v"}"#
    );
    assert_eq!(
        second.request(r#"{"id":5,"op":"ping"}"#),
        r#"{"id":5,"ok":true}"#
    );

    // And the limit still holds with the new one counted.
    let mut fifth = agent.connect();
    fifth.expect_closed();
    let text = agent.scrape();
    assert_eq!(
        sample(&text, AGENT_CONNECTIONS_REJECTED_TOTAL, &[]),
        Some(2.0),
        "{text}"
    );
}

#[test]
fn a_peer_that_does_not_read_is_throttled_not_buffered() {
    let agent = Agent::start();
    let mut other = agent.connect();
    let value = "v".repeat(256 * 1024);
    assert_eq!(other.put("big", &value), serde_json::json!({"ok": true}));

    // Large replies to requests padded to 64 KB: the reply socket fills
    // first, the agent stops reading, then our writes stall.
    let flood = std::net::TcpStream::connect(agent.peer_addr).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let pad = "p".repeat(64 * 1024);
    let request = |i: usize| {
        format!("{{\"id\":{i},\"op\":\"get\",\"key\":\"big\",\"pad\":\"{pad}\"}}\n").into_bytes()
    };
    let mut writer = &flood;
    let (mut sent, mut partial): (usize, Option<(Vec<u8>, usize)>) = (0, None);
    'flood: while sent < 2000 {
        let bytes = request(sent);
        let mut off = 0;
        while off < bytes.len() {
            match writer.write(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    partial = Some((bytes, off));
                    break 'flood;
                }
                Err(e) => panic!("writing to agent: {e}"),
            }
        }
        sent += 1;
    }
    let (rest, off) = partial
        .unwrap_or_else(|| panic!("wrote {sent} requests of 64 KB and the agent kept reading"));

    // The agent has stopped taking requests from this peer: its count stands
    // still below what was sent, while other peers are served normally.
    let received = || sample(&agent.scrape(), MESSAGES_RECEIVED_TOTAL, &[]).unwrap();
    let before = received();
    assert_eq!(
        other.request(r#"{"id":"o","op":"ping"}"#),
        r#"{"id":"o","ok":true}"#
    );
    std::thread::sleep(Duration::from_millis(300));
    // The ping above is the only message received in between.
    assert_eq!(received(), before + 1.0);
    assert!(before < (sent + 1) as f64, "received {before} of {sent}");

    // Once the peer reads, everything is answered, in order.
    let finisher = {
        let mut w = flood.try_clone().unwrap();
        w.set_write_timeout(Some(WAIT)).unwrap();
        std::thread::spawn(move || w.write_all(&rest[off..]).expect("finish the last request"))
    };
    flood.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = std::io::BufReader::new(&flood);
    let total = sent + 1;
    for i in 0..total {
        let mut line = String::new();
        if let Err(e) = std::io::BufRead::read_line(&mut reader, &mut line) {
            panic!("reply {i} of {total}: {e}; agent log:\n{}", agent.log());
        }
        let want = format!("{{\"id\":{i},\"ok\":true,\"value\":\"{value}\"}}\n");
        assert!(
            line == want,
            "reply {i} is not the value (got {} bytes: {:.60})",
            line.len(),
            line
        );
    }
    finisher.join().unwrap();
    assert_eq!(received(), (total + 2) as f64);
}

/// Issue #13: the HighMessageErrorRate runbook sends operators to the log.
/// Failed messages are summarised there by reason, at most one line per
/// 10 s, with an escaped example: a burst writes one line, not one per
/// message, and peer bytes never reach the log raw.
#[test]
fn failed_messages_are_summarised_in_the_log_not_logged_one_by_one() {
    let mut agent = Agent::start();
    let mut peer = agent.connect();
    peer.send_raw(b"\x1b[31mnot json\n");
    assert_eq!(
        peer.read_line().map(|r| r.contains("\"ok\":false")),
        Some(true)
    );
    for _ in 0..49 {
        assert_eq!(peer.call(serde_json::json!({"op": "fly"}))["ok"], false);
    }
    agent.wait_for_log("messages answered with an error");
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("messages answered with an error"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    let line = lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("parse=1") && line.contains("unknown_op=0"),
        "{line}"
    );
    assert!(
        line.contains(r"\x1b[31mnot json") || line.contains("example="),
        "{line}"
    );
    assert!(
        !log.contains('\x1b'),
        "a raw escape reached the log:\n{log}"
    );
    // Counted exactly, whatever the log says.
    let text = agent.scrape();
    assert_eq!(
        sample(&text, "messages_failed_total", &[("reason", "parse")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "messages_failed_total", &[("reason", "unknown_op")]),
        Some(49.0)
    );
}
