//! Work spread over every core for the offline checks and the import, which have a few large
//! items (an export's files) and nothing else to do meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f` of each item on every core, items taken in turn; the results in the items' order, `None`
/// where a worker thread died (a panic) before giving its result.
pub fn on_every_core<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<Option<R>> {
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(items.len().max(1));
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        for w in workers {
            for (i, r) in w.join().unwrap_or_default() {
                results[i] = Some(r);
            }
        }
    });
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order() {
        let items: Vec<u64> = (0..100).collect();
        let got = on_every_core(&items, |&i| i * i);
        assert_eq!(got, items.iter().map(|&i| Some(i * i)).collect::<Vec<_>>());
        assert!(on_every_core(&[] as &[u8], |&b| b).is_empty());
    }
}
