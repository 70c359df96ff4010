//! Work spread over the machine's cores, for the passes that see every
//! entry of a cluster: the tree's scan, the index of its placements and the
//! plan of every group.
//!
//! Plain scoped threads: the work is all there before it starts, so there is
//! nothing to schedule but which thread takes the next chunk
//! ([`in_parallel`]) or which share of the keys is whose ([`in_shares`]).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Entries handed to a thread at a time.
pub const CHUNK: usize = 64;
/// At most this many threads share one pass.
const MAX_THREADS: usize = 4;

/// `items.iter().map(f).collect()`, on as many threads as there are cores
/// (at most four, and one for fewer than two chunks), the
/// results in the order of `items`. A panic in `f` is raised again here.
pub fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads().min(items.len().div_ceil(CHUNK));
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
            if start >= items.len() {
                return done;
            }
            let end = (start + CHUNK).min(items.len());
            done.push((start, items[start..end].iter().map(&f).collect::<Vec<R>>()));
        }
    };
    let mut chunks = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut chunks = work();
        for helper in helpers {
            match helper.join() {
                Ok(done) => chunks.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        chunks
    });
    chunks.sort_unstable_by_key(|(start, _)| *start);
    chunks
        .into_iter()
        .flat_map(|(_, results)| results)
        .collect()
}

/// `f(share, shares)` for each share, `shares` being the number of cores (at
/// most four), each on a thread of its own; the results in share
/// order. For work that splits by key rather than by entry: every share sees
/// every entry and keeps those whose key is its own. A panic in `f` is
/// raised again here.
pub fn in_shares<R: Send>(f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let shares = threads();
    if shares <= 1 {
        return vec![f(0, 1)];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let helpers: Vec<_> = (1..shares)
            .map(|share| scope.spawn(move || f(share, shares)))
            .collect();
        let mut results = vec![f(0, shares)];
        for helper in helpers {
            match helper.join() {
                Ok(result) => results.push(result),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    })
}

/// How many threads share a pass: the cores, at most [`MAX_THREADS`].
fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_parallel_keeps_the_order() {
        let items: Vec<usize> = (0..CHUNK * 9 + 1).collect();
        let doubled = in_parallel(&items, |i| i * 2);
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert!(in_parallel(&[] as &[usize], |i| *i).is_empty());
    }

    #[test]
    fn in_shares_gives_each_share_its_number_in_order() {
        let shares = in_shares(|share, shares| (share, shares));
        let n = shares.len();
        assert!((1..=MAX_THREADS).contains(&n));
        assert_eq!(shares, (0..n).map(|share| (share, n)).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "entry 300")]
    fn a_panic_in_a_worker_is_raised_in_the_caller() {
        let items: Vec<usize> = (0..CHUNK * 9).collect();
        in_parallel(&items, |&i| assert!(i != 300, "entry {i}"));
    }
}
