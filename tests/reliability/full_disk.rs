//! Section 10 of docs/reliability.md. A full disk fails puts, keeps gets, and
//! writes resume once space is freed, with nothing acknowledged lost.

use std::time::Instant;

use crate::common::*;
use crate::support::*;

#[test]
fn full_disk_fails_puts_keeps_gets_and_recovers_without_restart() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    let db = fs.path().join("agent.db");
    let mut agent = agent_on(&db);
    let mut peer = agent.connect();
    assert_eq!(
        (
            agent.http_get("/ready").status,
            agent.http_get("/ready").body
        ),
        (200, "OK\n".to_string())
    );
    assert_eq!(value(&agent.scrape(), "agent_storage_up", &LOCAL), 1.0);

    // Keys written before the disk fills, which must survive it all.
    let mut acked: Vec<(String, String)> = Vec::new();
    for i in 0..200 {
        let key = format!("before-{i}");
        let v = recognisable(&key, 1000);
        assert_eq!(peer.put(&key, &v)["ok"], true);
        acked.push((key, v));
    }

    let mut failed_puts = 0u64;
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut error_latency = Vec::new();
    let mut recovery = Vec::new();
    for (cycle, idle) in [(1, true), (2, false)] {
        // Fill the filesystem, then put 4 KiB values until puts fail: the
        // database file has room of its own left at first.
        let filler = format!("filler-{cycle}");
        let filled = fs.fill(&filler);
        let mut n = 0;
        let first_error = loop {
            let key = format!("fill{cycle}-{n}");
            let v = recognisable(&key, 4096);
            let reply = peer.put(&key, &v);
            n += 1;
            if reply["ok"] == true {
                acked.push((key, v));
            } else {
                failed_puts += 1;
                refused.push((key, v));
                break reply["error"].as_str().unwrap_or_default().to_string();
            }
            assert!(n < 5000, "puts never failed on a full disk");
        };
        assert!(
            first_error.contains("No space left on device"),
            "{first_error}"
        );
        // Said plainly, at once: /ready and the gauge.
        let (_, body) = wait_ready_status(&agent, 503);
        assert!(
            body.contains("No space left on device")
                && body.contains("retrying once 1 MiB is free"),
            "{body:?}"
        );
        assert_eq!(body.lines().count(), 1, "{body:?}");
        assert_eq!(value(&agent.scrape(), "agent_storage_up", &LOCAL), 0.0);
        assert_eq!(agent.http_get("/health").status, 200);

        // While full: puts fail fast, gets of everything acknowledged work.
        for i in 0..50 {
            let key = format!("while-full{cycle}-{i}");
            let v = recognisable(&key, 100);
            let start = Instant::now();
            let reply = peer.put(&key, &v);
            error_latency.push(start.elapsed());
            assert_eq!(reply["ok"], false, "{reply}");
            assert!(
                reply["error"].as_str().is_some_and(
                    |e| e.starts_with("storage unavailable: local database cannot write")
                ),
                "{reply}"
            );
            failed_puts += 1;
            refused.push((key, v));
        }
        for (key, v) in &acked {
            assert_eq!(peer.get(key)["value"], v.as_str(), "{key} while full");
        }
        println!(
            "[full-disk] cycle {cycle}: filler {:.1} MiB, then {} puts of 4 KiB acknowledged before \
             the first failure; {} acknowledged keys all readable while full",
            filled as f64 / 1048576.0,
            n - 1,
            acked.len()
        );

        // Remove the filler, and time the recovery.
        std::fs::remove_file(fs.path().join(&filler)).unwrap();
        let took = if idle {
            // No traffic: the watchdog's probe brings writes back.
            let (took, _) = wait_ready_status(&agent, 200);
            let key = format!("after{cycle}");
            let v = recognisable(&key, 100);
            assert_eq!(
                peer.put(&key, &v)["ok"],
                true,
                "a put after /ready said 200"
            );
            acked.push((key, v));
            took
        } else {
            // Traffic: a put is the first to find the room.
            let key = format!("after{cycle}");
            let v = recognisable(&key, 100);
            let (took, failures) = put_until_ok(&mut peer, &key, &v);
            failed_puts += failures;
            acked.push((key, v));
            assert_eq!(agent.http_get("/ready").status, 200);
            took
        };
        assert_eq!(value(&agent.scrape(), "agent_storage_up", &LOCAL), 1.0);
        println!(
            "[full-disk] cycle {cycle}: writes succeed again {:.0} ms after the filler was removed ({})",
            ms(took),
            if idle { "idle agent, /ready 200" } else { "puts every 10 ms" }
        );
        recovery.push(took);
    }

    // Counted exactly, logged per transition, not per failed commit.
    let text = agent.scrape();
    let put_errors = value(
        &text,
        "storage_operation_errors_total",
        &[("operation", "put"), ("backend", "local")],
    );
    assert_eq!(put_errors as u64, failed_puts, "{text}");
    assert_eq!(
        value(
            &text,
            "storage_operation_errors_total",
            &[("operation", "get"), ("backend", "local")]
        ),
        0.0
    );
    assert_logged(&agent, "storage is not usable", 2);
    assert_logged(&agent, "storage is usable again", 2);
    // The two state changes, and the failed puts' warnings: at most one a
    // second (docs/monitoring.md), never one per failed put.
    let no_space = log_lines(&agent, "No space left on device");
    assert!(
        (2..=8).contains(&no_space),
        "{no_space} lines name the full disk:\n{}",
        agent.log()
    );
    assert_eq!(value(&text, "agent_storage_panics_total", &LOCAL), 0.0);

    // Nothing acknowledged is lost, across a restart too; nothing refused
    // appears with a wrong value.
    for (key, v) in &acked {
        assert_eq!(peer.get(key)["value"], v.as_str(), "{key}");
    }
    assert!(agent.terminate().success());
    let agent = agent_on(&db);
    let mut peer = agent.connect();
    for (key, v) in &acked {
        assert_eq!(peer.get(key)["value"], v.as_str(), "{key} after restart");
    }
    let mut refused_present = 0;
    for (key, v) in &refused {
        let got = peer.get(key);
        if !got["value"].is_null() {
            assert_eq!(got["value"], v.as_str(), "{key}");
            refused_present += 1;
        }
    }
    error_latency.sort();
    println!(
        "[full-disk] {} puts refused while full: error reply p50 {:.2} ms, max {:.2} ms; \
         {} acknowledged keys intact after restart; {refused_present} of {} refused puts present",
        failed_puts,
        ms(percentile(&error_latency, 0.5)),
        ms(*error_latency.last().unwrap()),
        acked.len(),
        refused.len()
    );
    assert_no_panic(&agent);
}
