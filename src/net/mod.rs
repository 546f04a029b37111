//! Accepting connections, shared by both listeners: the peer listener
//! ([`crate::peer`]) and the metrics endpoint ([`crate::telemetry::http`]).
//!
//! Both face the same abuse (floods of silent connections, addresses that
//! should not reach them at all), so both admit the same way: the accept
//! loop with its bound on held sockets, the address allow-list, then the
//! connection cap with eviction. It is its own folder so that neither
//! listener imports the other. Ground floor: it imports nothing of the
//! agent.

mod accept;
mod admission;
mod text;

pub(crate) use accept::{accept, allowed, SocketBudget, SocketPermit};
pub use admission::{Admission, Admitted, ServedMark, Ticket, WhenAllServed};
pub(crate) use text::preview;
