//! The node agent: keeps peer connections, answers their messages, stores
//! data locally (redb) or in Redis, and exposes its health as metrics.
//!
//! Where to start:
//! - [`app`]: startup, reloading on SIGHUP and graceful shutdown, wiring
//!   everything below.
//! - [`config`]: defaults, YAML file and `AGENT_*` environment, validated.
//! - [`peer`]: the peer side, from socket to reply: the listener, each
//!   connection's handler, the protocol, outbound peers.
//! - [`net`]: accepting connections, shared by the peer listener and the
//!   metrics endpoint: the accept loop, the allow-list, the connection cap.
//! - [`storage`]: the `Storage` trait, its backends and the metrics wrapper.
//! - [`telemetry`]: every metric's definition, exporter setup, `/metrics`.
//!
//! Imports run one way, downwards: `app` wires the others; `peer` imports
//! `net`, `storage` and `telemetry`; `telemetry` imports `net` (its
//! endpoint accepts as the peer listener does) and `config`; `storage`
//! imports `config`, and `telemetry` from its metrics wrapper only, never
//! the network side. At the bottom, `config`, `net` and the metric
//! catalog (`telemetry::defs`, with the label values in
//! `telemetry::labels`) import nothing of the agent; the protocol imports
//! only those labels, so that telemetry never imports the peer side.
//!
//! `unsafe` is denied in the crate and allowed on four functions only: the
//! recorder's thread-pointer read, the native histogram row lookup, the TSC
//! read and the SIOCOUTQ ioctl (the binary adds glibc's `mallopt`). Other system calls go through rustix's
//! safe wrappers.
#![deny(unsafe_code)]

pub mod app;
pub mod config;
pub mod net;
pub mod peer;
pub mod storage;
pub mod telemetry;

#[cfg(test)]
pub(crate) mod test_support;
