//! The command line and configuration, with the real binary: invalid
//! configuration (file or environment) exits 2 with one line naming the key,
//! `check-config` prints the effective configuration, and an address in use
//! stops startup with one line naming it.

mod common;

use std::path::Path;
use std::time::Duration;

use agent::config::{BackendKind, Config};
use common::*;

/// (YAML, the key the error must name).
const BAD_FILES: &[(&str, &str)] = &[
    ("metrics:\n  port: 70000\n", "metrics.port: "),
    ("metrics:\n  port: 0\n", "metrics.port: "),
    ("metrics:\n  port: abc\n", "metrics.port: "),
    ("metrics:\n  path: metrics\n", "metrics.path: "),
    ("metrics:\n  path: /health\n", "metrics.path: "),
    (
        "metrics:\n  prot: 8080\n",
        "metrics.prot: unknown key; did you mean `metrics.port`?",
    ),
    (
        "log:\n  level: verbose\n",
        "log.level: \"verbose\" is not a level",
    ),
    ("metrics:\n  path: /ready\n", "metrics.path: "),
    ("metrics:\n  address: not-an-ip\n", "metrics.address: "),
    ("storage:\n  backend: postgres\n", "storage.backend: "),
    (
        "storage:\n  redis:\n    url: \"http://x\"\n",
        "storage.redis.url: ",
    ),
    (
        "storage:\n  redis:\n    timeout: soon\n",
        "storage.redis.timeout: ",
    ),
    ("network:\n  listen: nowhere\n", "network.listen: "),
    ("network:\n  listen: \"127.0.0.1\"\n", "network.listen: "),
    (
        "network:\n  max_connections: 0\n",
        "network.max_connections: ",
    ),
    (
        "network:\n  max_connections: -1\n",
        "network.max_connections: ",
    ),
    (
        "network:\n  max_message_bytes: 0\n",
        "network.max_message_bytes: ",
    ),
    ("network:\n  idle_timeout: 0s\n", "network.idle_timeout: "),
    (
        "network:\n  max_buffered_bytes: 0\n",
        "network.max_buffered_bytes: must be at least network.max_message_bytes (1048576), got 0",
    ),
    ("network:\n  peers: [\"nohost\"]\n", "network.peers[0]: "),
    ("bogus: 1\n", "bogus: unknown key"),
    (
        "metrics:\n  native_histograms:\n    bucket_factor: 1\n",
        "metrics.native_histograms.bucket_factor: 1 must be a finite number above 1",
    ),
    (
        "metrics:\n  native_histograms:\n    bucket_factor: .inf\n",
        "metrics.native_histograms.bucket_factor: ",
    ),
    (
        "metrics:\n  native_histograms:\n    max_buckets: 0\n",
        "metrics.native_histograms.max_buckets: must be at least 1",
    ),
    (
        "metrics:\n  native_histograms:\n    max_buckets: -5\n",
        "metrics.native_histograms.max_buckets: ",
    ),
    (
        "metrics:\n  native_histograms:\n    zero_threshold: 0\n",
        "metrics.native_histograms.zero_threshold: 0 must be a finite number above 0",
    ),
    (
        "metrics:\n  native_histograms:\n    zero_threshold: -1e-9\n",
        "metrics.native_histograms.zero_threshold: ",
    ),
    (
        "metrics:\n  native_histograms:\n    enabled: maybe\n",
        "metrics.native_histograms.enabled: ",
    ),
    (
        "metrics:\n  native_histograms:\n    buckets: 3\n",
        "metrics.native_histograms.buckets: unknown key",
    ),
    ("log:\n  format: xml\n", "log.format: "),
    (
        "metrics:\n  remote_write:\n    url: ftp://h/w\n",
        "metrics.remote_write.url: \"ftp://h/w\" must be an http:// or https:// URL",
    ),
    (
        "metrics:\n  remote_write:\n    url: \"http://u:hunter2@h:9/w\"\n",
        "metrics.remote_write.url: must not hold credentials",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    interval: 10ms\n",
        "metrics.remote_write.interval: 10ms is below the minimum of 100ms",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    timeout: 0s\n",
        "metrics.remote_write.timeout: must be greater than 0",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    max_pending: 0\n",
        "metrics.remote_write.max_pending: must be at least 1",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    external_labels:\n      __x: y\n",
        "metrics.remote_write.external_labels.__x: a label name",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    basic_auth:\n      username: u\n",
        "metrics.remote_write.basic_auth.password_file: must be set",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    basic_auth:\n      username: u\n      password_file: /nonexistent/pw\n",
        "metrics.remote_write.basic_auth.password_file: cannot read /nonexistent/pw",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    basic_auth:\n      username: u\n      password_file: f.yaml\n    bearer_token_file: f.yaml\n",
        "metrics.remote_write.bearer_token_file: cannot be combined",
    ),
    (
        "metrics:\n  remote_write:\n    url: http://h/w\n    tls:\n      ca_file: f.yaml\n",
        "metrics.remote_write.tls: is set but metrics.remote_write.url is http://",
    ),
    (
        "metrics:\n  remote_write:\n    url: https://h/w\n    tls:\n      cert_file: f.yaml\n",
        "metrics.remote_write.tls.key_file: must be set",
    ),
    (
        "metrics:\n  remote_write:\n    url: https://h/w\n    tls:\n      ca_file: /nonexistent/ca.pem\n",
        "metrics.remote_write.tls.ca_file: cannot read",
    ),
    (
        "metrics:\n  remote_write:\n    urls: http://h/w\n",
        "metrics.remote_write.urls: unknown key",
    ),
    (
        "metrics:\n  listen: false\n",
        "metrics.listen: false opens no metrics port, so metrics.remote_write.url must be set",
    ),
    (
        "metrics:\n  exporter: dogstatsd\n  remote_write:\n    url: http://h/w\n",
        "metrics.remote_write.url: needs metrics.exporter: prometheus",
    ),
];

#[test]
fn invalid_config_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.yaml"), "").unwrap();
    for (yaml, key) in BAD_FILES {
        std::fs::write(dir.path().join("f.yaml"), yaml).unwrap();
        // The option goes before or after the subcommand, long or short;
        // and running (no subcommand) fails the same way before starting.
        for args in [
            &["-c", "f.yaml", "check-config"][..],
            &["--config", "f.yaml", "check-config"],
            &["check-config", "--config", "f.yaml"],
            &["check-config", "-c", "f.yaml"],
            &["--config", "f.yaml"],
            &["-c", "f.yaml", "run"],
        ] {
            let what = format!("{yaml:?} with {args:?}");
            assert_config_error(&what, run_agent(dir.path(), args, &[]), &[key]);
        }
    }
}

#[test]
fn unparsable_config_file_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for yaml in [
        "metrics: [unclosed\n",
        "- 1\n",
        "just a string\n",
        "metrics:\n\tport: 1\n",
    ] {
        std::fs::write(dir.path().join("broken.yaml"), yaml).unwrap();
        for args in [
            &["-c", "broken.yaml", "check-config"][..],
            &["check-config", "--config", "broken.yaml"],
        ] {
            assert_config_error(
                &format!("{yaml:?}"),
                run_agent(dir.path(), args, &[]),
                &["broken.yaml"],
            );
        }
    }
}

#[test]
fn invalid_environment_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("AGENT_METRICS__PORT", "70000", "metrics.port: "),
        ("AGENT_METRICS__PORT", "abc", "metrics.port: "),
        ("AGENT_METRICS__PORT", "0", "metrics.port: "),
        ("AGENT_METRICS__PROT", "8080", "metrics.prot: unknown key"),
        ("AGENT_METRICS__PATH", "metrics", "metrics.path: "),
        ("AGENT_STORAGE__BACKEND", "postgres", "storage.backend: "),
        (
            "AGENT_STORAGE__REDIS__URL",
            "http://x",
            "storage.redis.url: ",
        ),
        (
            "AGENT_STORAGE__REDIS__TIMEOUT",
            "soon",
            "storage.redis.timeout: ",
        ),
        ("AGENT_NETWORK__LISTEN", "nowhere", "network.listen: "),
        (
            "AGENT_NETWORK__MAX_CONNECTIONS",
            "0",
            "network.max_connections: ",
        ),
        ("AGENT_LOG__LEVEL", "info,=[", "log.level: "),
    ];
    for (var, value, key) in cases {
        for args in [&["check-config"][..], &[]] {
            let what = format!("{var}={value} with {args:?}");
            assert_config_error(&what, run_agent(dir.path(), args, &[(var, value)]), &[key]);
        }
    }
    // The environment is checked even when the file is fine.
    std::fs::write(dir.path().join("ok.yaml"), "metrics:\n  port: 9000\n").unwrap();
    assert_config_error(
        "env over a valid file",
        run_agent(
            dir.path(),
            &["-c", "ok.yaml", "check-config"],
            &[("AGENT_METRICS__PORT", "0")],
        ),
        &["metrics.port: "],
    );
}

#[test]
fn missing_config_file_exits_2_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["-c", "/nonexistent/agent.yaml", "check-config"][..],
        &["check-config", "--config", "/nonexistent/agent.yaml"],
        &["--config", "/nonexistent/agent.yaml"],
    ] {
        assert_config_error(
            &format!("{args:?}"),
            run_agent(dir.path(), args, &[]),
            &["/nonexistent/agent.yaml"],
        );
    }
    // Relative to the working directory, as given.
    assert_config_error(
        "relative",
        run_agent(dir.path(), &["-c", "missing.yaml", "check-config"], &[]),
        &["cannot read config file missing.yaml"],
    );
}

#[test]
fn check_config_prints_the_effective_config_env_winning_over_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.yaml"),
        "node:\n  id: node-7\nnetwork:\n  peers: [\"10.0.0.2:7070\"]\nmetrics:\n  port: 9000\n  path: /m\nstorage:\n  backend: local\n",
    )
    .unwrap();
    let env = [
        ("AGENT_METRICS__PORT", "9100"),
        ("AGENT_STORAGE__BACKEND", "redis"),
        ("AGENT_STORAGE__REDIS__TIMEOUT", "500ms"),
        ("AGENT_NETWORK__MAX_CONNECTIONS", "2"),
    ];
    let mut want = Config::default();
    want.node.id = "node-7".into();
    want.network.peers = vec!["10.0.0.2:7070".into()];
    want.network.max_connections = 2;
    want.metrics.port = 9100;
    want.metrics.path = "/m".into();
    want.storage.backend = BackendKind::Redis;
    want.storage.redis.timeout = Duration::from_millis(500);

    let mut outputs = Vec::new();
    for args in [
        &["-c", "f.yaml", "check-config"][..],
        &["check-config", "--config", "f.yaml"],
    ] {
        let (code, stdout, stderr) = run_agent(dir.path(), args, &env);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        let got: Config =
            serde_yaml::from_str(&stdout).unwrap_or_else(|e| panic!("{e}:\n{stdout}"));
        assert_eq!(got, want, "{args:?}:\n{stdout}");
        for line in [
            "  id: node-7\n",
            "  max_connections: 2\n",
            "  port: 9100\n",
            "  path: /m\n",
            "  backend: redis\n",
            "    timeout: 500ms\n",
        ] {
            assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
        }
        outputs.push(stdout);
    }
    assert_eq!(outputs[0], outputs[1]);

    // The printed configuration is a valid file that means the same thing.
    std::fs::write(dir.path().join("printed.yaml"), &outputs[0]).unwrap();
    let (code, stdout, stderr) =
        run_agent(dir.path(), &["check-config", "-c", "printed.yaml"], &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(stdout, outputs[0]);
}

#[test]
fn check_config_defaults_and_the_default_file() {
    let dir = tempfile::tempdir().unwrap();
    // No file at all: the defaults.
    let (code, stdout, stderr) = run_agent(dir.path(), &["check-config"], &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(
        serde_yaml::from_str::<Config>(&stdout).unwrap(),
        Config::default()
    );

    // The repository's agent.yaml documents exactly the defaults.
    let repo_yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.yaml");
    let (code, from_repo, stderr) = run_agent(
        dir.path(),
        &["check-config", "-c", repo_yaml.to_str().unwrap()],
        &[],
    );
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(from_repo, stdout);

    // ./agent.yaml is read when no --config is given, and env still wins.
    std::fs::write(
        dir.path().join("agent.yaml"),
        "metrics:\n  port: 9001\nlog:\n  level: debug\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_agent(
        dir.path(),
        &["check-config"],
        &[("AGENT_LOG__LEVEL", "warn")],
    );
    assert_eq!((code, stderr.as_str()), (0, ""));
    let got: Config = serde_yaml::from_str(&stdout).unwrap();
    assert_eq!(got.metrics.port, 9001);
    assert_eq!(got.log.level, "warn");
    // ...and a broken ./agent.yaml is reported like a named one.
    std::fs::write(dir.path().join("agent.yaml"), "metrics:\n  port: 0\n").unwrap();
    assert_config_error(
        "./agent.yaml",
        run_agent(dir.path(), &["check-config"], &[]),
        &["metrics.port: "],
    );
}

#[test]
fn run_reads_the_config_file() {
    // The file sets a tiny line limit; the harness adds ports through env.
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("small.yaml"),
        "network:\n  max_message_bytes: 64\n",
    )
    .unwrap();
    let agent = Agent::start_with(AgentOptions {
        dir: Some(dir),
        args: vec!["--config".into(), "small.yaml".into()],
        ..AgentOptions::default()
    });
    let mut peer = agent.connect();
    assert_eq!(
        peer.request(r#"{"id":1,"op":"ping"}"#),
        r#"{"id":1,"ok":true}"#
    );
    peer.send_raw(
        format!(
            "{{\"id\":2,\"op\":\"ping\",\"pad\":\"{}\"}}\n",
            "x".repeat(64)
        )
        .as_bytes(),
    );
    assert_eq!(
        peer.read_line().unwrap(),
        r#"{"ok":false,"error":"message exceeds network.max_message_bytes (64 bytes); closing connection"}"#
    );
    peer.expect_closed();
}

/// Starts an agent whose `which` port is taken, and asserts it exits
/// non-zero with one `agent:` line naming the address.
fn assert_address_in_use(which: &str) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut opts = AgentOptions {
        wait_ready: false,
        ..AgentOptions::default()
    };
    match which {
        "peer" => opts.peer_port = Some(port),
        _ => opts.metrics_port = Some(port),
    }
    let mut agent = Agent::start_with(opts);
    let status = agent.wait_exit();
    let log = agent.log();
    assert!(!status.success(), "{which}: {status}:\n{log}");
    assert_eq!(status.code(), Some(1), "{which}:\n{log}");
    let addr = format!("127.0.0.1:{port}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("agent: ")).collect();
    assert_eq!(errors.len(), 1, "{which}: one error line:\n{log}");
    assert!(
        errors[0].contains(&addr),
        "{which}: {addr} not named:\n{log}"
    );
    assert!(errors[0].contains("in use"), "{which}:\n{log}");
    assert!(!log.contains("agent ready"), "{which}:\n{log}");
    assert!(!log.contains("panicked"), "{which}:\n{log}");
    drop(taken);
}

#[test]
fn peer_address_in_use_exits_naming_it() {
    assert_address_in_use("peer");
}

#[test]
fn metrics_address_in_use_exits_naming_it() {
    assert_address_in_use("metrics");
}

#[test]
fn a_config_file_with_no_keys_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.yaml", ""),
        (
            "comments.yaml",
            "# all commented out\n#metrics:\n#  port: 9100\n\n",
        ),
        ("braces.yaml", "{}\n"),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
        for args in [&["-c", name, "check-config"][..], &["-c", name]] {
            assert_config_error(
                &format!("{name} {args:?}"),
                run_agent(dir.path(), args, &[]),
                &[name, "holds no keys"],
            );
        }
    }
    // The file found by default, ./agent.yaml, too.
    std::fs::write(dir.path().join("agent.yaml"), "").unwrap();
    assert_config_error(
        "./agent.yaml",
        run_agent(dir.path(), &["check-config"], &[]),
        &["agent.yaml", "holds no keys"],
    );
    // Without a file the built-in defaults still serve.
    std::fs::remove_file(dir.path().join("agent.yaml")).unwrap();
    let (code, stdout, _) = run_agent(dir.path(), &["check-config"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("port: 8080"), "{stdout}");
}

#[test]
fn a_remote_write_url_with_a_password_is_refused_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_agent(
        dir.path(),
        &["check-config"],
        &[(
            "AGENT_METRICS__REMOTE_WRITE__URL",
            "https://pusher:hunter2@h/api/v1/write",
        )],
    );
    let line = assert_config_error(
        "credentials in remote_write.url",
        out,
        &["metrics.remote_write.url", "basic_auth"],
    );
    assert!(!line.contains("hunter2"), "{line}");
}
