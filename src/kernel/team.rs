//! A fixed team of threads for the many tiny parallel steps of decoding one token.
//!
//! # Why not rayon
//! A decode step of a small model is a few dozen products of tens of kilobytes each, a few
//! microseconds apart. Split over rayon, each one is handed to whichever pool thread wakes first,
//! a pool thread that found no work goes to sleep within microseconds, so the next split pays a
//! futex wake-up, and the calling thread (outside the pool) stays busy beside the pool's threads.
//! A [`Team`] is the caller plus helpers that spin between splits (then yield, then park), and a
//! split never waits for a helper to wake: the caller claims whatever parts the helpers have not.
//! Called from outside the pool, an empty split cost about 1 us on a team against about 6 on
//! rayon. Since the model's thread runs on the pool (`model::on_pool`), rayon's back-to-back
//! splits are about as cheap (two 20 us parts: 21.8 us against 21.1 on a team, `xmoe-top bench
//! --quick`), and whether the team still beats rayon in a decode step is not settled
//! (docs/benchmarks.md, "A decode team").
//!
//! [`Fork`] is what the kernels take: the rayon pool (full passes, and any caller without a team)
//! or a team (the lean decoder's).

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins (`spin_loop`) before it falls back to yielding its core.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long an idle helper keeps yielding before it parks (a yielding helper costs other runnable
/// threads nothing, but keeps its core busy when nothing else runs).
const YIELD_FOR: Duration = Duration::from_micros(200);

/// Where a split runs: the rayon pool or a [`Team`].
#[derive(Clone, Copy)]
pub(crate) enum Fork<'a> {
    /// The rayon global pool, as full passes use it: `rayon::current_num_threads()` parts, the
    /// calling thread taking the first.
    Rayon,
    /// A team: its helpers, awake between the splits of a step.
    Team(&'a Team),
}

impl Fork<'_> {
    /// Threads a split may use.
    pub(crate) fn parts(self) -> usize {
        match self {
            Fork::Rayon => rayon::current_num_threads(),
            Fork::Team(t) => t.parts(),
        }
    }

    /// `on_rayon` on the pool, `on_team` on a team: the size from which a split pays differs by
    /// an order of magnitude between the two.
    pub(crate) fn split_from(self, on_rayon: usize, on_team: usize) -> usize {
        match self {
            Fork::Rayon => on_rayon,
            Fork::Team(_) => on_team,
        }
    }

    /// Runs `f` on every item of `work` and returns when all are done: item `i` as part `i %
    /// parts` (the calling thread takes item 0).
    ///
    /// # Panics
    /// When `f` panics on any thread.
    pub(crate) fn each<T: Send, F: Fn(T) + Sync>(self, work: Vec<T>, f: F) {
        match self {
            Fork::Rayon => {
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
            Fork::Team(team) => {
                let slots: Vec<Slot<T>> = work
                    .into_iter()
                    .map(|t| Slot(UnsafeCell::new(Some(t))))
                    .collect();
                let parts = team.parts();
                team.run(&|part| {
                    for slot in slots.iter().skip(part).step_by(parts) {
                        // SAFETY: `Team::run` runs each part exactly once (on whichever thread
                        // claims it), and parts take disjoint slots (`i % parts == part`), so this
                        // call alone takes it.
                        if let Some(item) = unsafe { (*slot.0.get()).take() } {
                            f(item);
                        }
                    }
                });
            }
        }
    }
}

/// One part's work item, taken by that part only.
struct Slot<T>(UnsafeCell<Option<T>>);
// SAFETY: each slot is touched by one call only (part `i % parts`, run once; see `Fork::each`),
// and the items are `Send`.
unsafe impl<T: Send> Sync for Slot<T> {}

/// The job of the current split, its lifetime erased: `Team::run` does not return (or unwind)
/// before every part a helper claimed has finished.
type Job = *const (dyn Fn(usize) + Sync);

/// `next` when no split is open: far above any part index, so that claims fail without
/// overflowing.
const CLOSED: usize = usize::MAX / 2;

/// A value alone on its cache lines (two: the adjacent-line prefetcher pairs them), so that the
/// helpers' spinning on one does not contend with the caller's writes to another.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What a helper reads to find work, on one cache line.
struct Published {
    /// The next part to claim (part 0 is the caller's); [`CLOSED`] between splits.
    next: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
}

struct Shared {
    published: Line<Published>,
    /// Helpers between announcing a claim and finishing the part it got (if any).
    active: Line<AtomicUsize>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written by the caller only while the split is closed and no helper is
// `active` (so none can hold a claim), and read by a helper only after a successful claim, which
// the caller waits for; the rest is atomics.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer in `job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// `parts - 1` helper threads and the calling thread. A split's parts are claimed one at a time:
/// the caller runs part 0, then claims what the helpers have not, so a helper that is slow to wake
/// (or parked) never makes a split wait; it only leaves the caller more to do.
///
/// One split runs at a time: a second caller, or a part that splits again, runs every part
/// itself, in order (the results are the same; only the speed differs).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} parts)", self.parts())
    }
}

impl Team {
    /// A team of `parts` (at least 1): the caller and `parts - 1` helpers named
    /// `{name}-1`, `{name}-2`, ...
    ///
    /// # Errors
    /// When the OS refuses a thread.
    pub fn new(parts: usize, name: &str) -> std::io::Result<Self> {
        let parts = parts.max(1);
        let shared = Arc::new(Shared {
            published: Line(Published {
                next: AtomicUsize::new(CLOSED),
                job: UnsafeCell::new(None),
            }),
            active: Line(AtomicUsize::new(0)),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut team = Team {
            shared: shared.clone(),
            helpers: Vec::with_capacity(parts - 1),
            busy: Mutex::new(()),
        };
        for i in 1..parts {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || helper(&shared, parts))?;
            // On an error above, dropping `team` stops and joins the helpers started so far.
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// Threads in the team, the caller included.
    pub fn parts(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(part)` for every part in `0..parts()`, part 0 on the calling thread and each other
    /// part on whichever thread claims it first, and returns when all have returned.
    ///
    /// # Panics
    /// When `f` panics on any thread (after every part claimed by a helper has finished).
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let parts = self.parts();
        let guard = match self.busy.try_lock() {
            Ok(g) => g,
            // A part panicked in an earlier split: the team itself is sound (`run` waited).
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Busy (another caller, or a split inside a split): the caller does every part.
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..parts).for_each(f);
                return;
            }
        };
        if parts == 1 {
            f(0);
            return;
        }
        let s = &*self.shared;
        s.panicked.store(false, Ordering::Relaxed);
        // SAFETY: the split is closed and no helper is active (the previous `run` waited for
        // that), so no helper reads `job` now. The lifetime is erased; `close` below keeps `f`
        // borrowed until no helper can still be running it, on return and on unwind alike.
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
            *s.published.job.get() = Some(job);
        }
        s.published.next.store(1, Ordering::SeqCst);
        let close = CloseSplit(s);
        f(0);
        loop {
            let p = s.published.next.fetch_add(1, Ordering::SeqCst);
            if p >= parts {
                break;
            }
            f(p);
        }
        drop(close);
        // SAFETY: the split is closed and no helper is active.
        unsafe { *s.published.job.get() = None };
        drop(guard);
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a thread of the decode team panicked (its message is above)");
        }
    }
}

/// Closes the split when dropped (so also when a part unwinds on the caller): no claim succeeds
/// after it, and it waits until every helper that may hold one has finished its part.
struct CloseSplit<'a>(&'a Shared);

impl Drop for CloseSplit<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.published.next.swap(CLOSED, Ordering::SeqCst);
        // A helper that announced itself before the swap may hold a claim; one that announces
        // itself after it will find the split closed (both orders are SeqCst).
        let mut spins = 0u32;
        while s.active.load(Ordering::SeqCst) != 0 {
            // A helper descheduled mid-part needs the core more than the spin does: after about
            // 10 us (a pause is ~50 ns), yield it.
            if spins < 200 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in &self.helpers {
            h.thread().unpark();
        }
        for h in self.helpers.drain(..) {
            // A helper never panics outside `catch_unwind`; nothing to report if it did.
            let _ = h.join();
        }
    }
}

/// How long an idle helper parks at a time once it has spun and yielded: the caller never wakes
/// it (a split does not wait for helpers), so this bounds how late a parked helper joins a run of
/// splits, and costs an idle team about a thousand wake-ups a second.
const PARK_FOR: Duration = Duration::from_millis(1);

/// A helper: waits for an open split, claims parts of it while there are any, and goes back to
/// waiting.
fn helper(s: &Shared, parts: usize) {
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        while s.published.next.load(Ordering::Acquire) >= parts {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock every 64 turns keeps it off the latency of noticing a split.
            let waited = if spins.is_multiple_of(64) {
                idle.elapsed()
            } else {
                Duration::ZERO
            };
            if waited < SPIN_FOR {
                std::hint::spin_loop();
            } else if waited < YIELD_FOR {
                std::thread::yield_now();
            } else {
                std::thread::park_timeout(PARK_FOR);
            }
        }
        s.active.fetch_add(1, Ordering::SeqCst);
        let p = s.published.next.fetch_add(1, Ordering::SeqCst);
        if p < parts {
            // SAFETY: a successful claim: the caller wrote `job` before opening the split (this
            // claim read that store's value or a later claim's), and does not return before
            // `active` is back to 0, which we decrement last.
            let job = unsafe { (*s.published.job.get()).expect("an open split has a job") };
            // SAFETY: as above.
            let run = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(p) }));
            if run.is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_per_split_and_part_0_on_the_caller() {
        let team = Team::new(3, "test-team").unwrap();
        assert_eq!(team.parts(), 3);
        let me = std::thread::current().id();
        let mut helpers_ran = 0u64;
        for _ in 0..500 {
            let runs: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
            let on_helper = AtomicU64::new(0);
            team.run(&|p| {
                runs[p].fetch_add(1, Ordering::Relaxed);
                let here = std::thread::current();
                if p == 0 {
                    assert_eq!(here.id(), me, "part 0 left the caller");
                }
                if here.id() != me {
                    assert!(here.name().unwrap_or("").starts_with("test-team-"));
                    on_helper.fetch_add(1, Ordering::Relaxed);
                }
                // Long enough (50 us) for a spinning helper to claim a part meanwhile.
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_micros(50) {
                    std::hint::spin_loop();
                }
            });
            for (p, r) in runs.iter().enumerate() {
                assert_eq!(r.load(Ordering::Relaxed), 1, "part {p}");
            }
            helpers_ran += on_helper.load(Ordering::Relaxed);
        }
        // The helpers take part (they spin between back-to-back splits).
        assert!(helpers_ran > 0, "no part ran on a helper in 500 splits");
    }

    #[test]
    fn a_split_does_not_depend_on_parked_helpers() {
        let team = Team::new(2, "test-park").unwrap();
        let sum = AtomicU64::new(0);
        for round in 0..3u64 {
            // Longer than spinning and yielding together: the helper parks in between.
            std::thread::sleep(YIELD_FOR + Duration::from_millis(3));
            team.run(&|p| {
                sum.fetch_add(round * 10 + p as u64, Ordering::Relaxed);
            });
        }
        assert_eq!(sum.load(Ordering::Relaxed), 1 + (10 + 11) + (20 + 21));
    }

    #[test]
    fn each_runs_every_item_once_whatever_their_number() {
        let team = Team::new(2, "test-each").unwrap();
        for fork in [Fork::Rayon, Fork::Team(&team)] {
            let mut out = vec![0u32; 8];
            let work: Vec<(usize, &mut [u32])> = out.chunks_mut(4).enumerate().collect();
            fork.each(work, |(i, chunk)| chunk.fill(i as u32 + 1));
            assert_eq!(out, [1, 1, 1, 1, 2, 2, 2, 2]);
            let mut one = [0u32; 3];
            fork.each(vec![&mut one[..]], |c| c.fill(7));
            assert_eq!(one, [7; 3]);
            let mut many = vec![0u32; 5];
            let work: Vec<(usize, &mut u32)> = many.iter_mut().enumerate().collect();
            fork.each(work, |(i, v)| *v = i as u32 * 2);
            assert_eq!(many, [0, 2, 4, 6, 8]);
        }
    }

    #[test]
    fn a_split_inside_a_split_and_a_second_caller_run_every_part_themselves() {
        let team = Arc::new(Team::new(2, "test-nest").unwrap());
        let count = AtomicU64::new(0);
        team.run(&|_| {
            team.run(&|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let team = team.clone();
                std::thread::spawn(move || {
                    let n = AtomicU64::new(0);
                    for _ in 0..100 {
                        team.run(&|p| {
                            n.fetch_add(p as u64 + 1, Ordering::Relaxed);
                        });
                    }
                    n.load(Ordering::Relaxed)
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.join().unwrap(), 300);
        }
    }

    #[test]
    fn a_panicking_part_panics_the_caller_after_the_helpers_parts_finished() {
        let team = Team::new(2, "test-panic").unwrap();
        let me = std::thread::current().id();
        for bad in [0usize, 1] {
            let started = AtomicBool::new(false);
            let finished = AtomicU64::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                team.run(&|p| {
                    if p == 1 {
                        started.store(true, Ordering::SeqCst);
                    }
                    if p == 0 {
                        // Let a helper claim part 1 (it may be parked for up to `PARK_FOR`).
                        let t0 = Instant::now();
                        while !started.load(Ordering::SeqCst) && t0.elapsed().as_secs() < 5 {
                            std::hint::spin_loop();
                        }
                    }
                    if p == bad {
                        panic!("part {p} fails on purpose");
                    }
                    if std::thread::current().id() != me {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }));
            assert!(r.is_err(), "part {bad}'s panic reached the caller");
            // The part that did not panic had finished when `run` unwound, even on a helper
            // sleeping 20 ms (part 1 when part 0 panics).
            assert_eq!(finished.load(Ordering::SeqCst), 1, "bad part {bad}");
        }
        // Still usable afterwards.
        let n = AtomicU64::new(0);
        team.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_team_of_one_runs_on_the_caller() {
        let team = Team::new(1, "test-one").unwrap();
        let me = std::thread::current().id();
        team.run(&|p| {
            assert_eq!(p, 0);
            assert_eq!(std::thread::current().id(), me);
        });
    }
}
