//! A fixed pool of worker threads with a bounded queue.
//!
//! Admission is separate from submission ([`Pool::admit`] then [`Admission::submit`]) so that a
//! caller can answer 503 before it hands over a connection. Jobs tagged with a session key run
//! one at a time per key, in arrival order; a job waiting for its session does not hold a worker.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Work = Box<dyn FnOnce() + Send + 'static>;

struct Job {
    session: Option<String>,
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
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    workers: usize,
    /// Changed by a config reload.
    max_queued: AtomicUsize,
}

/// The worker pool.
pub struct Pool {
    shared: Arc<Shared>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "Pool(pending={}, running={})", s.pending, s.running)
    }
}

/// A reserved place in the queue; dropping it unused gives the place back.
pub struct Admission {
    shared: Arc<Shared>,
    used: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

impl Pool {
    /// Start `workers` threads; at most `max_queued` runs wait beyond the ones being run.
    pub fn new(workers: usize, max_queued: usize) -> Self {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            workers,
            max_queued: AtomicUsize::new(max_queued),
        });
        let handles = (0..workers)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("gatelet-worker-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawn worker thread")
            })
            .collect();
        Pool { shared, handles: Mutex::new(handles) }
    }

    /// Reserve a place for one run, or `None` when the queue is full (answer 503).
    pub fn admit(&self) -> Option<Admission> {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        // Counted against the pool's size, not against threads seen idle: a worker that is
        // still starting up or just finishing a job is capacity all the same.
        if s.shutdown || s.pending + s.running >= self.shared.workers + self.shared.max_queued.load(Ordering::Relaxed) {
            return None;
        }
        s.pending += 1;
        Some(Admission { shared: self.shared.clone(), used: false })
    }

    /// Change how many runs may wait (config reload); runs already admitted keep their place.
    pub fn set_max_queued(&self, n: usize) {
        self.shared.max_queued.store(n, Ordering::Relaxed);
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.shared.workers
    }

    /// Runs admitted and not yet started.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).pending
    }

    /// Stop accepting work, let queued jobs finish and join the workers.
    pub fn shutdown(&self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
        self.shared.cv.notify_all();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Admission {
    /// Queue `work`; with a `session`, it runs after earlier jobs of that session.
    pub fn submit(mut self, session: Option<String>, work: impl FnOnce() + Send + 'static) {
        self.used = true;
        let job = Job { session, work: Box::new(work) };
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
        drop(s);
        self.shared.cv.notify_one();
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.used {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.pending -= 1;
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(job) = s.ready.pop_front() {
                    s.pending -= 1;
                    s.running += 1;
                    break job;
                }
                if s.shutdown {
                    return;
                }
                s = shared.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        let session = job.session;
        // A panicking run must not take the worker (or the session) with it; the job's own
        // guards close its connection when they are dropped during unwinding.
        let _ = catch_unwind(AssertUnwindSafe(job.work));
        let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.running -= 1;
        if let Some(k) = session {
            let next = s.busy.get_mut(&k).and_then(VecDeque::pop_front);
            match next {
                Some(j) => {
                    s.ready.push_front(j);
                    drop(s);
                    shared.cv.notify_one();
                }
                None => {
                    s.busy.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn queue_bound_and_release() {
        let pool = Pool::new(1, 1);
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
    fn a_pool_with_no_queue_admits_before_its_workers_have_started() {
        // Regression: capacity was counted from workers seen idle, so a request arriving while
        // the threads were still starting got 503 with maxQueuedRuns: 0.
        let pool = Pool::new(1, 0);
        let a = pool.admit().expect("the one worker is capacity");
        assert!(pool.admit().is_none());
        let (tx, rx) = mpsc::channel();
        a.submit(None, move || tx.send(1).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        pool.shutdown();
    }

    #[test]
    fn same_session_runs_in_order_one_at_a_time() {
        let pool = Pool::new(4, 64);
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
    fn a_panicking_job_keeps_the_worker() {
        let pool = Pool::new(1, 4);
        pool.admit().unwrap().submit(Some("s".into()), || panic!("boom"));
        let (tx, rx) = mpsc::channel();
        pool.admit().unwrap().submit(Some("s".into()), move || tx.send(42).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
        pool.shutdown();
    }
}
