//! A fixed team of threads for the many tiny parallel steps of decoding one token.
//!
//! # Why not rayon
//! A decode step of a small model is a few dozen products of tens of kilobytes each, a few
//! microseconds apart. Split over rayon, each one is handed to whichever pool thread wakes first,
//! and a pool thread that found no work goes to sleep within microseconds, so the next split pays
//! a futex wake-up. A [`Team`] instead keeps its helpers spinning between steps (then yielding,
//! then parked once the caller has gone quiet), and gives part `i` of every split to the same
//! thread. That second point matters as much as the latency: with the rows of every weight cut the
//! same way at every step, each core reads only its own half of the model, which then stays in its
//! own L2 (the embedded model's 2.7 MB of weights do not fit in one core's 2 MiB, and do in two).
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
/// How long an idle helper keeps yielding before it parks (a parked helper costs the next split
/// a wake-up of tens of microseconds; a yielding one costs other runnable threads nothing).
const YIELD_FOR: Duration = Duration::from_millis(2);

/// Where a split runs: the rayon pool or a [`Team`].
#[derive(Clone, Copy)]
pub(crate) enum Fork<'a> {
    /// The rayon global pool, as full passes use it: `rayon::current_num_threads()` parts, the
    /// calling thread taking the first.
    Rayon,
    /// A team: part `i` always on the same thread.
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

    /// Runs `f` on every item of `work` and returns when all are done: item `i` on part `i %
    /// parts` (the calling thread takes item 0), so a team gives the same item index to the same
    /// thread at every call.
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
                        // SAFETY: `Team::run` calls each part exactly once, and parts take
                        // disjoint slots (`i % parts == part`), so this call alone takes it.
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
// SAFETY: each slot is touched by exactly one thread (the part `i % parts`, see `Fork::each`),
// and the items are `Send`.
unsafe impl<T: Send> Sync for Slot<T> {}

/// The job of the current split, its lifetime erased: `Team::run` does not return (or unwind)
/// before every helper has finished with it.
type Job = *const (dyn Fn(usize) + Sync);

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

/// What the caller writes to start a split, on one cache line: a helper that sees the new epoch
/// finds the job on the line it just fetched.
struct Published {
    /// Bumped by the caller to publish a job.
    epoch: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
}

struct Shared {
    published: Line<Published>,
    /// Helpers that have not finished the current job.
    pending: Line<AtomicUsize>,
    /// Per helper: parked, or about to park (the caller then unparks it).
    sleeping: Vec<AtomicBool>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written by the caller only while no helper reads it (before the epoch is
// bumped, after `pending` is back to 0), and read by helpers between those two points; the rest
// is atomics.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer in `job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// `parts - 1` helper threads and the calling thread, running splits part `i` on thread `i`.
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
        let helpers = parts.max(1) - 1;
        let shared = Arc::new(Shared {
            published: Line(Published {
                epoch: AtomicUsize::new(0),
                job: UnsafeCell::new(None),
            }),
            pending: Line(AtomicUsize::new(0)),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut team = Team {
            shared: shared.clone(),
            helpers: Vec::with_capacity(helpers),
            busy: Mutex::new(()),
        };
        for i in 0..helpers {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{}", i + 1))
                .spawn(move || helper(&shared, i))?;
            // On an error above, dropping `team` stops and joins the helpers started so far.
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// Threads in the team, the caller included.
    pub fn parts(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(part)` for every part in `0..parts()`, part 0 on the calling thread, and returns
    /// when all have returned.
    ///
    /// # Panics
    /// When `f` panics on any thread (after every part has finished).
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
        s.pending.store(parts - 1, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        // SAFETY: no helper reads `job` now: `pending` was 0 (the previous `run` waited for it)
        // and the epoch has not moved since. The lifetime is erased; `wait` below keeps `f`
        // borrowed until every helper is done with it, on return and on unwind alike.
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
            *s.published.job.get() = Some(job);
        }
        s.published.epoch.fetch_add(1, Ordering::SeqCst);
        for (flag, h) in s.sleeping.iter().zip(&self.helpers) {
            if flag.load(Ordering::SeqCst) {
                h.thread().unpark();
            }
        }
        let wait = WaitForHelpers(s);
        f(0);
        drop(wait);
        // SAFETY: every helper is done with the job (`pending` is 0).
        unsafe { *s.published.job.get() = None };
        drop(guard);
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a thread of the decode team panicked (its message is above)");
        }
    }
}

/// Waits until every helper has finished the current job, when dropped (so also when part 0
/// unwinds: the job it borrows must outlive the helpers' use of it).
struct WaitForHelpers<'a>(&'a Shared);

impl Drop for WaitForHelpers<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.pending.load(Ordering::Acquire) != 0 {
            // A helper descheduled mid-job (or not yet moved off this core) needs the core more
            // than the spin does: after about 10 us (a pause is ~50 ns), yield it.
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

/// Helper `i` (part `i + 1`): waits for each new epoch, runs its part, reports done.
fn helper(s: &Shared, i: usize) {
    // The epoch the team was created with, not the current one: the first job may be published
    // before this thread gets to run.
    let mut seen = 0;
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        loop {
            let now = s.published.epoch.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                break;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock every 64 turns keeps it off the wake-up latency.
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
                // Announce the park, then look once more: a caller that bumped the epoch before
                // seeing the flag is caught by this load (both are SeqCst), one that bumps it
                // after will unpark us.
                s.sleeping[i].store(true, Ordering::SeqCst);
                if s.published.epoch.load(Ordering::SeqCst) == seen
                    && !s.stop.load(Ordering::SeqCst)
                {
                    std::thread::park();
                }
                s.sleeping[i].store(false, Ordering::SeqCst);
                spins = 0;
            }
        }
        // SAFETY: the caller wrote `job` before bumping the epoch we just acquired, and keeps it
        // (and what it borrows) alive until `pending` reaches 0, which we decrement last.
        let job = unsafe { (*s.published.job.get()).expect("a published job") };
        // SAFETY: as above.
        let run = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(i + 1) }));
        if run.is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_on_its_own_thread_every_time() {
        let team = Team::new(3, "test-team").unwrap();
        assert_eq!(team.parts(), 3);
        let names: Vec<Mutex<Vec<String>>> = (0..3).map(|_| Mutex::new(Vec::new())).collect();
        for _ in 0..200 {
            team.run(&|p| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                names[p].lock().unwrap().push(name);
            });
        }
        for (p, n) in names.iter().enumerate() {
            let n = n.lock().unwrap();
            assert_eq!(n.len(), 200, "part {p}");
            assert!(n.iter().all(|x| x == &n[0]), "part {p} moved: {n:?}");
            if p > 0 {
                assert_eq!(n[0], format!("test-team-{p}"));
            }
        }
        assert_ne!(names[0].lock().unwrap()[0], "test-team-1");
    }

    #[test]
    fn parked_helpers_wake_for_the_next_split() {
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
    fn a_panicking_part_panics_the_caller_after_every_part_finished() {
        let team = Team::new(2, "test-panic").unwrap();
        let finished = AtomicU64::new(0);
        for bad in [0usize, 1] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                team.run(&|p| {
                    if p == bad {
                        panic!("part {p} fails on purpose");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    finished.fetch_add(1, Ordering::Relaxed);
                });
            }));
            assert!(r.is_err(), "part {bad}'s panic reached the caller");
        }
        assert_eq!(finished.load(Ordering::Relaxed), 2);
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
