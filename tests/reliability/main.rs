//! Reliability of the real agent binary under abuse, load and failure, over
//! real loopback sockets (docs/reliability.md records the measured figures):
//!
//! 1. metrics port abuse: thousands of idle or half-sent connections;
//! 2. hostile peer input: every kind of bad message, stalled and
//!    non-reading peers, connections beyond the limit;
//! 3. exact counts with many pipelining peers and connection churn;
//! 4. Redis outages under load;
//! 5. `kill -9` under concurrent writes loses no acknowledged put;
//! 6. SIGTERM under load: answers what it read, exits 0 in time, loses nothing;
//! 7. process CPU and memory metrics agree with /proc under load;
//! 8. `/ready` and `agent_storage_up` follow Redis without traffic;
//! 9. an empty or foreign database file stops startup and is left alone;
//! 10. a full disk fails puts, keeps gets, and writes resume once space is
//!     freed, with nothing acknowledged lost;
//! 11. a panic on a damaged page is caught, counted and fails the store;
//! 12. a database file deleted or replaced under the agent is noticed and
//!     no put is acknowledged into it;
//! 13. idle connections cannot lock peers out, and close after the idle timeout;
//! 14. memory stays bounded with 400 peers and 1 MiB messages, and returns;
//! 15. a misbehaving outbound peer is redialled with backoff and cannot
//!     flood the log;
//! 16. SIGUSR1, SIGUSR2 and SIGQUIT are logged and ignored.
//!
//! Each test prints its figures (`cargo test --test reliability -- --nocapture`).
//!
//! One module per section of docs/reliability.md (section 17, protocol
//! details, is tested in tests/protocol.rs); `support` holds what the
//! sections share. One test binary, so one link.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod damaged_page;
mod database_file;
mod exact_counts;
mod full_disk;
mod hostile_input;
mod idle_connections;
mod memory;
mod metrics_port;
mod outbound_peer;
mod process_metrics;
mod readiness;
mod redis_outage;
mod signals;
mod writers;
