//! A pool of worker threads with a bounded queue.
//!
//! Admission is separate from submission ([`Pool::admit`] then [`Admission::submit`]) so that a
//! caller can answer 503 before it hands over a connection. Jobs tagged with a session key run
//! one at a time per key, in arrival order; a job waiting for its session does not hold a worker.
//!
//! Runs mostly wait (on an upstream, a child process or a slow client), so the pool is sized for
//! concurrency rather than cores: a few threads start with the pool, more start (up to `workers`)
//! when a queued job has waited [`GRACE`] with no thread free to take it, no thread has finished
//! a job meanwhile, and fewer workers are runnable than there are cores (so some are blocked, on
//! an upstream, a child or a client), and those extra threads exit after a while without work.
//! Threads that keep finishing jobs, or that are slow only because the CPU is busy, drain a burst
//! by themselves: more threads would only add switching, and every thread started keeps an
//! allocator arena after it exits. An address may be limited to a number of admitted runs so
//! that one client cannot hold every worker.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Work = Box<dyn FnOnce() + Send + 'static>;

thread_local! {
    /// The address the job running on this worker thread is counted against (`Some(..)` while a
    /// job runs and has not handed its place to a follow-up).
    static RUNNING: std::cell::Cell<Option<Option<IpAddr>>> = const { std::cell::Cell::new(None) };
    /// The job running on this worker thread gave its place back early ([`Pool::release_place`]).
    static RELEASED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads started with the pool and kept however idle: one per core, at least two and at most
/// [`MAX_CORE_THREADS`]. Every thread that ever ran a job keeps an allocator arena (and its
/// caches) for the life of the process, so a small machine keeps few.
fn core_threads(cores: usize) -> usize {
    cores.clamp(2, MAX_CORE_THREADS)
}
/// The most threads kept however idle.
const MAX_CORE_THREADS: usize = 4;
/// An extra thread with no work for this long exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// How long a queued job waits for a thread to come free before another thread is started for
/// it: far below what a person or an upstream notices, longer than a short run takes.
pub const GRACE: Duration = Duration::from_millis(5);
/// After the system refused a thread, the next attempt waits this long.
const SPAWN_RETRY: Duration = Duration::from_millis(100);

struct Job {
    session: Option<String>,
    ip: Option<IpAddr>,
    /// When the job became ready to run.
    queued: Instant,
    work: Work,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Job>,
    /// Sessions with a queued or running job → jobs waiting behind it.
    busy: HashMap<String, VecDeque<Job>>,
    /// Admitted jobs not yet started (ready, waiting on a session, or admitted but not submitted).
    pending: usize,
    /// Jobs being executed.
    running: usize,
    /// Worker threads alive, how many of them wait for work, and how many have been started and
    /// not yet looked for work.
    threads: usize,
    idle: usize,
    starting: usize,
    /// When a worker last finished a job.
    last_done: Option<Instant>,
    /// The spawner waits with nothing due (only a notification wakes it); while it waits for a
    /// due time it needs no notification, since a job queued later is never due earlier.
    spawner_parked: bool,
    /// Kernel thread ids of the workers (where the system tells them).
    tids: Vec<u32>,
    /// Admitted, unfinished runs per client address.
    per_ip: HashMap<IpAddr, usize>,
    shutdown: bool,
}

impl State {
    /// When another thread should start: once the oldest ready job that no free or starting
    /// thread will take has waited its grace and no worker has finished a job for as long, if
    /// there is such a job and room for another thread.
    fn spawn_due(&self, workers: usize, grace: Duration) -> Option<Instant> {
        if self.shutdown || self.threads >= workers {
            return None;
        }
        let covered = self.idle + self.starting;
        let oldest = self.ready.iter().skip(covered).map(|j| j.queued).min()?;
        Some(self.last_done.map_or(oldest, |d| d.max(oldest)) + grace)
    }

    /// A worker thread exits.
    fn leave(&mut self, tid: Option<u32>) {
        self.threads -= 1;
        if let Some(t) = tid {
            self.tids.retain(|&x| x != t);
        }
    }

    fn release_ip(&mut self, ip: Option<IpAddr>) {
        let Some(ip) = ip else { return };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
                if self.per_ip.is_empty() && self.per_ip.capacity() > 64 {
                    self.per_ip.shrink_to_fit();
                }
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// Wakes the thread that starts workers for jobs that waited too long.
    spawner: Condvar,
    workers: usize,
    /// Threads kept however idle ([`core_threads`], at most `workers`).
    core: usize,
    grace: Duration,
    /// CPUs this process may use.
    cores: usize,
    /// Changed by a config reload.
    max_queued: AtomicUsize,
    /// Changed by a config reload.
    max_per_ip: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// A job was made ready: wake a waiting worker, and the spawner if the job may need a thread
    /// started for it. Each notification is a system call even with no one waiting, so only
    /// threads that wait are notified (the counts are kept under the same lock the waiters take).
    fn wake(&self, s: std::sync::MutexGuard<'_, State>) {
        let worker = s.idle > 0;
        let spawner = s.spawner_parked && s.spawn_due(self.workers, self.grace).is_some();
        drop(s);
        if worker {
            self.cv.notify_one();
        }
        if spawner {
            self.spawner.notify_one();
        }
    }
}

/// The worker pool.
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "Pool(pending={}, running={}, threads={})", s.pending, s.running, s.threads)
    }
}

/// Why a run was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every worker is busy and the queue is full (503).
    Full,
    /// The client's address already has its share of runs (429).
    PerIp(usize),
}

/// A reserved place in the queue; dropping it unused gives the place back.
pub struct Admission {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
    used: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

/// Start a worker; false when the system refused a thread.
fn spawn(shared: &Arc<Shared>, s: &mut State) -> bool {
    let sh = shared.clone();
    let spawned = std::thread::Builder::new().name("gatelet-worker".into()).spawn(move || worker(&sh));
    match spawned {
        Ok(h) => {
            s.threads += 1;
            s.starting += 1;
            let mut hs = shared.handles.lock().unwrap_or_else(|e| e.into_inner());
            hs.retain(|h| !h.is_finished());
            hs.push(h);
            true
        }
        // Out of threads: the queued job waits for a running worker instead.
        Err(e) => {
            crate::log!(Warn, "could not start a worker thread: {e}");
            false
        }
    }
}

impl Pool {
    /// A pool of up to `workers` threads; at most `max_queued` runs wait beyond the ones being
    /// run, and one address may have at most `max_per_ip` runs admitted (0 = no limit).
    pub fn new(workers: usize, max_queued: usize, max_per_ip: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_grace(workers, max_queued, max_per_ip, GRACE, cores)
    }

    fn with_grace(workers: usize, max_queued: usize, max_per_ip: usize, grace: Duration, cores: usize) -> Self {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            spawner: Condvar::new(),
            workers,
            core: core_threads(cores).min(workers),
            grace,
            cores,
            max_queued: AtomicUsize::new(max_queued),
            max_per_ip: AtomicUsize::new(max_per_ip),
            handles: Mutex::new(Vec::new()),
        });
        {
            let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..shared.core {
                spawn(&shared, &mut s);
            }
        }
        if workers > shared.core {
            let sh = shared.clone();
            match std::thread::Builder::new().name("gatelet-pool".into()).spawn(move || spawner(&sh)) {
                Ok(h) => shared.handles.lock().unwrap_or_else(|e| e.into_inner()).push(h),
                // The core threads still run every job, one after another.
                Err(e) => crate::log!(Warn, "could not start the worker pool's spawner thread: {e}"),
            }
        }
        Pool { shared }
    }

    /// Reserve a place for one run, or `None` when the queue is full (answer 503).
    pub fn admit(&self) -> Option<Admission> {
        self.admit_from(None).ok()
    }

    /// Reserve a place for one run from `ip` (counted against its per-address limit).
    pub fn admit_from(&self, ip: Option<IpAddr>) -> Result<Admission, Refused> {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        // Counted against the pool's size, not against threads seen idle: a worker that is
        // still starting up or just finishing a job is capacity all the same.
        if s.shutdown || s.pending + s.running >= self.shared.workers + self.shared.max_queued.load(Ordering::Relaxed) {
            return Err(Refused::Full);
        }
        let limit = self.shared.max_per_ip.load(Ordering::Relaxed);
        if let Some(ip) = ip
            && limit > 0
        {
            let n = s.per_ip.entry(ip).or_insert(0);
            if *n >= limit {
                return Err(Refused::PerIp(limit));
            }
            *n += 1;
        }
        s.pending += 1;
        Ok(Admission { shared: self.shared.clone(), ip: ip.filter(|_| limit > 0), used: false })
    }

    /// Queue `work` as the continuation of the job running on this thread: it takes over that
    /// job's place (its count against the per-address limit ends when `work` ends), is never
    /// refused (the run was admitted), and with a `session` runs after earlier jobs of that
    /// session. For work that learns its session only once it runs (a request body parsed on a
    /// worker).
    pub fn follow_up(&self, session: Option<String>, work: impl FnOnce() + Send + 'static) {
        let ip = RUNNING.with(|r| r.take()).flatten();
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).pending += 1;
        Admission { shared: self.shared.clone(), ip, used: false }.submit(session, work);
    }

    /// The job running on this thread is done with its run and only has its answer left to
    /// deliver: its place (against the pool's size and its address's limit) is given back now,
    /// not when the job returns, so that a client that sends its next request the moment it has
    /// the answer finds the place free. Does nothing outside a job, or a second time.
    pub fn release_place(&self) {
        let Some(ip) = RUNNING.with(|r| r.take()) else { return };
        RELEASED.with(|r| r.set(true));
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.running -= 1;
        s.release_ip(ip);
    }

    /// Change how many runs may wait (config reload); runs already admitted keep their place.
    pub fn set_max_queued(&self, n: usize) {
        self.shared.max_queued.store(n, Ordering::Relaxed);
    }

    /// Change the per-address run limit (config reload); 0 = no limit.
    pub fn set_max_per_ip(&self, n: usize) {
        self.shared.max_per_ip.store(n, Ordering::Relaxed);
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.shared.workers
    }

    /// Runs admitted and not yet started.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).pending
    }

    /// Worker threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).threads
    }

    /// Stop accepting work, let queued jobs finish and join the workers.
    pub fn shutdown(&self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
        self.shared.cv.notify_all();
        self.shared.spawner.notify_all();
        let handles = std::mem::take(&mut *self.shared.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Admission {
    /// Queue `work`; with a `session`, it runs after earlier jobs of that session.
    pub fn submit(mut self, session: Option<String>, work: impl FnOnce() + Send + 'static) {
        self.used = true;
        let job = Job { session, ip: self.ip, queued: Instant::now(), work: Box::new(work) };
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = &job.session {
            if let Some(waiting) = s.busy.get_mut(k) {
                waiting.push_back(job);
                return;
            }
            // The session is now busy until this job (and any queued behind it) is done.
            s.busy.insert(k.clone(), VecDeque::new());
        }
        s.ready.push_back(job);
        self.shared.wake(s);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.used {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.pending -= 1;
            s.release_ip(self.ip);
        }
    }
}

/// Starts a worker for each ready job that has waited its grace with no thread to take it, while
/// some of the busy workers are blocked rather than computing.
fn spawner(shared: &Arc<Shared>) {
    let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    while !s.shutdown {
        s = match s.spawn_due(shared.workers, shared.grace) {
            None => {
                s.spawner_parked = true;
                let mut s = shared.spawner.wait(s).unwrap_or_else(|e| e.into_inner());
                s.spawner_parked = false;
                s
            }
            Some(due) => {
                let now = Instant::now();
                let wait = if due > now {
                    due - now
                } else {
                    // Read outside the lock: one small procfs file per worker.
                    let tids = s.tids.clone();
                    drop(s);
                    let computing = runnable(&tids, shared.cores);
                    s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    if computing >= shared.cores {
                        // The CPU, not waiting, holds the job up: look again after a grace.
                        shared.grace
                    } else if s.spawn_due(shared.workers, shared.grace).is_none_or(|d| d > Instant::now())
                        || spawn(shared, &mut s)
                    {
                        // Not due any more (taken meanwhile), or started: look again.
                        continue;
                    } else {
                        // Refused a thread: try again a while later rather than spin.
                        SPAWN_RETRY
                    }
                };
                shared.spawner.wait_timeout(s, wait).unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
}

/// This thread's kernel id, where `/proc` tells it.
fn own_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// How many of the threads `tids` of this process are running or waiting for a CPU (state `R`),
/// counted up to `enough`; a thread that cannot be read counts as blocked.
fn runnable(tids: &[u32], enough: usize) -> usize {
    tids.iter()
        .filter(|t| {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{t}/stat")).unwrap_or_default();
            // `pid (comm) S …`: the state follows the last parenthesis.
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('R'))
        })
        .take(enough)
        .count()
}

fn worker(shared: &Shared) {
    let mut started = false;
    let tid = own_tid();
    loop {
        let job = {
            let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if !started {
                started = true;
                s.starting -= 1;
                s.tids.extend(tid);
            }
            loop {
                if let Some(job) = s.ready.pop_front() {
                    s.pending -= 1;
                    s.running += 1;
                    break job;
                }
                if s.shutdown {
                    s.leave(tid);
                    return;
                }
                s.idle += 1;
                let (g, t) = shared.cv.wait_timeout(s, IDLE_EXIT).unwrap_or_else(|e| e.into_inner());
                s = g;
                s.idle -= 1;
                if t.timed_out() && s.ready.is_empty() && s.threads > shared.core {
                    s.leave(tid);
                    return;
                }
            }
        };
        let session = job.session;
        RUNNING.with(|r| r.set(Some(job.ip)));
        // A panicking run must not take the worker (or the session) with it; the job's own
        // guards close its connection when they are dropped during unwinding.
        let _ = catch_unwind(AssertUnwindSafe(job.work));
        // Taken when the job handed its place to a follow-up, or gave it back early.
        let ip = RUNNING.with(|r| r.take());
        let released = RELEASED.with(|r| r.replace(false));
        let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if !released {
            s.running -= 1;
        }
        s.last_done = Some(Instant::now());
        if let Some(ip) = ip {
            s.release_ip(ip);
        }
        if let Some(k) = session {
            let next = s.busy.get_mut(&k).and_then(VecDeque::pop_front);
            match next {
                Some(mut j) => {
                    j.queued = Instant::now();
                    s.ready.push_front(j);
                    shared.wake(s);
                }
                None => {
                    s.busy.remove(&k);
                }
            }
        }
    }
}

/// Inputs from this size on are bulk work: a large request body is read from its socket and
/// parsed, and a large prompt's words counted, holding one of the [`BulkLanes`].
pub const LARGE_INPUT: usize = 1024 * 1024;

/// At most `lanes` pieces of bulk work at once (a large body read from its socket a turn at a
/// time, parsed and turned into a run's messages; a large prompt's words counted): milliseconds
/// of CPU per MiB, so that on a small machine concurrent large uploads cannot take every core
/// from the event loop and from small requests. The others wait their turn, holding a worker but
/// no CPU.
#[derive(Debug)]
pub struct BulkLanes {
    lanes: usize,
    busy: Mutex<usize>,
    free: Condvar,
}

/// A lane held until dropped.
#[derive(Debug)]
pub struct BulkLane<'a>(&'a BulkLanes);

impl BulkLanes {
    /// Up to `lanes` (at least one) at once.
    pub fn new(lanes: usize) -> Self {
        BulkLanes { lanes: lanes.max(1), busy: Mutex::new(0), free: Condvar::new() }
    }

    /// The gateway's: one core fewer than the machine has (one on a two-core machine).
    pub fn global() -> &'static BulkLanes {
        static G: OnceLock<BulkLanes> = OnceLock::new();
        G.get_or_init(|| BulkLanes::new(std::thread::available_parallelism().map_or(1, |n| n.get() - 1)))
    }

    /// Wait for a free lane.
    pub fn take(&self) -> BulkLane<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= self.lanes {
            busy = self.free.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        BulkLane(self)
    }

    /// Lanes in use.
    pub fn busy(&self) -> usize {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for BulkLane<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.free.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn bulk_work_takes_turns_in_its_lanes() {
        let lanes = Arc::new(BulkLanes::new(2));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lanes, inside, most) = (lanes.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let _lane = lanes.take();
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{} at once", most.load(Ordering::SeqCst));
        assert_eq!(lanes.busy(), 0, "every lane given back");
        // A lane is given back when its holder panics, too.
        let l = lanes.clone();
        assert!(
            std::thread::spawn(move || {
                let _lane = l.take();
                panic!("parse failed")
            })
            .join()
            .is_err()
        );
        assert_eq!(lanes.busy(), 0);
        let zero = BulkLanes::new(0);
        drop(zero.take());
    }

    #[test]
    fn queue_bound_and_release() {
        let pool = Pool::new(1, 1, 0);
        std::thread::sleep(Duration::from_millis(50)); // let the worker go idle
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        pool.admit().unwrap().submit(None, move || {
            let _ = gate_rx.recv();
        });
        std::thread::sleep(Duration::from_millis(50));
        let a = pool.admit().expect("one queued place");
        assert!(pool.admit().is_none(), "queue is full");
        drop(a);
        assert!(pool.admit().is_some(), "a dropped admission frees its place");
        gate_tx.send(()).unwrap();
        pool.shutdown();
    }

    #[test]
    fn a_job_that_gives_its_place_back_early_lets_the_next_request_in_while_it_finishes() {
        let pool = Arc::new(Pool::new(1, 0, 1));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (released_tx, released_rx) = mpsc::channel::<()>();
        let p = pool.clone();
        pool.admit_from(Some(ip)).unwrap().submit(None, move || {
            p.release_place();
            p.release_place(); // a second call changes nothing
            released_tx.send(()).unwrap();
            let _ = gate_rx.recv(); // still delivering its answer
        });
        released_rx.recv().unwrap();
        // The pool's only place and the address's only run are free while the job still runs.
        let next = pool.admit_from(Some(ip)).expect("the place was given back");
        assert!(matches!(pool.admit_from(Some(ip)), Err(Refused::Full)), "and only that one");
        drop(next);
        gate_tx.send(()).unwrap();
        // Counted once: after the job ends there is exactly one place, and the worker is alive.
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let a = loop {
            if let Ok(a) = pool.admit_from(Some(ip)) {
                break a;
            }
            assert!(std::time::Instant::now() < deadline, "the place never came back");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(pool.admit_from(None).is_err(), "one place, not two");
        a.submit(None, move || done_tx.send(()).unwrap());
        done_rx.recv_timeout(Duration::from_secs(30)).expect("the worker runs the next job");
        // Outside a job it does nothing.
        pool.release_place();
        pool.shutdown();
    }

    #[test]
    fn a_follow_up_keeps_the_runs_place_against_the_per_address_limit() {
        let pool = Arc::new(Pool::new(2, 4, 1));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (staged_tx, staged_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let p = pool.clone();
        pool.admit_from(Some(ip)).unwrap().submit(None, move || {
            p.follow_up(Some("k".into()), move || {
                let _ = gate_rx.recv();
                done_tx.send(()).unwrap();
            });
            staged_tx.send(()).unwrap();
        });
        staged_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The first stage has ended; the follow-up still counts against the address.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.admit_from(Some(ip)).err(), Some(Refused::PerIp(1)));
        gate_tx.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while pool.admit_from(Some(ip)).is_err() {
            assert!(std::time::Instant::now() < end, "the place was never given back");
            std::thread::sleep(Duration::from_millis(10));
        }
        pool.shutdown();
    }

    #[test]
    fn a_pool_with_no_queue_admits_before_its_workers_have_started() {
        // Regression: capacity was counted from workers seen idle, so a request arriving while
        // the threads were still starting got 503 with maxQueuedRuns: 0.
        let pool = Pool::new(1, 0, 0);
        let a = pool.admit().expect("the one worker is capacity");
        assert!(pool.admit().is_none());
        let (tx, rx) = mpsc::channel();
        a.submit(None, move || tx.send(1).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        pool.shutdown();
    }

    #[test]
    fn same_session_runs_in_order_one_at_a_time() {
        let pool = Pool::new(4, 64, 0);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..8 {
            let log = log.clone();
            let done = done_tx.clone();
            pool.admit().unwrap().submit(Some("k".into()), move || {
                log.lock().unwrap().push(format!("start{i}"));
                std::thread::sleep(Duration::from_millis(5));
                log.lock().unwrap().push(format!("end{i}"));
                done.send(()).unwrap();
            });
        }
        for _ in 0..8 {
            done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let want: Vec<String> = (0..8).flat_map(|i| [format!("start{i}"), format!("end{i}")]).collect();
        assert_eq!(*log.lock().unwrap(), want);
        pool.shutdown();
    }

    #[test]
    fn an_address_gets_at_most_its_share_and_gets_it_back() {
        let pool = Pool::new(4, 4, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = pool.admit_from(Some(a)).unwrap();
        let a2 = pool.admit_from(Some(a)).unwrap();
        assert_eq!(pool.admit_from(Some(a)).unwrap_err(), Refused::PerIp(2));
        assert!(pool.admit_from(Some(b)).is_ok(), "another address is not limited by a");
        drop(a1);
        let (tx, rx) = mpsc::channel();
        pool.admit_from(Some(a)).unwrap().submit(None, move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // A finished job gives its place back (after the worker has noted the end).
        let t0 = std::time::Instant::now();
        let again = loop {
            match pool.admit_from(Some(a)) {
                Ok(x) => break x,
                Err(_) if t0.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("{e:?}"),
            }
        };
        drop((a2, again));
        pool.shutdown();
    }

    #[test]
    fn threads_start_on_demand_up_to_the_pool_size() {
        let pool = Pool::new(16, 0, 0);
        assert_eq!(pool.threads(), pool.shared.core);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let (started_tx, started_rx) = mpsc::channel();
        for _ in 0..10 {
            let (gate, started) = (gate.clone(), started_tx.clone());
            pool.admit().unwrap().submit(None, move || {
                started.send(()).unwrap();
                let _ = gate.lock().unwrap().recv();
            });
        }
        // All ten run at once: more threads than the core ones were started.
        for _ in 0..10 {
            started_rx.recv_timeout(Duration::from_secs(5)).expect("every job started");
        }
        assert!(pool.threads() >= 10 && pool.threads() <= 16, "{}", pool.threads());
        drop(gate_tx);
        pool.shutdown();
    }

    #[test]
    fn a_burst_taken_within_the_grace_starts_no_thread() {
        // Short jobs that the core threads take in time need no more threads.
        let pool = Pool::with_grace(16, 64, 0, Duration::from_secs(600), 2);
        let (tx, rx) = mpsc::channel();
        for i in 0..12 {
            let tx = tx.clone();
            pool.admit().unwrap().submit(None, move || tx.send(i).unwrap());
        }
        for _ in 0..12 {
            rx.recv_timeout(Duration::from_secs(10)).expect("every job ran");
        }
        assert_eq!(pool.threads(), core_threads(2));
        pool.shutdown();
    }

    #[test]
    fn a_thread_waits_for_a_grace_in_which_no_worker_finished() {
        let (t0, grace) = (Instant::now(), Duration::from_millis(5));
        let mut s = State { threads: 2, ..State::default() };
        s.ready.push_back(Job { session: None, ip: None, queued: t0, work: Box::new(|| {}) });
        assert_eq!(s.spawn_due(8, grace), Some(t0 + grace));
        // Workers that keep finishing jobs (busy, not blocked) put the new thread off.
        let later = t0 + Duration::from_millis(3);
        s.last_done = Some(later);
        assert_eq!(s.spawn_due(8, grace), Some(later + grace));
        // A free or starting thread will take the job; a full pool starts none.
        s.idle = 1;
        assert_eq!(s.spawn_due(8, grace), None);
        s.idle = 0;
        s.starting = 1;
        assert_eq!(s.spawn_due(8, grace), None);
        s.starting = 0;
        s.threads = 8;
        assert_eq!(s.spawn_due(8, grace), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn workers_that_compute_get_no_more_threads() {
        // One core here: the core workers spinning keep it busy, so queued jobs wait for them.
        let pool = Pool::with_grace(16, 64, 0, Duration::from_millis(10), 1);
        let core = core_threads(1);
        let (tx, rx) = mpsc::channel();
        for i in 0..core {
            let tx = tx.clone();
            pool.admit().unwrap().submit(None, move || {
                let end = Instant::now() + Duration::from_millis(300);
                while Instant::now() < end {
                    std::hint::spin_loop();
                }
                tx.send(i).unwrap();
            });
        }
        for i in 0..4 {
            let tx = tx.clone();
            pool.admit().unwrap().submit(None, move || tx.send(100 + i).unwrap());
        }
        for _ in 0..core + 4 {
            rx.recv_timeout(Duration::from_secs(20)).expect("every job ran");
        }
        assert_eq!(pool.threads(), core);
        pool.shutdown();
    }

    #[test]
    fn a_job_gets_a_thread_when_every_worker_is_blocked() {
        let pool = Pool::with_grace(8, 64, 0, Duration::from_millis(20), 2);
        let core = core_threads(2);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let (started_tx, started_rx) = mpsc::channel();
        for _ in 0..core {
            let (gate, started) = (gate.clone(), started_tx.clone());
            pool.admit().unwrap().submit(None, move || {
                started.send(()).unwrap();
                let _ = gate.lock().unwrap().recv();
            });
        }
        for _ in 0..core {
            started_rx.recv_timeout(Duration::from_secs(10)).expect("the core threads took the blocking jobs");
        }
        // Nothing else will free a thread: the spawner must start one once the grace is over.
        let (tx, rx) = mpsc::channel();
        pool.admit().unwrap().submit(None, move || tx.send(7).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).expect("the queued job ran"), 7);
        assert_eq!(pool.threads(), core + 1);
        drop(gate_tx);
        pool.shutdown();
    }

    #[test]
    fn a_panicking_job_keeps_the_worker() {
        let pool = Pool::new(1, 4, 0);
        pool.admit().unwrap().submit(Some("s".into()), || panic!("boom"));
        let (tx, rx) = mpsc::channel();
        pool.admit().unwrap().submit(Some("s".into()), move || tx.send(42).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
        pool.shutdown();
    }
}
