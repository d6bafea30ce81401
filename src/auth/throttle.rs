//! Login throttling: failed sign-ins are counted per account and per source address in a
//! fixed window; past the limit, further attempts for that account or from that source are
//! refused (429 with `Retry-After`) without checking the password. Counters are per node and in
//! memory (a cluster of n nodes gives an attacker n times the budget; a restart resets them).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Failures allowed per account and per source within [`WINDOW_S`].
pub const MAX_FAILURES: u32 = 10;
/// The window, in seconds, from the first failure.
pub const WINDOW_S: i64 = 900;
/// Counters kept at most (beyond, new keys are not tracked until old windows expire).
const MAX_KEYS: usize = 100_000;

#[derive(Default)]
pub struct Throttle {
    /// key → (failures, window start)
    failures: Mutex<HashMap<String, (u32, i64)>>,
}

/// The counter keys of one attempt.
pub fn keys(username: &str, source: Option<std::net::IpAddr>) -> Vec<String> {
    let mut k = vec![format!("account:{username}")];
    if let Some(ip) = source {
        k.push(format!("source:{ip}"));
    }
    k
}

impl Throttle {
    /// Seconds until the attempt may be made, when some key is over the limit.
    pub fn blocked(&self, keys: &[String], now: i64) -> Option<i64> {
        let f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .filter_map(|k| f.get(k))
            .filter(|(n, start)| *n >= MAX_FAILURES && now < start + WINDOW_S)
            .map(|(_, start)| start + WINDOW_S - now)
            .max()
    }

    pub fn failed(&self, keys: &[String], now: i64) {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if f.len() >= MAX_KEYS {
            f.retain(|_, (_, start)| now < *start + WINDOW_S);
        }
        for k in keys {
            let room = f.len() < MAX_KEYS;
            match f.get_mut(k) {
                Some((n, start)) if now < *start + WINDOW_S => *n += 1,
                Some(entry) => *entry = (1, now),
                None if room => {
                    f.insert(k.clone(), (1, now));
                }
                None => {}
            }
        }
    }

    /// A successful sign-in clears its account's failures (not its source's).
    pub fn succeeded(&self, username: &str) {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(&format!("account:{username}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_failures_then_refused_until_the_window_ends() {
        let t = Throttle::default();
        let alice = keys("alice", Some([10, 0, 0, 1].into()));
        for _ in 0..MAX_FAILURES {
            assert_eq!(t.blocked(&alice, 100), None);
            t.failed(&alice, 100);
        }
        assert_eq!(t.blocked(&alice, 160), Some(WINDOW_S - 60));
        // The account from elsewhere, and the source for another account.
        assert!(t.blocked(&keys("alice", Some([10, 0, 0, 2].into())), 160).is_some());
        assert!(t.blocked(&keys("bob", Some([10, 0, 0, 1].into())), 160).is_some());
        assert_eq!(t.blocked(&keys("bob", Some([10, 0, 0, 2].into())), 160), None);
        assert_eq!(t.blocked(&alice, 100 + WINDOW_S), None, "the window ends");
        t.failed(&alice, 100 + WINDOW_S);
        assert_eq!(t.blocked(&alice, 100 + WINDOW_S), None, "a new window");
    }
}
