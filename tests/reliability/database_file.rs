//! Sections 9 and 12 of docs/reliability.md. An empty or foreign database
//! file stops startup and is left alone; a database file deleted or replaced
//! under the agent is noticed, and no put is acknowledged into it.

use crate::common::*;
use crate::support::*;

/// Starts an agent on `db` that must refuse to start: exit 1, one `agent:`
/// line naming the file and `what`, never "agent ready", no panic.
pub(crate) fn assert_refuses_to_start(db: &std::path::Path, what: &str) {
    let mut agent = start(AgentOptions {
        wait_ready: false,
        ..AgentOptions::default().env("AGENT_STORAGE__LOCAL__PATH", db.display())
    });
    let status = agent.wait_exit();
    let log = agent.log();
    assert_eq!(status.code(), Some(1), "{what}:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("agent: ")).collect();
    assert_eq!(errors.len(), 1, "{what}: one error line:\n{log}");
    assert!(
        errors[0].contains(&db.display().to_string()) && errors[0].contains(what),
        "{what}: {}",
        errors[0]
    );
    assert!(!log.contains("agent ready"), "{what}:\n{log}");
    assert_no_panic(&agent);
    println!("[damaged] {}", errors[0]);
}

#[test]
fn empty_or_foreign_database_file_refuses_to_start_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    // A 0-byte file, as a crash or a careless `> agent.db` leaves it.
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    assert_refuses_to_start(&empty, "is empty");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    // Not a redb file at all.
    let foreign = dir.path().join("foreign.db");
    let text = "this is a text file, not a database\n".repeat(1000);
    std::fs::write(&foreign, &text).unwrap();
    assert_refuses_to_start(&foreign, "is not a redb database");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), text);

    // A path that does not exist is where a new database is created, and it
    // keeps its data across a restart.
    let fresh = dir.path().join("new/dir/agent.db");
    let mut agent = agent_on(&fresh);
    assert_eq!(agent.connect().put("k", "v")["ok"], true);
    assert!(agent.terminate().success());
    let entries: Vec<_> = std::fs::read_dir(fresh.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["agent.db"], "no temporary file left");
    let agent = agent_on(&fresh);
    assert_eq!(agent.connect().get("k")["value"], "v");
}

#[test]
fn database_file_deleted_or_replaced_under_the_agent_fails_puts_instead_of_losing_them() {
    let dir = tempfile::tempdir().unwrap();
    // Deleted while idle: the watchdog notices.
    let db = dir.path().join("deleted.db");
    let agent = agent_on(&db);
    let mut peer = agent.connect();
    for i in 0..100 {
        assert_eq!(peer.put(&format!("k{i}"), "v")["ok"], true);
    }
    std::fs::remove_file(&db).unwrap();
    let (noticed, body) = wait_ready_status(&agent, 503);
    assert!(
        body.contains("was deleted or replaced while open"),
        "{body:?}"
    );
    assert_eq!(value(&agent.scrape(), "agent_storage_up", &LOCAL), 0.0);
    let mut refused = 0;
    for i in 0..100 {
        let reply = peer.put(&format!("after{i}"), "v");
        assert_eq!(reply["ok"], false, "{reply}");
        refused += 1;
    }
    assert_eq!(peer.get("k1")["ok"], false, "reads refused too");
    assert_logged(&agent, "storage failed; restart the agent", 1);
    assert!(!db.exists(), "nothing recreated behind the operator's back");
    drop(agent);
    // A restart starts a new, empty database there, as for any missing file.
    let agent = agent_on(&db);
    let mut peer = agent.connect();
    assert!(peer.get("k1")["value"].is_null() && peer.get("after1")["value"].is_null());
    drop(agent);

    // Replaced (a restore copied over it) and written to at once: the put
    // that finds it is refused, and the replacement is untouched.
    let db = dir.path().join("replaced.db");
    let agent = agent_on(&db);
    let mut peer = agent.connect();
    for i in 0..100 {
        assert_eq!(peer.put(&format!("k{i}"), "v")["ok"], true);
    }
    let copy = dir.path().join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    std::fs::rename(&copy, &db).unwrap();
    let reply = peer.put("after-replace", "v");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("was deleted or replaced while open")),
        "{reply}"
    );
    assert_eq!(agent.http_get("/ready").status, 503);
    drop(agent);
    let agent = agent_on(&db);
    let mut peer = agent.connect();
    for i in 0..100 {
        assert_eq!(peer.get(&format!("k{i}"))["value"], "v");
    }
    assert!(peer.get("after-replace")["value"].is_null());
    println!(
        "[deleted] file deleted under an idle agent: /ready 503 after {:.0} ms (watchdog every 250 ms), \
         {refused} later puts refused, 0 acknowledged; replaced and written at once: the first put refused",
        ms(noticed)
    );
    assert_no_panic(&agent);
}
