//! The node agent: keeps peer connections, answers their messages, stores
//! data locally (redb) or in Redis, and exposes its health as metrics.
//!
//! Where to start:
//! - [`app`]: startup and graceful shutdown, wiring everything below.
//! - [`config`]: defaults, YAML file and `AGENT_*` environment, validated.
//! - [`server`], [`connection`], [`handler`], [`protocol`]: the peer protocol
//!   from socket to reply; [`admission`]: the connection cap; [`budget`]:
//!   memory for large messages, shared by all connections.
//! - [`peers`]: peer accounting; [`outbound`]: dialling and pinging the
//!   configured peers; `peer_text`: peer bytes in logs, escaped, truncated
//!   and throttled.
//! - [`storage`]: the `Storage` trait, its backends and the metrics wrapper.
//! - [`telemetry`]: every metric's definition, exporter setup, `/metrics`.
//!
//! `unsafe` is denied in the crate and allowed on four functions only: the
//! recorder's thread-pointer read, the native histogram row lookup, the TSC
//! read and the SIOCOUTQ ioctl (the binary adds glibc's `mallopt`). Other system calls go through rustix's
//! safe wrappers.
#![deny(unsafe_code)]

pub mod admission;
pub mod app;
pub mod budget;
pub mod config;
pub mod connection;
pub mod handler;
pub(crate) mod net;
pub mod outbound;
pub(crate) mod peer_text;
pub mod peers;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod storage;
pub mod telemetry;
pub(crate) mod throttle;

#[cfg(test)]
pub(crate) mod test_support;
