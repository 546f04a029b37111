//! Basic authentication for the metrics endpoint, against the bcrypt hashes
//! of `basic_auth_users` in the web config file.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check at cost 10:
//! docs/performance-history.md, "bcrypt checks"), which shapes the design,
//! as in the exporter-toolkit:
//! - a credential that verified once is remembered, so Prometheus's
//!   scrapes cost a comparison, not a bcrypt run;
//! - bcrypt runs off the async runtime, one check at a time, so a client
//!   guessing passwords costs the agent at most one core's worth of
//!   blocking-pool time and never stalls peers or the remembered scraper;
//! - an unknown user is checked against a dummy hash, so the response time
//!   does not tell which user names exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hyper::header::{HeaderMap, AUTHORIZATION};
use tokio::sync::Semaphore;

/// The credentials the endpoint accepts.
pub struct BasicAuth {
    /// User name to bcrypt hash.
    users: BTreeMap<String, String>,
    /// Per user, the last password that verified against the hash.
    verified: Mutex<HashMap<String, Vec<u8>>>,
    /// One bcrypt check at a time.
    bcrypt: Arc<Semaphore>,
    /// A hash at the configured users' cost that no password matches: the
    /// work done for an unknown user name. Made at startup: made on first
    /// need, the first unknown user's check took twice as long as later
    /// ones (docs/performance-history.md, "bcrypt checks"), which told
    /// that the name was unknown.
    dummy: Arc<str>,
}

impl BasicAuth {
    /// None when no users are configured (authentication is off).
    pub fn new(users: BTreeMap<String, String>) -> Option<Self> {
        if users.is_empty() {
            return None;
        }
        let cost = users
            .values()
            .next()
            .and_then(|h| h.parse::<bcrypt::HashParts>().ok())
            .map_or(bcrypt::DEFAULT_COST, |p| p.get_cost());
        let dummy = bcrypt::hash("no password matches this", cost).unwrap_or_default();
        Some(Self {
            users,
            verified: Mutex::new(HashMap::new()),
            bcrypt: Arc::new(Semaphore::new(1)),
            dummy: dummy.into(),
        })
    }

    /// Whether the request carries the credentials of a configured user.
    pub async fn check(&self, headers: &HeaderMap) -> bool {
        let Some((user, password)) = credentials(headers) else {
            return false;
        };
        let hash = self.users.get(&user).cloned();
        if self.remembered(&user, &password) {
            return true;
        }
        let Ok(_permit) = self.bcrypt.acquire().await else {
            return false;
        };
        // Another request may have verified the same credential meanwhile.
        if self.remembered(&user, &password) {
            return true;
        }
        let known = hash.is_some();
        let (pw, dummy) = (password.clone(), Arc::clone(&self.dummy));
        let ok = tokio::task::spawn_blocking(move || {
            let hash = hash.as_deref().unwrap_or(&dummy);
            bcrypt::verify(&pw, hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known;
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            verified.insert(user, password);
        }
        ok
    }

    fn remembered(&self, user: &str, password: &[u8]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(user)
            .is_some_and(|known| constant_time_eq(known, password))
    }
}

/// The user and password of a `Basic` Authorization header.
fn credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

/// Compares without an early exit, so timing does not reveal how much of a
/// guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn header(user: &str, password: &str) -> HeaderMap {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {token}")).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn accepts_only_the_right_password() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_string(), hash)].into()).unwrap();
        assert!(auth.check(&header("prom", "s3cret")).await);
        // Now remembered: still right, and a wrong one is still wrong.
        assert!(auth.check(&header("prom", "s3cret")).await);
        assert!(!auth.check(&header("prom", "s3cret!")).await);
        assert!(!auth.check(&header("prom", "")).await);
        assert!(!auth.check(&header("other", "s3cret")).await);
        assert!(!auth.check(&HeaderMap::new()).await);
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(!auth.check(&bearer).await);
    }

    /// The first unknown user costs one bcrypt run, as every later one
    /// does: the dummy exists before any request, at the users' cost.
    #[test]
    fn the_dummy_hash_is_made_at_startup_at_the_users_cost() {
        let hash = bcrypt::hash("s3cret", 5).unwrap();
        let auth = BasicAuth::new([("prom".to_string(), hash)].into()).unwrap();
        let parts: bcrypt::HashParts = auth.dummy.parse().expect("a bcrypt hash");
        assert_eq!(parts.get_cost(), 5);
        assert!(!bcrypt::verify("s3cret", &auth.dummy).unwrap());
    }

    #[test]
    fn no_users_means_no_authentication() {
        assert!(BasicAuth::new(BTreeMap::new()).is_none());
    }
}
