//! The `redis_cluster` backend against a real Redis Cluster (three masters,
//! three replicas, started by the harness in tests/common/cluster.rs):
//! keys spread by the cluster's own sharding, exact counts, a master killed
//! under load, and an agent started before its cluster exists. Skipped
//! (with a message) when redis-server or redis-cli is missing, except under
//! CI.

mod common;

use std::collections::BTreeMap;

use agent::telemetry::defs::{
    MESSAGES_FAILED_TOTAL, STORAGE_OPERATIONS_TOTAL, STORAGE_OPERATION_ERRORS_TOTAL,
};
use common::cluster::{RedisCluster, MASTERS};
use common::*;

/// Keys put, read and deleted through the agent.
const KEYS: usize = 3000;

/// A storage timeout short enough that requests to a lost shard fail fast,
/// for the tests that take shards down.
const SHORT_TIMEOUT: (&str, &str) = ("AGENT_STORAGE__REDIS_CLUSTER__TIMEOUT", "500ms");

fn cluster_agent(cluster: &RedisCluster, extra: &[(&str, &str)]) -> Agent {
    let mut opts = AgentOptions::default()
        .env("AGENT_STORAGE__BACKEND", "redis_cluster")
        .env("AGENT_STORAGE__REDIS_CLUSTER__NODES", cluster.seeds_env());
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    Agent::start_with(opts)
}

/// `storage_*` samples of the cluster backend for `operation`.
fn storage_counts(text: &str, operation: &str) -> (f64, f64) {
    let labels = [("operation", operation), ("backend", "redis_cluster")];
    (
        sample(text, STORAGE_OPERATIONS_TOTAL, &labels).unwrap_or(0.0),
        sample(text, STORAGE_OPERATION_ERRORS_TOTAL, &labels).unwrap_or(0.0),
    )
}

#[test]
fn keys_spread_over_every_master_with_exact_counts() {
    let Some(cluster) = RedisCluster::start(Some("cluster-secret")) else {
        return;
    };
    let pw = cluster.dir().join("redis.pw");
    std::fs::write(&pw, "cluster-secret\n").unwrap();
    let agent = cluster_agent(
        &cluster,
        &[(
            "AGENT_STORAGE__REDIS_CLUSTER__PASSWORD_FILE",
            &pw.display().to_string(),
        )],
    );
    let log = agent.log();
    assert!(log.contains("connected to Redis Cluster"), "{log}");
    assert!(!log.contains("cluster-secret"), "{log}");
    let shards = cluster.shards();
    assert_eq!(shards.len(), MASTERS, "{shards:?}");

    let mut peer = agent.connect();
    for i in 0..KEYS {
        assert_eq!(
            peer.request(&format!(
                r#"{{"id":{i},"op":"put","key":"k{i}","value":"v{i}"}}"#
            )),
            format!(r#"{{"id":{i},"ok":true}}"#)
        );
    }

    // Each master holds exactly the keys whose slot it serves, all of them
    // under the prefix; together, all of them.
    let mut expected: BTreeMap<u16, u64> = BTreeMap::new();
    for i in 0..KEYS {
        let key = format!("agent:k{i}");
        let owners: Vec<_> = shards.iter().filter(|s| s.serves(&key)).collect();
        assert_eq!(owners.len(), 1, "{key}: {shards:?}");
        *expected.entry(owners[0].master).or_default() += 1;
    }
    for shard in &shards {
        let size = cluster.dbsize(shard.master);
        assert_eq!(Some(&size), expected.get(&shard.master), "{shards:?}");
        // Far from empty: the keys are spread, not piled on one master.
        assert!(size > (KEYS / MASTERS / 2) as u64, "{expected:?}");
    }
    // Stored under the prefix, and only there.
    let owner = |key: &str| shards.iter().find(|s| s.serves(key)).unwrap().master;
    assert_eq!(
        cluster.command(owner("agent:k0"), &["GET", "agent:k0"]),
        "v0"
    );
    assert_eq!(cluster.command(owner("k0"), &["EXISTS", "k0"]), ":0");

    for i in 0..KEYS {
        assert_eq!(
            peer.request(&format!(r#"{{"id":{i},"op":"get","key":"k{i}"}}"#)),
            format!(r#"{{"id":{i},"ok":true,"value":"v{i}"}}"#)
        );
    }
    for i in 0..KEYS {
        assert_eq!(
            peer.request(&format!(r#"{{"id":{i},"op":"delete","key":"k{i}"}}"#)),
            format!(r#"{{"id":{i},"ok":true,"deleted":true}}"#)
        );
    }
    assert_eq!(
        peer.request(r#"{"id":"a","op":"delete","key":"k0"}"#),
        r#"{"id":"a","ok":true,"deleted":false}"#
    );
    assert_eq!(
        peer.request(r#"{"id":"b","op":"get","key":"k0"}"#),
        r#"{"id":"b","ok":true,"value":null}"#
    );
    for shard in &shards {
        assert_eq!(cluster.dbsize(shard.master), 0);
    }

    // A {tag} in the key places it by the tag alone (Redis hash tags).
    let tagged = shards.iter().find(|s| s.serves("user7")).unwrap().master;
    for key in ["{user7}:a", "b:{user7}"] {
        assert_eq!(peer.put(key, "tagged")["ok"], true);
        assert_eq!(
            cluster.command(tagged, &["GET", &format!("agent:{key}")]),
            "tagged"
        );
        assert_eq!(peer.delete(key)["deleted"], true);
    }

    // Without the password the cluster refuses the agent: error replies.
    let anon = cluster_agent(&cluster, &[]);
    let reply = anon.connect().put("k0", "v");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().starts_with("storage "),
        "{reply}"
    );

    let text = agent.scrape();
    assert_eq!(storage_counts(&text, "put"), ((KEYS + 2) as f64, 0.0));
    assert_eq!(storage_counts(&text, "get"), ((KEYS + 1) as f64, 0.0));
    assert_eq!(storage_counts(&text, "delete"), ((KEYS + 3) as f64, 0.0));
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "storage")]),
        Some(0.0)
    );
}

/// Bound on an error reply while the cluster is unreachable:
/// storage.redis_cluster.timeout is 500ms.
const PROMPT: std::time::Duration = std::time::Duration::from_secs(2);

#[test]
fn agent_started_before_its_cluster_starts_and_recovers() {
    let Some(mut cluster) = RedisCluster::reserve(None) else {
        return;
    };
    let agent = cluster_agent(&cluster, &[SHORT_TIMEOUT]);
    let log = agent.log();
    let warning = log
        .lines()
        .find(|l| l.contains("unreachable"))
        .unwrap_or_else(|| panic!("no warning about the cluster being unreachable:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");

    let mut peer = agent.connect();
    let mut errors = 0;
    for (i, request) in [
        r#"{"id":1,"op":"put","key":"k","value":"v"}"#,
        r#"{"id":2,"op":"get","key":"k"}"#,
        r#"{"id":3,"op":"delete","key":"k"}"#,
    ]
    .iter()
    .enumerate()
    {
        let (reply, took) = peer.timed_request(request);
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["id"], i + 1, "{reply}");
        assert_eq!(reply["ok"], false, "{reply}");
        let error = reply["error"].as_str().unwrap();
        assert!(
            error.starts_with("storage unavailable: ") || error == "storage timed out after 500ms",
            "{error}"
        );
        assert!(took < PROMPT, "{request} took {took:?}");
        errors += 1;
    }
    assert_eq!(
        peer.request(r#"{"id":4,"op":"ping"}"#),
        r#"{"id":4,"ok":true}"#
    );

    cluster.create();
    errors += peer.wait_for_recovery();
    // Every shard serves the agent now, not only the one "recovered" maps to.
    let shards = cluster.shards();
    let keys: Vec<String> = shards.iter().map(|s| s.key("k")).collect();
    for (shard, key) in shards.iter().zip(&keys) {
        assert_eq!(peer.put(key, "up")["ok"], true);
        assert_eq!(
            cluster.command(shard.master, &["GET", &format!("agent:{key}")]),
            "up"
        );
    }
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "storage")]),
        Some(errors as f64),
        "{text}"
    );
    let failed: f64 = ["put", "get", "delete"]
        .iter()
        .map(|op| storage_counts(&text, op).1)
        .sum();
    assert_eq!(failed, errors as f64);
}

/// What one load thread did.
#[derive(Default)]
struct LoadStats {
    puts: usize,
    put_errors: usize,
    gets: usize,
    get_errors: usize,
    /// Keys of the failed operations, with their error.
    failed: Vec<(String, String)>,
}

/// A peer that puts `t<thread>-<n>` = `v<n>` and reads it back, over and
/// over, until `stop`; every acknowledged put goes to `acked`, in order.
fn load(
    agent: &Agent,
    thread: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<LoadStats> {
    let mut peer = agent.connect();
    std::thread::spawn(move || {
        let mut stats = LoadStats::default();
        let storage_error = |reply: &serde_json::Value| {
            reply["ok"] == false
                && reply["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("storage "))
        };
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let key = format!("t{thread}-{n}");
            let reply = peer.put(&key, &format!("v{n}"));
            stats.puts += 1;
            if reply["ok"] == true {
                acked.lock().unwrap().push(key.clone());
            } else {
                assert!(storage_error(&reply), "{reply}");
                stats.put_errors += 1;
                stats.failed.push((key.clone(), reply["error"].to_string()));
            }
            let reply = peer.get(&key);
            stats.gets += 1;
            if reply["ok"] != true {
                assert!(storage_error(&reply), "{reply}");
                stats.get_errors += 1;
                stats.failed.push((key.clone(), reply["error"].to_string()));
            }
            // Steady load, not a saturating one: the machine is shared.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stats
    })
}

#[test]
fn master_killed_under_load_fails_over_without_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let Some(mut cluster) = RedisCluster::start(None) else {
        return;
    };
    let agent = cluster_agent(&cluster, &[SHORT_TIMEOUT]);
    let shards = cluster.shards();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| load(&agent, t, Arc::clone(&stop), Arc::clone(&acked)))
        .collect();

    // Settle: every write acknowledged so far has reached its replica (the
    // replica's offset has passed what its master had sent by then).
    assert!(wait_until(|| acked.lock().unwrap().len() >= 400));
    let settled: Vec<String> = acked.lock().unwrap().clone();
    let targets: Vec<(u16, u64)> = shards
        .iter()
        .map(|s| (s.replica, cluster.master_offset(s.master)))
        .collect();
    for (replica, offset) in targets {
        assert!(
            wait_until(|| cluster.replica_offset(replica).is_some_and(|o| o >= offset)),
            "replica {replica} never reached offset {offset}"
        );
    }

    // Kill the master serving the most settled keys, under load.
    let victim = shards
        .iter()
        .max_by_key(|s| settled.iter().filter(|k| s.holds(k)).count())
        .unwrap()
        .clone();
    cluster.kill9(victim.master);
    let killed = Instant::now();
    eprintln!(
        "killed master {} (replica {})",
        victim.master, victim.replica
    );

    // A probe on a key of the lost master's slots: it fails until the
    // replica has taken over and the agent's client has found that out.
    let probe_key = victim.key("probe");
    let mut probe = agent.connect();
    let mut probe_errors = 0;
    let mut probe_puts = 0;
    let recovered = loop {
        let reply = probe.put(&probe_key, "after");
        probe_puts += 1;
        if reply["ok"] == true {
            break Some(killed.elapsed());
        }
        assert!(
            reply["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("storage ")),
            "{reply}"
        );
        probe_errors += 1;
        if killed.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let recovered = recovered.unwrap_or_else(|| {
        panic!(
            "no put on the failed master's slots succeeded within 30 s of the kill\n{}\n{}",
            agent.log(),
            cluster.logs()
        )
    });
    assert!(cluster.is_master(victim.replica), "{}", cluster.logs());
    eprintln!("a put on the failed master's slots succeeded {recovered:?} after the kill");

    // More load after the failover, then stop.
    let before = acked.lock().unwrap().len();
    assert!(wait_until(|| acked.lock().unwrap().len() >= before + 400));
    stop.store(true, Ordering::Relaxed);
    let stats: Vec<LoadStats> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let puts: usize = stats.iter().map(|s| s.puts).sum();
    let put_errors: usize = stats.iter().map(|s| s.put_errors).sum();
    let gets: usize = stats.iter().map(|s| s.gets).sum();
    let get_errors: usize = stats.iter().map(|s| s.get_errors).sum();
    assert!(
        put_errors + probe_errors > 0,
        "the kill was never noticed: the test did not exercise a failover"
    );
    // Which keys failed, and how: the failed master's, and (while the
    // cluster as a whole reports CLUSTERDOWN) the others'.
    let (on_victim, elsewhere): (Vec<_>, Vec<_>) = stats
        .iter()
        .flat_map(|s| &s.failed)
        .partition(|(k, _)| victim.holds(k));
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, e) in stats.iter().flat_map(|s| &s.failed) {
        *reasons.entry(e.as_str()).or_default() += 1;
    }
    eprintln!(
        "failed load operations: {} on the failed master's slots, {} on other masters' ({:?}); by error: {reasons:?}",
        on_victim.len(),
        elsewhere.len(),
        elsewhere.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>()
    );

    // Every write acknowledged and replicated before the kill is readable;
    // writes acknowledged after the settle point may have been lost with
    // the master, and are counted.
    let acked = acked.lock().unwrap().clone();
    let mut reader = agent.connect();
    let mut read = |key: &String| {
        let n = key.rsplit('-').next().unwrap();
        let reply = reader.get(key);
        assert_eq!(reply["ok"], true, "{key}: {reply}");
        match reply["value"].as_str() {
            Some(v) => {
                assert_eq!(v, format!("v{n}"), "{key}");
                true
            }
            None => false,
        }
    };
    let settled_lost = settled.iter().filter(|k| !read(k)).count();
    let later = &acked[settled.len()..];
    let later_lost: Vec<&String> = later.iter().filter(|k| !read(k)).collect();
    eprintln!(
        "acknowledged puts: {} settled before the kill ({} lost), {} after the settle point ({} lost: {:?}); \
         puts {puts} ({put_errors} errors), gets {gets} ({get_errors} errors), probe puts {probe_puts} ({probe_errors} errors)",
        settled.len(),
        settled_lost,
        later.len(),
        later_lost.len(),
        later_lost
    );
    assert_eq!(settled_lost, 0, "replicated writes were lost");
    // Those lost can only be keys of the failed master's slots.
    for key in &later_lost {
        assert!(victim.holds(key), "{key}");
    }

    // Exact counts: every operation and every error reply, including the
    // reads above (acked.len() gets, all successful).
    let text = agent.scrape();
    assert_eq!(
        storage_counts(&text, "put"),
        (
            (puts + probe_puts) as f64,
            (put_errors + probe_errors) as f64
        ),
        "{text}"
    );
    assert_eq!(
        storage_counts(&text, "get"),
        ((gets + acked.len()) as f64, get_errors as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "storage")]),
        Some((put_errors + probe_errors + get_errors) as f64)
    );
}

/// Runs `check-config` with the cluster backend and `nodes`; returns
/// (code, stdout, stderr).
fn check_config(
    dir: &std::path::Path,
    nodes: &str,
    extra: &[(&str, &str)],
) -> (i32, String, String) {
    let mut env = vec![
        ("AGENT_STORAGE__BACKEND", "redis_cluster"),
        ("AGENT_STORAGE__REDIS_CLUSTER__NODES", nodes),
    ];
    env.extend_from_slice(extra);
    run_agent(dir, &["check-config"], &env)
}

/// A configuration error whose line starts with `key` and never shows `secret`.
fn assert_key_error(out: (i32, String, String), key: &str, secret: &str) {
    let line = assert_config_error(key, out, &[&format!("invalid configuration: {key}: ")]);
    assert!(!line.contains(secret), "{line}");
}

#[test]
fn check_config_validates_node_urls_and_redacts_their_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (free_port(), free_port());
    let nodes = format!("[redis://:hunter2@127.0.0.1:{a},redis://:hunter2@127.0.0.1:{b}]");
    let (code, stdout, stderr) = check_config(d, &nodes, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("  backend: redis_cluster\n"), "{stdout}");
    for port in [a, b] {
        assert!(
            stdout.contains(&format!("- redis://:***@127.0.0.1:{port}")),
            "{stdout}"
        );
    }

    let bad = |i: usize| format!("storage.redis_cluster.nodes[{i}]");
    assert_key_error(
        check_config(d, "[redis://127.0.0.1:7000,bogus://:hunter2@x]", &[]),
        &bad(1),
        "hunter2",
    );
    assert_key_error(
        check_config(d, "[redis+unix:///run/redis.sock?pass=hunter2]", &[]),
        &bad(0),
        "hunter2",
    );
    assert_key_error(
        check_config(d, "[redis://:hunter2@127.0.0.1:7000/1]", &[]),
        &bad(0),
        "hunter2",
    );
    assert_key_error(
        check_config(d, "[redis://:hunter2@h:1,redis://:other@h:2]", &[]),
        "storage.redis_cluster.nodes",
        "hunter2",
    );
    assert_key_error(
        check_config(d, "[]", &[]),
        "storage.redis_cluster.nodes",
        "-",
    );
    assert_key_error(
        check_config(
            d,
            "[redis://h:1]",
            &[("AGENT_STORAGE__REDIS_CLUSTER__TIMEOUT", "0s")],
        ),
        "storage.redis_cluster.timeout",
        "-",
    );

    // The password file: applied, never shown, and not with a password in a URL.
    let pw = d.join("cluster.pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let pw = pw.display().to_string();
    let with_file = [("AGENT_STORAGE__REDIS_CLUSTER__PASSWORD_FILE", pw.as_str())];
    let (code, stdout, stderr) = check_config(d, "[redis://127.0.0.1:7000]", &with_file);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert_key_error(
        check_config(
            d,
            "[redis://127.0.0.1:7000,redis://:x@127.0.0.1:7001]",
            &with_file,
        ),
        "storage.redis_cluster.password_file",
        "hunter2",
    );
    std::fs::write(d.join("empty.pw"), "\n").unwrap();
    assert_key_error(
        check_config(
            d,
            "[redis://127.0.0.1:7000]",
            &[("AGENT_STORAGE__REDIS_CLUSTER__PASSWORD_FILE", "empty.pw")],
        ),
        "storage.redis_cluster.password_file",
        "-",
    );

    // Nothing listens there: the agent starts, warns with the URLs
    // redacted, and answers storage errors that do not echo the password.
    let agent = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_STORAGE__BACKEND", "redis_cluster")
            .env("AGENT_STORAGE__REDIS_CLUSTER__NODES", &nodes)
            .env("AGENT_STORAGE__REDIS_CLUSTER__TIMEOUT", "200ms"),
    );
    let mut peer = agent.connect();
    let reply = peer.put("k", "v");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(!reply.to_string().contains("hunter2"), "{reply}");
    let log = agent.log();
    assert!(
        log.contains(&format!("redis://:***@127.0.0.1:{a}")),
        "{log}"
    );
    assert!(!log.contains("hunter2"), "{log}");
}

/// What docs/protocol.md says of acknowledged writes, shown: replication
/// is asynchronous, so a put (or delete) acknowledged by a master that dies
/// before its replica has the write is lost when the replica takes over. The replica
/// is cut off (paused, its link closed by the master) so that it
/// deterministically misses the write.
#[test]
fn acknowledged_writes_are_lost_when_the_master_dies_before_its_replica_has_them() {
    let Some(mut cluster) = RedisCluster::start(None) else {
        return;
    };
    let agent = cluster_agent(&cluster, &[SHORT_TIMEOUT]);
    let shard = cluster.shards()[0].clone();
    let mut on_shard = shard.keys("lost");
    let (key, kept) = (on_shard.next().unwrap(), on_shard.next().unwrap());
    let mut peer = agent.connect();
    // Written and replicated: it survives.
    assert_eq!(peer.put(&kept, "v")["ok"], true);
    let offset = cluster.master_offset(shard.master);
    assert!(wait_until(|| cluster
        .replica_offset(shard.replica)
        .is_some_and(|o| o >= offset)));

    cluster.signal(shard.replica, libc::SIGSTOP);
    assert_eq!(
        cluster.command(shard.master, &["CLIENT", "KILL", "TYPE", "replica"]),
        ":1"
    );
    assert_eq!(
        peer.put(&key, "acknowledged")["ok"],
        true,
        "the master acknowledges the put"
    );
    assert_eq!(peer.get(&key)["value"], "acknowledged");
    assert_eq!(peer.delete(&kept)["deleted"], true);
    assert_eq!(peer.get(&kept)["value"], serde_json::Value::Null);
    cluster.kill9(shard.master);
    cluster.signal(shard.replica, libc::SIGCONT);

    // The replica takes over, without the write.
    assert!(
        wait_until(|| cluster.is_master(shard.replica)),
        "{}",
        cluster.logs()
    );
    let mut last = serde_json::Value::Null;
    let recovered = wait_until(|| {
        last = peer.get(&key);
        last["ok"] == true
    });
    assert!(recovered, "{last}");
    assert_eq!(last["value"], serde_json::Value::Null, "{last}");
    // The acknowledged delete is undone: the key is back.
    assert_eq!(peer.get(&kept)["value"], "v");
    assert_eq!(peer.put(&key, "again")["ok"], true);
    assert_eq!(peer.get(&key)["value"], "again");
}

/// A shard loses both its nodes, so the cluster has no master for its
/// slots; when the master comes back (same address, its cluster config
/// kept), the agent's operations succeed again, without a restart.
#[test]
fn shard_down_then_back_recovers_without_restart() {
    let Some(mut cluster) = RedisCluster::start(None) else {
        return;
    };
    let agent = cluster_agent(&cluster, &[SHORT_TIMEOUT]);
    let shards = cluster.shards();
    let lost = shards[0].clone();
    let (down_key, up_key) = (lost.key("k"), shards[1].key("k"));
    let mut peer = agent.connect();
    assert_eq!(peer.put(&down_key, "before")["ok"], true);
    assert_eq!(peer.put(&up_key, "before")["ok"], true);

    // The replica first, so that nothing fails over.
    cluster.kill9(lost.replica);
    cluster.kill9(lost.master);
    let mut errors = 0;
    for _ in 0..3 {
        let reply = peer.get(&down_key);
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(
            reply["error"].as_str().unwrap().starts_with("storage "),
            "{reply}"
        );
        errors += 1;
    }
    // /ready and agent_storage_up say so, with the reason.
    let mut ready = agent.http_get("/ready");
    assert!(
        wait_until(|| {
            ready = agent.http_get("/ready");
            ready.status == 503
        }),
        "{ready:?}"
    );
    assert!(ready.body.contains("Redis Cluster"), "{ready:?}");
    assert_eq!(
        sample(
            &agent.scrape(),
            "agent_storage_up",
            &[("backend", "redis_cluster")]
        ),
        Some(0.0)
    );

    cluster.restart(lost.master);
    let mut last = serde_json::Value::Null;
    let recovered = wait_until(|| {
        last = peer.put(&down_key, "after");
        if last["ok"] == true {
            return true;
        }
        assert!(
            last["error"].as_str().unwrap().starts_with("storage "),
            "{last}"
        );
        errors += 1;
        false
    });
    assert!(recovered, "{last}\n{}", cluster.logs());
    assert_eq!(peer.get(&down_key)["value"], "after");
    // The probe finds the cluster whole again: ready, without a restart.
    assert!(
        wait_until(|| agent.http_get("/ready").status == 200),
        "{:?}",
        agent.http_get("/ready")
    );
    assert_eq!(
        sample(
            &agent.scrape(),
            "agent_storage_up",
            &[("backend", "redis_cluster")]
        ),
        Some(1.0)
    );
    // The other shard kept its data (it may have refused commands while
    // the cluster was down as a whole, so read until it answers).
    let mut up = serde_json::Value::Null;
    assert!(wait_until(|| {
        up = peer.get(&up_key);
        up["ok"] == true || {
            errors += 1;
            false
        }
    }));
    assert_eq!(up["value"], "before");
    let text = agent.scrape();
    assert_eq!(
        sample(&text, MESSAGES_FAILED_TOTAL, &[("reason", "storage")]),
        Some(errors as f64),
        "{text}"
    );
}
