//! A peer connection speaking the agent's line protocol over real TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::WAIT;

/// A peer connection speaking the line protocol.
pub struct Peer {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Peer {
    /// Polls with puts until one succeeds (the storage backend is back and
    /// the agent reconnected); returns how many failed before that, each
    /// checked to be a storage error.
    pub fn wait_for_recovery(&mut self) -> usize {
        let mut last = String::new();
        let mut failures = 0;
        let recovered = super::wait_until(|| {
            last = self.request(r#"{"id":"r","op":"put","key":"recovered","value":"yes"}"#);
            if last == r#"{"id":"r","ok":true}"# {
                return true;
            }
            assert!(
                last.starts_with(r#"{"id":"r","ok":false,"error":"storage "#),
                "{last}"
            );
            failures += 1;
            false
        });
        assert!(recovered, "the agent never recovered; last reply {last}");
        failures
    }

    pub fn connect(addr: SocketAddr) -> Peer {
        let stream = TcpStream::connect(addr).expect("connect to agent");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let writer = stream.try_clone().unwrap();
        Peer {
            reader: BufReader::new(stream),
            writer,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to agent");
    }

    /// Reads one reply line (without the newline); None on EOF.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_string()),
            Err(e) => panic!("reading reply: {e}"),
        }
    }

    /// Sends one request line and returns its reply.
    pub fn request(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\n").as_bytes());
        self.read_line().expect("agent closed the connection")
    }

    /// Sends a request and parses the reply as JSON.
    pub fn call(&mut self, req: serde_json::Value) -> serde_json::Value {
        let reply = self.request(&req.to_string());
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
    }

    pub fn put(&mut self, key: &str, value: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "put", "key": key, "value": value}))
    }

    pub fn get(&mut self, key: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "get", "key": key}))
    }

    pub fn delete(&mut self, key: &str) -> serde_json::Value {
        self.call(serde_json::json!({"op": "delete", "key": key}))
    }

    /// Known traffic, every reply checked so all of it was recorded: `puts`
    /// puts of `k0`, `k1`, … with value `v`; then `gets` gets and `deletes`
    /// deletes of keys already put; then `unknown` requests with an unknown op.
    pub fn known_traffic(&mut self, puts: usize, gets: usize, deletes: usize, unknown: usize) {
        for i in 0..puts {
            assert_eq!(self.put(&format!("k{i}"), "v")["ok"], true);
        }
        for i in 0..gets {
            assert_eq!(self.get(&format!("k{i}"))["value"], "v");
        }
        for i in 0..deletes {
            assert_eq!(self.delete(&format!("k{i}"))["deleted"], true);
        }
        for _ in 0..unknown {
            assert_eq!(self.call(serde_json::json!({"op": "fly"}))["ok"], false);
        }
    }

    /// Closes with a TCP reset instead of a FIN.
    pub fn reset(self) {
        linger_zero(&self.writer);
        drop(self);
    }

    /// Reads until the agent closes the connection; panics if data arrives
    /// instead or nothing happens within `WAIT`. Returns how long it took.
    /// A reset counts as closed too.
    pub fn expect_closed(&mut self) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        match self.reader.read(&mut buf) {
            Ok(0) => start.elapsed(),
            Ok(n) => panic!(
                "expected the agent to close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => start.elapsed(),
            Err(e) => panic!(
                "expected the agent to close, got error {e} after {:?}",
                start.elapsed()
            ),
        }
    }

    /// Sends a request and returns its reply and how long the round trip took.
    pub fn timed_request(&mut self, line: &str) -> (String, Duration) {
        let start = Instant::now();
        let reply = self.request(line);
        (reply, start.elapsed())
    }
}

/// Sets SO_LINGER to 0 so that closing sends RST.
fn linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
