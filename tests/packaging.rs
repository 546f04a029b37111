//! Packaging, as far as this machine can run it: the systemd unit passes
//! `systemd-analyze verify` and the agent really notifies systemd; the
//! Dockerfile's HEALTHCHECK command passes against a running agent (Docker
//! itself cannot run here) and its toolchain is the enforced one;
//! completions and the manual page are generated.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn agent_output(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .output()
        .expect("run agent");
    assert!(out.status.success(), "agent {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo("packaging/agent.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=",
        "ProtectSystem=strict",
        "StateDirectory=agent",
        "NoNewPrivileges=yes",
        "RestartPreventExitStatus=2",
    ] {
        assert!(unit.contains(line), "{line} missing from the unit");
    }
    let Some(analyze) = require_bin("systemd-analyze") else {
        return;
    };
    // The unit as installed, with ExecStart pointing at this build, and the
    // manual page its Documentation= names.
    let dir = tempfile::tempdir().unwrap();
    let installed = unit.replace("/usr/local/bin/agent", env!("CARGO_BIN_EXE_agent"));
    let path = dir.path().join("agent.service");
    std::fs::write(&path, installed).unwrap();
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    std::fs::write(man1.join("agent.1"), agent_output(&["man"])).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert_eq!(stderr, "", "warnings from systemd-analyze verify");
}

#[test]
fn agent_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut agent =
        Agent::start_with(AgentOptions::default().env("NOTIFY_SOCKET", socket_path.display()));
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY notification");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means serving: a request is answered at once.
    assert_eq!(agent.connect().put("k", "v")["ok"], true);
    assert!(agent.terminate().success());
    let n = socket.recv(&mut buf).expect("STOPPING notification");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
}

/// The HEALTHCHECK's CMD array from packaging/Dockerfile.
fn healthcheck_command() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(repo("packaging/Dockerfile")).unwrap();
    // Join continuation lines, then find the instruction.
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    let json = &line[line.find("CMD").expect("CMD") + 3..];
    serde_json::from_str(json.trim()).expect("CMD in exec (JSON) form")
}

#[test]
fn dockerfile_healthcheck_passes_against_a_running_agent_and_fails_without_one() {
    let dockerfile = std::fs::read_to_string(repo("packaging/Dockerfile")).unwrap();
    for needle in ["USER agent", "EXPOSE 7070 8080", "HEALTHCHECK", "AS build"] {
        assert!(
            dockerfile.contains(needle),
            "{needle} missing from the Dockerfile"
        );
    }
    let cmd = healthcheck_command();
    let agent = Agent::start();
    let run = |port: u16| {
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("AGENT_METRICS__PORT", port.to_string())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        run(agent.metrics_addr.port()),
        "healthy agent reported unhealthy"
    );
    assert!(!run(free_port()), "no agent, yet healthy");
}

/// `rust-version` from Cargo.toml: the toolchain CI checks with.
fn rust_version() -> String {
    let cargo = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version in Cargo.toml")
        .to_string()
}

#[test]
fn dockerfile_builds_with_the_rust_version_cargo_toml_names() {
    let dockerfile = std::fs::read_to_string(repo("packaging/Dockerfile")).unwrap();
    let from: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM rust:"))
        .collect();
    assert_eq!(from.len(), 1, "one rust build stage: {from:?}");
    let image_version = from[0].split('-').next().unwrap();
    assert_eq!(
        image_version,
        rust_version(),
        "packaging/Dockerfile builds FROM rust:{image_version}, Cargo.toml says \
         rust-version = {}: change both together",
        rust_version()
    );
    // The build stage builds what the x86_64 release archive ships.
    assert!(dockerfile.contains(
        "cargo build --release --locked --bin agent --target \"$(uname -m)-unknown-linux-musl\""
    ));
    let dist = std::fs::read_to_string(repo("packaging/dist.sh")).unwrap();
    assert!(dist
        .contains("cargo \"+$toolchain\" build --release --locked --bin agent --target \"$musl\""));
    assert!(dist.contains("musl=x86_64-unknown-linux-musl"));
}

#[test]
fn completions_and_manual_page_are_generated() {
    let bash = agent_output(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.bash");
    std::fs::write(&file, &bash).unwrap();
    // Valid bash that completes the subcommands.
    let ok = Command::new("bash").arg("-n").arg(&file).status().unwrap();
    assert!(ok.success());
    for sub in ["check-config", "hash-password", "completions", "man"] {
        assert!(bash.contains(sub), "{sub} not completed");
    }
    for shell in ["zsh", "fish"] {
        assert!(agent_output(&["completions", shell]).contains("check-config"));
    }
    let man = agent_output(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH agent 1"),
        "{man}"
    );
    assert!(man.contains("check\\-config"), "{man}");
    // A bad shell name is a command-line error (exit 2).
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn license_file_matches_cargo_toml() {
    let license = std::fs::read_to_string(repo("LICENSE")).expect("LICENSE");
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
    let cargo = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    assert!(cargo.contains("license = \"Apache-2.0\""));
}
