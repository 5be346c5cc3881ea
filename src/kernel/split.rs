//! Splitting a product over the rayon pool, and the size from which a split pays.
//!
//! # Why the size depends on the calling thread
//! A split called from a rayon pool thread runs its first part there and leaves the others to
//! workers that are usually still awake: two 20 us parts took 21.7 us (`xmoe-top bench
//! --quick`). Called from outside the pool, the caller hands every part over and blocks until a
//! worker wakes: an empty split cost about 6 us. The threads that run a model therefore run it on
//! the pool (`model::on_pool`), and the kernels split from sizes about ten times smaller there
//! ([`split_from`]).
//!
//! A decode "team" (helper threads that spun between a step's splits) gave the same cheap splits
//! before the model's threads joined the pool; from the pool, rayon with the team's thresholds
//! matched or beat it, with less code and no spinning helpers, so it was removed
//! (docs/benchmarks.md, "The decode team against rayon, settled").

/// True when the calling thread is a worker of the rayon pool: a split from it is cheap.
pub(crate) fn on_pool() -> bool {
    rayon::current_thread_index().is_some()
}

/// The size from which a split pays: `pooled` on a pool thread, `outside` elsewhere.
pub(crate) fn split_from(outside: usize, pooled: usize) -> usize {
    if on_pool() { pooled } else { outside }
}

/// Threads a split may use: the pool's.
pub(crate) fn parts() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` on every item of `work` and returns when all are done, the calling thread taking
/// the first item.
///
/// # Panics
/// When `f` panics on any thread.
pub(crate) fn each<T: Send, F: Fn(T) + Sync>(work: Vec<T>, f: F) {
    let f = &f;
    rayon::in_place_scope(|s| {
        let mut items = work.into_iter();
        let first = items.next();
        for item in items {
            s.spawn(move |_| f(item));
        }
        if let Some(item) = first {
            f(item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn each_runs_every_item_once_and_a_pool_thread_splits_from_the_smaller_size() {
        for n in [0usize, 1, 2, 7] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            each((0..n).collect(), |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{n}");
        }
        // The test thread is not a pool thread; a scope's body runs on one.
        assert!(!on_pool());
        assert_eq!(split_from(100, 10), 100);
        let inside = rayon::scope(|_| (on_pool(), split_from(100, 10)));
        assert_eq!(inside, (true, 10));
    }
}
