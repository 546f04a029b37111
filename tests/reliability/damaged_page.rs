//! Section 11 of docs/reliability.md. A panic on a damaged page is caught,
//! counted and fails the store.

use std::time::Instant;

use crate::common::*;
use crate::support::*;

/// Stops `agent` cleanly, then corrupts the page-type byte of every 4 KiB
/// page of `db` that holds `key`: the b-tree leaf (and any stale copy),
/// which redb then meets as an impossible page and panics on.
pub(crate) fn corrupt_page_holding(db: &std::path::Path, key: &str) -> usize {
    let mut bytes = std::fs::read(db).unwrap();
    let mut pages = 0;
    for page in bytes.chunks_mut(4096) {
        if page.windows(key.len()).any(|w| w == key.as_bytes()) {
            page[0] = 0xee;
            pages += 1;
        }
    }
    assert!(pages > 0, "{key} not found in {}", db.display());
    std::fs::write(db, bytes).unwrap();
    pages
}

/// Gets every key of `keys` (pipelined on one connection): (correct values,
/// errors). Fails the test on any wrong value.
pub(crate) fn get_all(agent: &Agent, keys: &[(String, String)]) -> (usize, Vec<String>) {
    let requests: Vec<String> = keys
        .iter()
        .map(|(k, _)| serde_json::json!({"op": "get", "key": k}).to_string())
        .collect();
    let (mut ok, mut errors) = (0, Vec::new());
    for (reply, (key, v)) in pipelined(agent.peer_addr, &requests).iter().zip(keys) {
        let reply: serde_json::Value = serde_json::from_str(reply).unwrap();
        if reply["ok"] == true {
            assert_eq!(reply["value"], v.as_str(), "wrong value for {key}");
            ok += 1;
        } else {
            errors.push(reply["error"].as_str().unwrap().to_string());
        }
    }
    (ok, errors)
}

#[test]
fn corrupted_page_panic_is_caught_counted_and_fails_the_store_plainly() {
    const KEYS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.db");
    let keys: Vec<(String, String)> = (0..KEYS)
        .map(|i| {
            let key = format!("key-{i:05}");
            let v = recognisable(&key, 60);
            (key, v)
        })
        .collect();
    let mut agent = agent_on(&db);
    let puts: Vec<String> = keys
        .iter()
        .map(|(k, v)| serde_json::json!({"op": "put", "key": k, "value": v}).to_string())
        .collect();
    assert!(pipelined(agent.peer_addr, &puts)
        .iter()
        .all(|r| r == r#"{"ok":true}"#));
    assert!(agent.terminate().success());
    let pages = corrupt_page_holding(&db, "key-01000");
    // Two copies: one to meet the damage through gets, one through a put.
    let db2 = dir.path().join("agent2.db");
    std::fs::copy(&db, &db2).unwrap();

    for (copy, via) in [(&db, "get"), (&db2, "put")] {
        let mut agent = agent_on(copy);
        assert_eq!(agent.http_get("/ready").status, 200, "{via}");
        let mut peer = agent.connect();
        let first = if via == "get" {
            // Every key in order: those before the damaged leaf are served...
            let (ok, errors) = get_all(&agent, &keys);
            assert!(
                ok > 0 && !errors.is_empty(),
                "{via}: {ok} ok, {} errors",
                errors.len()
            );
            errors[0].clone()
        } else {
            peer.put("key-01000", "new")["error"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            first, "storage failed: the storage thread serving this request panicked",
            "{via}"
        );
        // ...and from then on the store says plainly that it failed.
        let (_, body) = wait_ready_status(&agent, 503);
        assert!(
            body.contains("panicked") && body.contains("refused until restart"),
            "{via}: {body:?}"
        );
        let text = agent.scrape();
        let panics = value(&text, "agent_storage_panics_total", &LOCAL);
        // One connection, one request at a time: exactly one panic, the
        // store fails before its caller hears of it; one log line for it.
        assert_eq!(panics, 1.0, "{via}: {text}");
        assert_logged(&agent, "thread panicked", 1);
        assert_eq!(value(&text, "agent_storage_up", &LOCAL), 0.0, "{via}");
        assert_logged(&agent, "storage failed; restart the agent", 1);
        // The panic's thread and place in redb are logged.
        let panic_line = agent
            .log()
            .lines()
            .find(|l| l.contains("thread panicked"))
            .map(str::to_string)
            .unwrap_or_default();
        assert!(
            panic_line.contains("thread=\"agent-db-")
                && panic_line.contains("/redb-")
                && panic_line.contains("/tree_store/"),
            "{via}: {panic_line}"
        );
        // Refused, promptly, for every key: no zombie, no wrong value.
        let (ok, errors) = get_all(&agent, &keys);
        assert_eq!(ok, 0, "{via}");
        assert!(errors
            .iter()
            .all(|e| e.starts_with("storage unavailable: a local database thread")));
        let start = Instant::now();
        let reply = peer.put("after", "x");
        let put_refused = start.elapsed();
        assert_eq!(reply["ok"], false, "{via}: {reply}");
        assert_eq!(agent.http_get("/health").status, 200);
        let text = agent.scrape();
        assert_eq!(
            value(&text, "agent_storage_panics_total", &LOCAL),
            panics,
            "{via}"
        );
        println!(
            "[damaged] page-type byte of {pages} page(s) holding key-01000 overwritten; via {via}: \
             {panics} panic(s) caught and counted, /ready 503 {body:?}, then {} gets and a put refused \
             (put in {:.2} ms)",
            errors.len(),
            ms(put_refused)
        );
        let stopped = Instant::now();
        assert!(
            agent.terminate().success(),
            "{via}: clean exit after the panic"
        );
        println!(
            "[damaged] via {via}: SIGTERM exit 0 in {:.0} ms",
            ms(stopped.elapsed())
        );
    }
}
