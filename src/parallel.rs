//! Work on a slice spread over the machine's cores, for the passes that see
//! every entry of a cluster: the tree's scan and the plan of every group.
//!
//! Plain scoped threads: the work is a map over a slice that is all there
//! before it starts, so there is nothing to schedule but which thread takes
//! the next chunk.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Entries handed to a thread at a time.
pub const CHUNK: usize = 64;
/// At most this many threads share one map.
const MAX_THREADS: usize = 4;

/// `items.iter().map(f).collect()`, on as many threads as there are cores
/// (at most [`MAX_THREADS`], and one for fewer than two chunks), the
/// results in the order of `items`. A panic in `f` is raised again here.
pub fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
        .min(items.len().div_ceil(CHUNK));
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
    #[should_panic(expected = "entry 300")]
    fn a_panic_in_a_worker_is_raised_in_the_caller() {
        let items: Vec<usize> = (0..CHUNK * 9).collect();
        in_parallel(&items, |&i| assert!(i != 300, "entry {i}"));
    }
}
