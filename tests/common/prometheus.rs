//! Prometheus on both sides: samples read from the agent's exposition text,
//! and a real `prometheus` server with its HTTP API.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, percent_encode, require_bin, try_http_get, wait_until, WAIT};

/// Reads one sample's value from exposition text: `name{labels} value`.
/// Labels must match exactly (order as the exporter renders them does not
/// matter). Format validity is promtool's job; this only reads numbers.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, got) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut got: Vec<String> = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    got.sort();
                    (n, got)
                }
                None => (series, Vec::new()),
            };
            (n == name && got == want)
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// Each series of a page (name and labels), and every HELP and TYPE line:
/// what two scrapes moments apart agree on.
pub fn page_shape(page: &str) -> Vec<String> {
    page.lines()
        .map(|l| match l.starts_with('#') {
            true => l.to_string(),
            false => l
                .rsplit_once(' ')
                .map_or(l, |(series, _)| series)
                .to_string(),
        })
        .collect()
}

/// `promtool check metrics` on an exposition page.
pub fn promtool_check_metrics(promtool: &std::path::Path, page: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// One sample's value, panicking with the page when it is missing.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
}

/// A real `prometheus` server on a free loopback port, with its config and
/// TSDB in a temporary directory owned by the test.
pub struct Prometheus {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: Option<tempfile::TempDir>,
    log: Arc<Mutex<String>>,
    /// What [`Prometheus::restart`] starts again.
    bin: PathBuf,
    flags: Vec<String>,
}

impl Prometheus {
    /// Writes `config` to `<dir>/prometheus.yml` and starts Prometheus on it
    /// (files the config names, such as rule files or file_sd targets, can
    /// be put in `dir` beforehand). Waits until `/-/ready` answers 200.
    /// None (with a printed reason) when `prometheus` is missing outside CI.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Option<Prometheus> {
        Self::start_with_flags(dir, config, &[])
    }

    /// `start_in` with more command-line flags, such as
    /// `--enable-feature=native-histograms`.
    pub fn start_with_flags(
        dir: tempfile::TempDir,
        config: &str,
        flags: &[&str],
    ) -> Option<Prometheus> {
        let bin = require_bin("prometheus")?;
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let mut dir = Some(dir);
        for attempt in 1.. {
            let mut prom = Self::spawn(&bin, dir.take().unwrap(), free_port(), flags);
            match prom.wait_ready() {
                Ok(()) => return Some(prom),
                // Another process took the port after free_port() chose it.
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    dir = prom.stop();
                }
                Err(log) => panic!("prometheus did not become ready:\n{log}"),
            }
        }
        unreachable!()
    }

    fn spawn(bin: &Path, dir: tempfile::TempDir, port: u16, flags: &[&str]) -> Prometheus {
        let mut child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(flags)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prometheus");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Prometheus {
            child: Some(child),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: Some(dir),
            log,
            bin: bin.to_path_buf(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Stops the server as an operator would (SIGTERM), keeping its
    /// directory and port for [`Prometheus::restart`].
    pub fn shut_down(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same directory (config and TSDB)
    /// and port, and waits until it is ready.
    pub fn restart(&mut self) {
        self.shut_down();
        let dir = self.dir.take().expect("a directory");
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let mut again = Self::spawn(&self.bin, dir, self.addr.port(), &flags);
        again
            .wait_ready()
            .unwrap_or_else(|log| panic!("prometheus did not restart:\n{log}"));
        std::mem::swap(self, &mut again);
        // `again` now holds the stopped server's nothing: no child, no dir.
    }

    /// Polls `/-/ready`; Err(log) if Prometheus exits or never gets ready.
    fn wait_ready(&mut self) -> Result<(), String> {
        // Startup replays the (empty) WAL and loads rules: slow on a loaded
        // machine, so allow twice the usual wait.
        let deadline = Instant::now() + 2 * WAIT;
        while Instant::now() < deadline {
            if matches!(try_http_get(self.addr, "/-/ready", "HTTP/1.0"), Ok(r) if r.status == 200) {
                return Ok(());
            }
            if !matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Give the reader thread a moment to collect the last lines.
        std::thread::sleep(Duration::from_millis(200));
        Err(self.log())
    }

    /// Kills the server; returns its directory for another attempt.
    fn stop(&mut self) -> Option<tempfile::TempDir> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dir.take()
    }

    /// The temporary directory holding the config and the TSDB.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("running").path()
    }

    /// `start_in` with a fresh temporary directory.
    pub fn start(config: &str) -> Option<Prometheus> {
        Self::start_in(tempfile::tempdir().expect("tempdir"), config)
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET on the HTTP API, parsed as JSON (whatever the status).
    pub fn api(&self, path_and_query: &str) -> serde_json::Value {
        let resp = try_http_get(self.addr, path_and_query, "HTTP/1.0")
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}\n{}", self.log()));
        serde_json::from_str(&resp.body).unwrap_or_else(|e| {
            panic!(
                "GET {path_and_query}: HTTP {} body is not JSON ({e}): {}",
                resp.status, resp.body
            )
        })
    }

    /// An instant query: `Ok(data)` when Prometheus answers `status: success`,
    /// `Err(whole answer)` otherwise.
    pub fn try_query(&self, expr: &str) -> Result<serde_json::Value, serde_json::Value> {
        let answer = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)));
        if answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(answer)
        }
    }

    /// Waits until the instant query returns exactly one series whose value
    /// (or, for `histogram_count` and the like, result) is `want`; returns
    /// that series, or panics with the last answer and the server's log.
    pub fn wait_for_one(&self, expr: &str, want: f64) -> serde_json::Value {
        let mut last = Vec::new();
        let reached = wait_until(|| {
            last = self.query(expr);
            last.len() == 1 && sample_number(&last[0]["value"][1]) == want
        });
        assert!(
            reached,
            "{expr} never reached {want}: {last:?}\n{}",
            self.log()
        );
        last.remove(0)
    }

    /// An instant query's result list, panicking unless it succeeds.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self
            .try_query(expr)
            .unwrap_or_else(|answer| panic!("query {expr:?} failed: {answer}"));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Prometheus {
    /// Waits until Prometheus holds, for every series of `selector`, a raw
    /// sample taken after `after` (Unix seconds), and returns each series'
    /// labels (without `__name__`) and latest value. Raw samples carry their
    /// scrape timestamps (federated ones keep the site's), so such a value
    /// includes everything the agent counted before `after`.
    pub fn latest_after(&self, selector: &str, after: f64) -> Vec<(BTreeMap<String, String>, f64)> {
        // Scrape timestamps may be aligned by a few milliseconds.
        let after = after + 0.05;
        let mut last = Vec::new();
        let ok = wait_until(|| {
            last = self.query(&format!("{selector}[1m]"));
            !last.is_empty()
                && last.iter().all(|s| {
                    s["values"]
                        .as_array()
                        .and_then(|v| v.last())
                        .is_some_and(|sample| sample[0].as_f64().unwrap() > after)
                })
        });
        assert!(
            ok,
            "no sample of {selector} after {after}: {last:?}\n{}",
            self.log()
        );
        last.iter()
            .map(|s| {
                let latest = &s["values"].as_array().unwrap().last().unwrap()[1];
                (series_labels(s), sample_number(latest))
            })
            .collect()
    }
}

/// Labels of a query result series, without `__name__`.
pub fn series_labels(series: &serde_json::Value) -> BTreeMap<String, String> {
    series["metric"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// A sample value as the HTTP API gives it (a string).
pub fn sample_number(v: &serde_json::Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a sample value: {v}"))
}

/// Now, in Unix seconds, to compare with sample timestamps.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The repository's docs/ directory.
pub fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

/// The text of `docs/<name>`.
pub fn read_doc(name: &str) -> String {
    let path = docs_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `promtool` with `args` in `dir`: (success, stdout and stderr).
pub fn run_promtool(promtool: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
