//! The label values that name why something failed, shared by the code
//! that decides the reason and the handles that count it.
//!
//! Each enum is owned here, in the metric catalog's layer, not by the
//! component that picks the value: the protocol decides a [`FailReason`]
//! and the peer listener a [`DenyReason`], but telemetry's handles create
//! one counter per value at startup, so they need the full list too. Were
//! the protocol to own [`FailReason`], telemetry would import the peer side
//! while the peer side imports telemetry: a loop between the two folders.
//! Here both import downwards. Like [`super::defs`], this file imports
//! nothing of the agent, so it stays at the bottom whoever uses it. The
//! strings are a contract with dashboards and alerts (`docs/metrics.md`):
//! never rename them.

/// Why a message was answered with an error: the `reason` label of
/// `messages_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// Not UTF-8, or not JSON.
    Parse,
    /// JSON, but not a request: not an object, a missing or ill-typed field, a bad key.
    Invalid,
    /// An `op` other than ping, get, put and delete.
    UnknownOp,
    /// Longer than `network.max_message_bytes`.
    TooLarge,
    /// Well-formed, but the storage backend failed.
    Storage,
}

impl FailReason {
    /// Every reason, in label order (and `as usize` order), to create one counter each.
    pub const ALL: [FailReason; 5] = [
        FailReason::Parse,
        FailReason::Invalid,
        FailReason::UnknownOp,
        FailReason::TooLarge,
        FailReason::Storage,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Parse => "parse",
            FailReason::Invalid => "invalid",
            FailReason::UnknownOp => "unknown_op",
            FailReason::TooLarge => "too_large",
            FailReason::Storage => "storage",
        }
    }
}

/// Why an inbound peer connection was closed before a request was read:
/// the `reason` label of `agent_peer_connections_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The address is outside `network.allowed_networks`.
    NotAllowed,
    /// TLS is on and the client presented no certificate.
    TlsNoCertificate,
    /// The client's certificate does not chain to `network.tls.ca_file`
    /// (another CA, expired, or not valid for client authentication).
    TlsBadCertificate,
    /// The handshake did not finish within `network.tls.handshake_timeout`.
    TlsTimeout,
    /// Any other handshake failure: not TLS at all, no common protocol
    /// version or cipher, or the client gave up.
    TlsError,
}

impl DenyReason {
    /// Every reason, in label order.
    pub const ALL: [DenyReason; 5] = [
        DenyReason::NotAllowed,
        DenyReason::TlsNoCertificate,
        DenyReason::TlsBadCertificate,
        DenyReason::TlsTimeout,
        DenyReason::TlsError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::TlsNoCertificate => "tls_no_certificate",
            DenyReason::TlsBadCertificate => "tls_bad_certificate",
            DenyReason::TlsTimeout => "tls_timeout",
            DenyReason::TlsError => "tls_error",
        }
    }
}
