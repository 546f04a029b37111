//! The peer side: everything between a peer's socket and storage.
//!
//! - [`Server`] (`server.rs`): the peer listener. Admits connections (the
//!   allow-list and the connection cap from [`crate::net`], then the TLS
//!   handshake) and hands each to its own task.
//! - `conversation.rs`: one connection's handler, which owns what serving it
//!   needs and loops: read a frame, decode it, apply it, write the reply.
//! - `connection.rs`: line framing over one peer stream; `budget.rs`: the
//!   memory for large messages, shared by all connections.
//! - [`Handler`] (`handler.rs`): one request line into one reply line,
//!   shared by every connection; no sockets, so benchmarks drive it alone.
//! - [`protocol`]: the wire format, decoded and encoded. Public: it is the
//!   contract with peers, and tests check hostile input against it.
//! - `outbound.rs`: dialling and pinging the configured peers;
//!   `peers.rs`: peer connection accounting. Peer bytes reach a log only
//!   through `crate::net::preview`.
//!
//! The peer side imports storage, telemetry and [`crate::net`]; none of
//! them imports it, so it can change without touching them. As in
//! mini-redis, the files are private and the names the rest of the agent
//! uses are handed on here.

mod budget;
mod connection;
mod conversation;
mod handler;
mod outbound;
mod peers;
pub mod protocol;
mod server;

pub use budget::{Budget, Reservation};
pub use handler::{Decoded, Handler};
pub use outbound::{maintain, DialPolicy};
pub use peers::{PeerGuard, Peers};
pub use server::{PeerTlsAcceptor, Server};
