//! Security, with the real binary, real TLS sockets and certificates the
//! tests make themselves: mutual TLS and the allow-list on the peer port,
//! TLS and basic auth on the metrics endpoint, and secrets kept out of
//! output (docs/security.md).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pki::{self, Ca, Leaf};
use common::*;

/// `agent_peer_connections_denied_total{reason}` as scraped.
fn denied(agent: &Agent, reason: &str) -> f64 {
    sample(
        &agent.scrape(),
        "agent_peer_connections_denied_total",
        &[("reason", reason)],
    )
    .unwrap_or_else(|| panic!("no denied series for {reason}"))
}

/// Waits until the denied counter for `reason` reads `n`, then checks
/// that every other reason still reads `others[reason]`.
fn wait_denied(agent: &Agent, reason: &str, n: f64) {
    let ok = wait_until(|| denied(agent, reason) == n);
    assert!(
        ok,
        "denied{{reason={reason}}} never reached {n}: {}",
        denied(agent, reason)
    );
}

/// Starts an agent whose peer port requires mutual TLS with `ca`.
fn tls_agent(ca: &Ca, leaf: &Leaf, extra: &[(&str, &str)]) -> Agent {
    let mut opts = AgentOptions::default()
        .env("AGENT_NETWORK__TLS__CERT_FILE", leaf.cert_file.display())
        .env("AGENT_NETWORK__TLS__KEY_FILE", leaf.key_file.display())
        .env("AGENT_NETWORK__TLS__CA_FILE", ca.cert_file.display());
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    Agent::start_with(opts)
}

#[test]
fn peer_mtls_serves_a_client_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "fleet");
    let server = ca.leaf(dir.path(), "server");
    let client = ca.leaf(dir.path(), "client");
    let agent = tls_agent(&ca, &server, &[]);

    let config = pki::client_config(&ca.cert_file, Some(&client));
    let mut tls = pki::connect(agent.peer_addr, config).expect("handshake");
    let put = pki::request(&mut tls, r#"{"id":1,"op":"put","key":"k","value":"v"}"#).unwrap();
    assert_eq!(put, r#"{"id":1,"ok":true}"#);
    let get = pki::request(&mut tls, r#"{"id":2,"op":"get","key":"k"}"#).unwrap();
    assert_eq!(get, r#"{"id":2,"ok":true,"value":"v"}"#);

    let text = agent.scrape();
    assert_eq!(sample(&text, "agent_peers_connected", &[]), Some(1.0));
    assert_eq!(sample(&text, "messages_received_total", &[]), Some(2.0));
    for reason in [
        "not_allowed",
        "tls_no_certificate",
        "tls_bad_certificate",
        "tls_timeout",
        "tls_error",
    ] {
        assert_eq!(denied(&agent, reason), 0.0, "{reason}");
    }
    // TLS on the peer port: the open-port warning is not given.
    assert!(
        !agent.log().contains("peers are not authenticated"),
        "{}",
        agent.log()
    );
}

/// Sends a put over a connection the agent should refuse, and reports
/// whether any reply came back.
fn try_put_over(tls: std::io::Result<pki::TlsStream>, key: &str) -> Option<String> {
    let mut tls = tls.ok()?;
    pki::request(
        &mut tls,
        &format!(r#"{{"op":"put","key":"{key}","value":"x"}}"#),
    )
    .ok()
}

#[test]
fn peer_tls_rejects_and_counts_clients_without_a_good_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "fleet");
    let other = Ca::new(dir.path(), "other");
    let server = ca.leaf(dir.path(), "server");
    let good = ca.leaf(dir.path(), "good");
    let foreign = other.leaf(dir.path(), "foreign");
    let agent = tls_agent(&ca, &server, &[]);

    // No client certificate.
    let none = pki::client_config(&ca.cert_file, None);
    assert_eq!(
        try_put_over(pki::connect(agent.peer_addr, none), "no-cert"),
        None
    );
    wait_denied(&agent, "tls_no_certificate", 1.0);

    // A certificate from another CA.
    let wrong = pki::client_config(&ca.cert_file, Some(&foreign));
    assert_eq!(
        try_put_over(pki::connect(agent.peer_addr, wrong), "wrong-ca"),
        None
    );
    wait_denied(&agent, "tls_bad_certificate", 1.0);

    // Plain text on the TLS port.
    let mut plain = Peer::connect(agent.peer_addr);
    plain.send_raw(b"{\"op\":\"put\",\"key\":\"plain\",\"value\":\"x\"}\n");
    let mut buf = Vec::new();
    let _ = plain.reader.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("\"ok\""), "{buf:?}");
    wait_denied(&agent, "tls_error", 1.0);

    // Nothing any of them sent was executed.
    let config = pki::client_config(&ca.cert_file, Some(&good));
    let mut tls = pki::connect(agent.peer_addr, config).expect("handshake");
    for key in ["no-cert", "wrong-ca", "plain"] {
        let reply = pki::request(&mut tls, &format!(r#"{{"op":"get","key":"{key}"}}"#)).unwrap();
        assert_eq!(reply, r#"{"ok":true,"value":null}"#, "{key}");
    }
    let text = agent.scrape();
    assert_eq!(sample(&text, "messages_received_total", &[]), Some(3.0));
    assert_eq!(denied(&agent, "tls_no_certificate"), 1.0);
    assert_eq!(denied(&agent, "tls_bad_certificate"), 1.0);
    assert_eq!(denied(&agent, "tls_error"), 1.0);
}

#[test]
fn half_finished_handshake_is_dropped_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "fleet");
    let server = ca.leaf(dir.path(), "server");
    let good = ca.leaf(dir.path(), "good");
    // One slot: the stalled handshake holds it until the timeout.
    let agent = tls_agent(
        &ca,
        &server,
        &[
            ("AGENT_NETWORK__TLS__HANDSHAKE_TIMEOUT", "1s"),
            ("AGENT_NETWORK__MAX_CONNECTIONS", "1"),
        ],
    );

    // The first bytes of a ClientHello, then silence.
    let mut stalled = TcpStream::connect(agent.peer_addr).unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = stalled.read(&mut buf).unwrap_or(0);
    let held = started.elapsed();
    assert_eq!(n, 0, "the agent closed the stalled connection");
    assert!(
        held >= Duration::from_millis(900),
        "closed after {held:?}, before the timeout"
    );
    wait_denied(&agent, "tls_timeout", 1.0);

    // Its slot is free again: a good client is served.
    let config = pki::client_config(&ca.cert_file, Some(&good));
    let ok = wait_until(|| {
        pki::connect(agent.peer_addr, config.clone())
            .ok()
            .and_then(|mut tls| pki::request(&mut tls, r#"{"op":"ping"}"#).ok())
            .is_some_and(|r| r == r#"{"ok":true}"#)
    });
    assert!(
        ok,
        "a good client was not served after the timeout:\n{}",
        agent.log()
    );
}

#[test]
fn outbound_peers_connect_over_mutual_tls_and_a_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "fleet");
    let other = Ca::new(dir.path(), "other");
    let b_leaf = ca.leaf(dir.path(), "b");
    let a_leaf = ca.leaf(dir.path(), "a");
    let c_leaf = other.leaf(dir.path(), "c");
    let b = tls_agent(&ca, &b_leaf, &[]);
    let port = b.peer_addr.port().to_string();

    // A dials B by name; both certificates come from the fleet CA.
    let mut a = tls_agent(
        &ca,
        &a_leaf,
        &[("AGENT_NETWORK__PEERS", &format!("[localhost:{port}]"))],
    );
    let connected = wait_until(|| {
        sample(&b.scrape(), "agent_peers_connected", &[]) == Some(1.0)
            && sample(&a.scrape(), "agent_peers_connected", &[]) == Some(1.0)
    });
    assert!(
        connected,
        "A never connected to B:\n{}\n{}",
        a.log(),
        b.log()
    );
    // The gauge can read 1 before the line reaches the test: the connection
    // counts once it is open, the line follows the first ping's reply, and
    // the agent's output arrives through a pipe and a reader thread.
    a.wait_for_log("connected to peer");

    // C's certificate (and its trust) is another CA's: B refuses C's
    // certificate, and C refuses B's, so no connection is made either way.
    let mut c = tls_agent(
        &other,
        &c_leaf,
        &[("AGENT_NETWORK__PEERS", &format!("[127.0.0.1:{port}]"))],
    );
    c.wait_for_log("cannot reach peer");
    assert!(c.log().contains("certificate"), "{}", c.log());
    assert_eq!(sample(&b.scrape(), "agent_peers_connected", &[]), Some(1.0));
    drop(a);
}

#[test]
fn allow_list_closes_other_addresses_before_reading_and_counts_them() {
    let agent = Agent::start_with(
        AgentOptions::default().env("AGENT_NETWORK__ALLOWED_NETWORKS", "[10.9.8.0/24]"),
    );
    for _ in 0..3 {
        let mut peer = Peer::connect(agent.peer_addr);
        // The write may succeed or hit the reset; either way no reply.
        let _ = peer
            .writer
            .write_all(b"{\"op\":\"put\",\"key\":\"k\",\"value\":\"v\"}\n");
        let mut buf = Vec::new();
        let _ = peer.reader.read_to_end(&mut buf);
        assert!(buf.is_empty(), "got {buf:?}");
    }
    wait_denied(&agent, "not_allowed", 3.0);
    let text = agent.scrape();
    assert_eq!(sample(&text, "messages_received_total", &[]), Some(0.0));
    assert_eq!(sample(&text, "agent_peers_connected", &[]), Some(0.0));

    // 127.0.0.1 listed: served.
    let open = Agent::start_with(AgentOptions::default().env(
        "AGENT_NETWORK__ALLOWED_NETWORKS",
        "[10.9.8.0/24, 127.0.0.1]",
    ));
    assert_eq!(open.connect().put("k", "v")["ok"], true);
    assert_eq!(denied(&open, "not_allowed"), 0.0);
}

#[test]
fn open_peer_port_is_warned_about_once_at_startup() {
    let port = free_port();
    let agent = Agent::start_with(
        AgentOptions::default().env("AGENT_NETWORK__LISTEN", format!("0.0.0.0:{port}")),
    );
    let log = agent.log();
    assert_eq!(
        log.matches("peers are not authenticated").count(),
        1,
        "{log}"
    );
    assert!(log.contains("docs/security.md"), "{log}");
    // The default harness listens on loopback: no warning.
    let quiet = Agent::start();
    assert!(
        !quiet.log().contains("peers are not authenticated"),
        "{}",
        quiet.log()
    );
}

/// Writes a web config file and starts an agent that uses it.
fn web_agent(dir: &Path, web_config: &str) -> Agent {
    let file = dir.join("web.yml");
    std::fs::write(&file, web_config).unwrap();
    Agent::start_with(AgentOptions::default().env("AGENT_METRICS__WEB_CONFIG_FILE", file.display()))
}

#[test]
fn metrics_over_https_with_basic_auth_gives_200_401_401() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "web");
    ca.leaf(dir.path(), "metrics");
    let hash = pki::bcrypt_hash("correct horse");
    // Relative paths: relative to the web config file, as in node_exporter.
    let agent = web_agent(
        dir.path(),
        &format!(
            "tls_server_config:\n  cert_file: metrics.pem\n  key_file: metrics-key.pem\n  min_version: TLS12\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    );
    let config = pki::client_config(&ca.cert_file, None);
    let get = |path: &str, auth: Option<(&str, &str)>| {
        pki::https_get(agent.metrics_addr, path, config.clone(), auth).expect("https get")
    };

    let ok = get("/metrics", Some(("prometheus", "correct horse")));
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.body.contains("# TYPE messages_received_total counter"));

    for (what, auth) in [
        ("wrong password", Some(("prometheus", "battery staple"))),
        ("unknown user", Some(("root", "correct horse"))),
        ("no credentials", None),
    ] {
        let resp = get("/metrics", auth);
        assert_eq!(resp.status, 401, "{what}: {resp:?}");
        assert_eq!(
            resp.header("www-authenticate"),
            Some("Basic realm=\"agent\""),
            "{what}"
        );
        assert!(!resp.body.contains("messages_received_total"), "{what}");
    }
    // /health follows the same rules.
    assert_eq!(get("/health", None).status, 401);
    assert_eq!(
        get("/health", Some(("prometheus", "correct horse"))).status,
        200
    );

    let text = get("/metrics", Some(("prometheus", "correct horse"))).body;
    assert_eq!(
        sample(&text, "agent_http_requests_unauthorized_total", &[]),
        Some(4.0)
    );

    // Plain HTTP to the HTTPS port gets nothing useful, and is counted.
    let plain = try_http_get(agent.metrics_addr, "/metrics", "HTTP/1.1");
    assert!(plain.map_or(true, |r| r.status != 200));
    let counted = wait_until(|| {
        let text = get("/metrics", Some(("prometheus", "correct horse"))).body;
        sample(&text, "agent_http_tls_handshake_failures_total", &[]) == Some(1.0)
    });
    assert!(counted);
}

#[test]
fn metrics_can_require_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "web");
    let leaf = ca.leaf(dir.path(), "metrics");
    let scraper = ca.leaf(dir.path(), "scraper");
    let agent = web_agent(
        dir.path(),
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            leaf.cert_file.display(),
            leaf.key_file.display(),
            ca.cert_file.display()
        ),
    );
    let with = pki::client_config(&ca.cert_file, Some(&scraper));
    let resp = pki::https_get(agent.metrics_addr, "/metrics", with.clone(), None).unwrap();
    assert_eq!(resp.status, 200);
    let without = pki::client_config(&ca.cert_file, None);
    assert!(pki::https_get(agent.metrics_addr, "/metrics", without, None).is_err());
    let counted = wait_until(|| {
        let text = pki::https_get(agent.metrics_addr, "/metrics", with.clone(), None)
            .unwrap()
            .body;
        sample(&text, "agent_http_tls_handshake_failures_total", &[]) == Some(1.0)
    });
    assert!(counted);
}

/// `check-config` with `env` fails as a configuration error naming every needle.
fn assert_check_config_fails(dir: &Path, env: &[(&str, &str)], needles: &[&str]) {
    let what = format!("{env:?}");
    assert_config_error(&what, run_agent(dir, &["check-config"], env), needles);
}

#[test]
fn bad_tls_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "fleet");
    let a = ca.leaf(d, "a");
    let b = ca.leaf(d, "b");
    let (cert, key, cafile) = (
        a.cert_file.display().to_string(),
        a.key_file.display().to_string(),
        ca.cert_file.display().to_string(),
    );
    let other_key = b.key_file.display().to_string();
    // A partial set.
    assert_check_config_fails(
        d,
        &[("AGENT_NETWORK__TLS__CERT_FILE", &cert)],
        &["network.tls.key_file", "go together"],
    );
    assert_check_config_fails(
        d,
        &[
            ("AGENT_NETWORK__TLS__CERT_FILE", &cert),
            ("AGENT_NETWORK__TLS__KEY_FILE", &key),
        ],
        &["network.tls.ca_file"],
    );
    // An unreadable file.
    assert_check_config_fails(
        d,
        &[
            ("AGENT_NETWORK__TLS__CERT_FILE", &cert),
            ("AGENT_NETWORK__TLS__KEY_FILE", &key),
            ("AGENT_NETWORK__TLS__CA_FILE", "/nonexistent/ca.pem"),
        ],
        &["network.tls.ca_file", "/nonexistent/ca.pem"],
    );
    // A key that is not the certificate's.
    assert_check_config_fails(
        d,
        &[
            ("AGENT_NETWORK__TLS__CERT_FILE", &cert),
            ("AGENT_NETWORK__TLS__KEY_FILE", &other_key),
            ("AGENT_NETWORK__TLS__CA_FILE", &cafile),
        ],
        &["network.tls.key_file", "does not match"],
    );
    // A certificate file that holds no certificate.
    assert_check_config_fails(
        d,
        &[
            ("AGENT_NETWORK__TLS__CERT_FILE", &key),
            ("AGENT_NETWORK__TLS__KEY_FILE", &key),
            ("AGENT_NETWORK__TLS__CA_FILE", &cafile),
        ],
        &["network.tls.cert_file", "no PEM certificate"],
    );
    assert_check_config_fails(
        d,
        &[("AGENT_NETWORK__ALLOWED_NETWORKS", "[10.0.0.0/33]")],
        &["network.allowed_networks[0]"],
    );
    // The complete set is valid.
    let (code, _, stderr) = run_agent(
        d,
        &["check-config"],
        &[
            ("AGENT_NETWORK__TLS__CERT_FILE", &cert),
            ("AGENT_NETWORK__TLS__KEY_FILE", &key),
            ("AGENT_NETWORK__TLS__CA_FILE", &cafile),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_web_config_files_are_config_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "web");
    let leaf = ca.leaf(d, "m");
    let hash = pki::bcrypt_hash("pw");
    let cases: &[(String, &str)] = &[
        ("tls_server_config:\n  cert_file: m.pem\n".into(), "tls_server_config.key_file"),
        (
            "tls_server_config:\n  cert_file: m.pem\n  key_file: m-key.pem\n  min_version: TLS10\n".into(),
            "tls_server_config.min_version",
        ),
        (
            "tls_server_config:\n  cert_file: m.pem\n  key_file: m-key.pem\n  client_auth_type: Sometimes\n".into(),
            "tls_server_config.client_auth_type",
        ),
        (
            "tls_server_config:\n  cert_file: m.pem\n  key_file: m-key.pem\n  client_auth_type: RequireAndVerifyClientCert\n".into(),
            "tls_server_config.client_ca_file",
        ),
        (
            "tls_server_config:\n  cert_file: m.pem\n  key_file: m-key.pem\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n".into(),
            "tls_server_config.cipher_suites",
        ),
        (
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: m-key.pem\n".into(),
            "tls_server_config.cert_file",
        ),
        ("basic_auth_users:\n  alice: plaintext\n".into(), "basic_auth_users.alice"),
        ("http_server_config:\n  http2: false\n".into(), "http_server_config"),
        ("tls_server_confg: {}\n".into(), "tls_server_confg"),
    ];
    for (i, (yaml, field)) in cases.iter().enumerate() {
        let file = d.join(format!("web{i}.yml"));
        std::fs::write(&file, yaml).unwrap();
        let path = file.display().to_string();
        assert_check_config_fails(
            d,
            &[("AGENT_METRICS__WEB_CONFIG_FILE", &path)],
            &["metrics.web_config_file", field],
        );
    }
    assert_check_config_fails(
        d,
        &[("AGENT_METRICS__WEB_CONFIG_FILE", "/nonexistent/web.yml")],
        &["metrics.web_config_file", "/nonexistent/web.yml"],
    );
    let good = d.join("good.yml");
    std::fs::write(
        &good,
        format!(
            "tls_server_config:\n  cert_file: m.pem\n  key_file: m-key.pem\nbasic_auth_users:\n  alice: '{hash}'\n"
        ),
    )
    .unwrap();
    let path = good.display().to_string();
    let (code, _, stderr) = run_agent(
        d,
        &["check-config"],
        &[("AGENT_METRICS__WEB_CONFIG_FILE", &path)],
    );
    assert_eq!(code, 0, "{stderr}");
    drop(leaf);
}

#[test]
fn redis_password_is_redacted_in_check_config_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://:hunter2@127.0.0.1:{}/0", free_port());
    let (code, stdout, stderr) = run_agent(
        dir.path(),
        &["check-config"],
        &[
            ("AGENT_STORAGE__BACKEND", "redis"),
            ("AGENT_STORAGE__REDIS__URL", &url),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("redis://:***@127.0.0.1:"), "{stdout}");

    // Redis is not running there: the startup warning names the URL, redacted.
    let agent = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_STORAGE__BACKEND", "redis")
            .env("AGENT_STORAGE__REDIS__URL", &url)
            .env("AGENT_STORAGE__REDIS__TIMEOUT", "200ms"),
    );
    let mut peer = agent.connect();
    assert_eq!(peer.put("k", "v")["ok"], false);
    let log = agent.log();
    assert!(log.contains("redis://:***@127.0.0.1:"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
    assert!(!peer.get("k").to_string().contains("hunter2"));
    assert!(!agent.scrape().contains("hunter2"));
    assert!(!agent.log().contains("hunter2"));

    // An invalid URL's error does not echo the password either.
    let (code, _, stderr) = run_agent(
        dir.path(),
        &["check-config"],
        &[
            ("AGENT_STORAGE__BACKEND", "redis"),
            ("AGENT_STORAGE__REDIS__URL", "bogus://:hunter2@x"),
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn redis_password_file_authenticates_against_a_real_server() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    assert_eq!(
        redis_command(redis.port, &["CONFIG", "SET", "requirepass", "s3cr3t-pw"]),
        "+OK\r\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis.pw");
    std::fs::write(&pw, "s3cr3t-pw\n").unwrap();
    let agent = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_STORAGE__BACKEND", "redis")
            .env("AGENT_STORAGE__REDIS__URL", redis.url())
            .env("AGENT_STORAGE__REDIS__PASSWORD_FILE", pw.display()),
    );
    let mut peer = agent.connect();
    assert_eq!(peer.put("k", "v")["ok"], true);
    assert_eq!(peer.get("k")["value"], "v");
    assert!(
        agent.log().contains("connected to Redis"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("s3cr3t-pw"), "{}", agent.log());

    // The same password both in the URL and in a file: refused.
    let both = format!("redis://:x@127.0.0.1:{}/0", redis.port);
    assert_check_config_fails(
        dir.path(),
        &[
            ("AGENT_STORAGE__REDIS__URL", &both),
            (
                "AGENT_STORAGE__REDIS__PASSWORD_FILE",
                &pw.display().to_string(),
            ),
        ],
        &["storage.redis.password_file"],
    );
    // Without the password Redis refuses: the agent's puts fail.
    let anon = Agent::start_with(
        AgentOptions::default()
            .env("AGENT_STORAGE__BACKEND", "redis")
            .env("AGENT_STORAGE__REDIS__URL", redis.url()),
    );
    assert_eq!(anon.connect().put("k2", "v")["ok"], false);
}

/// The fenced `sh` block under "Issuing certificates for a fleet" in
/// docs/security.md, split at its "# Per node" comment: (CA part, node part).
fn fleet_recipe() -> (String, String) {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/security.md"))
            .unwrap();
    let section = doc
        .split_once("### Issuing certificates for a fleet")
        .expect("section in docs/security.md")
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("sh block")
        .0;
    let (ca, node) = block
        .split_once("# Per node")
        .expect("a '# Per node' comment");
    (ca.to_string(), format!("# Per node{node}"))
}

/// Runs the recipe's node part for one node, with its name line replaced.
fn issue(dir: &Path, node_part: &str, node: &str) {
    let line = node_part
        .lines()
        .find(|l| l.starts_with("node="))
        .expect("a node=... line");
    let script = node_part.replace(
        line,
        &format!("node={node} sans=\"DNS:localhost,IP:127.0.0.1\""),
    );
    run_sh(dir, &script);
}

fn run_sh(dir: &Path, script: &str) {
    let out = std::process::Command::new("sh")
        .arg("-euc")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_documented_openssl_recipe_makes_certificates_two_agents_accept() {
    if require_bin("openssl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_part, node_part) = fleet_recipe();
    run_sh(d, &ca_part);
    issue(d, &node_part, "node1");
    issue(d, &node_part, "node2");
    let leaf = |n: &str| Leaf {
        cert_file: d.join(format!("{n}.pem")),
        key_file: d.join(format!("{n}-key.pem")),
    };
    let env = |n: &str| {
        AgentOptions::default()
            .env(
                "AGENT_NETWORK__TLS__CERT_FILE",
                d.join(format!("{n}.pem")).display(),
            )
            .env(
                "AGENT_NETWORK__TLS__KEY_FILE",
                d.join(format!("{n}-key.pem")).display(),
            )
            .env("AGENT_NETWORK__TLS__CA_FILE", d.join("ca.pem").display())
    };
    let node1 = Agent::start_with(env("node1"));
    let port = node1.peer_addr.port();
    let node2 =
        Agent::start_with(env("node2").env("AGENT_NETWORK__PEERS", format!("[localhost:{port}]")));
    let connected =
        wait_until(|| sample(&node1.scrape(), "agent_peers_connected", &[]) == Some(1.0));
    assert!(connected, "{}\n{}", node1.log(), node2.log());

    // And a client holding node2's certificate is served by node1.
    let config = pki::client_config(&d.join("ca.pem"), Some(&leaf("node2")));
    let mut tls = pki::connect(node1.peer_addr, config).unwrap();
    assert_eq!(
        pki::request(&mut tls, r#"{"op":"ping"}"#).unwrap(),
        r#"{"ok":true}"#
    );
}

/// `agent hash-password` with `password` on stdin: (exit code, stdout, stderr).
fn hash_password(password: &[u8]) -> (Option<i32>, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// bcrypt reads 72 bytes: a longer password is refused rather than hashed
/// into one that any string with the same first 72 bytes matches.
#[test]
fn hash_password_refuses_passwords_bcrypt_would_cut() {
    let (code, stdout, stderr) = hash_password(&[b'A'; 73]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("agent: the password is 73 bytes; bcrypt uses only the first 72"),
        "{stderr}"
    );
    // 72 bytes, the most bcrypt reads, is hashed; multi-byte characters count as bytes.
    let (code, stdout, _) = hash_password(&[b'A'; 72]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("$2b$10$"), "{stdout}");
    let (code, _, stderr) = hash_password("é".repeat(37).as_bytes());
    assert_eq!(code, Some(2), "74 bytes in 37 characters: {stderr}");
}

#[test]
fn hash_password_makes_a_hash_the_endpoint_accepts() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"p4ss word\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$2b$10$"), "{hash}");

    let dir = tempfile::tempdir().unwrap();
    // Basic auth over plain HTTP: allowed, and warned about.
    let agent = web_agent(dir.path(), &format!("basic_auth_users:\n  ops: '{hash}'\n"));
    assert!(
        agent.log().contains("passwords cross the network in clear"),
        "{}",
        agent.log()
    );
    let authed = |user: &str, pw: &str| {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        let mut s = TcpStream::connect(agent.metrics_addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_http_response(&raw).unwrap().status
    };
    assert_eq!(authed("ops", "p4ss word"), 200);
    assert_eq!(authed("ops", "p4ss word\n"), 401);
    assert_eq!(agent.http_get("/metrics").status, 401);
}
