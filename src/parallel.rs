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

/// [`on_every_core`] starting the items of most `work` first, so that a large item taken last
/// does not leave the other cores idle (an export's Observation file is half its bytes);
/// the results still in the items' order.
pub fn on_every_core_longest_first<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> u64,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(work(&items[i])));
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in order.iter().zip(on_every_core(&order, |&i| f(&items[i]))) {
        results[*i] = r;
    }
    results
}

/// [`on_every_core`] of items taken by value, with their places.
pub fn on_every_core_owned<T: Send, R: Send>(items: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<Option<R>> {
    use std::sync::{Mutex, PoisonError};
    let cells: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let places: Vec<usize> = (0..cells.len()).collect();
    on_every_core(&places, |&i| {
        let item = cells[i].lock().unwrap_or_else(PoisonError::into_inner).take();
        item.map(|t| f(i, t))
    })
    .into_iter()
    .map(Option::flatten)
    .collect()
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
        let got = on_every_core_longest_first(&items, |&i| i % 7, |&i| i + 1);
        assert_eq!(got, items.iter().map(|&i| Some(i + 1)).collect::<Vec<_>>());
        let got = on_every_core_owned(items.iter().map(ToString::to_string).collect(), |at, s| format!("{at}:{s}"));
        assert_eq!(got, items.iter().map(|&i| Some(format!("{i}:{i}"))).collect::<Vec<_>>());
    }
}
