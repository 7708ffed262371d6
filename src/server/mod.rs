//! The mio event loop: accepts connections, moves bytes between sockets and the HTTP codecs,
//! fires timers and hands runs to the worker pool.
//!
//! Timers are deadlines: every connection files its next one (from its [`conn::HttpConn`] or its
//! WebSocket session) in one ordered set, the loop sleeps until the soonest, and only
//! connections whose deadline passed or whose socket is ready are touched.
//!
//! mio is edge-triggered: after a readiness event we read or write until `WouldBlock`, and
//! spurious events are harmless. A streaming run *owns* its connection's socket while it runs;
//! the loop then only watches a duplicate of the descriptor for hang-up (to cancel the run) and
//! takes the socket back through a channel and a [`Waker`] when the run ends.
//!
//! Nothing slow happens here: a chat body from [`LARGE_INPUT`] on is not read by the
//! loop either. The loop admits the request from its head and lends the run the connection's
//! input (the socket is registered for writability only meanwhile), and the run
//! copies the body out of the kernel on a worker.

pub mod access;
pub mod budget;
pub mod conn;
pub mod cors;
pub mod exchange;
pub mod handler;
mod outbox;
pub mod stream;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::agent::CancelToken;
use crate::agent::pool::{LARGE_INPUT, Refused};
use crate::gateway::Gateway;
use crate::http::framing::Framing;
use crate::http::head::Head;
use crate::http::response::{HttpDate, Response};
use crate::openai::ApiError;
use crate::{rpc, ws};
use conn::{Action, HttpConn, State, Timeouts};
use handler::HeadAction;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNAL: Token = Token(usize::MAX);
const RELOAD: Token = Token(usize::MAX - 1);
/// Pipelined bytes buffered while a run is in flight; the rest waits in the kernel.
const READ_CAP: usize = 64 * 1024;
/// Responses queued for a client that is not reading them: beyond this, no more requests are
/// read or parsed until it catches up, so TCP holds a pipelining client back instead of the
/// server buffering an answer to everything it sends.
const WRITE_CAP: usize = 64 * 1024;
/// How long a connection may take to read its final response before it is dropped.
const LINGER: Duration = Duration::from_secs(10);
/// Connections accepted per loop turn, so that a connect flood cannot keep the loop from the
/// sockets it already has (the rest are accepted on the next turn).
const ACCEPT_BUDGET: usize = 256;
/// Bytes read from one connection per loop turn before the other connections get theirs.
const READ_BUDGET: usize = 256 * 1024;
/// Longest the loop sleeps with connections open and no timer due: it then gives memory back
/// after a burst ([`Server::shrink`]).
const SHRINK_EVERY: Duration = Duration::from_secs(5);
/// Worker messages handled per loop turn.
const DONE_BUDGET: usize = 1024;
/// Send buffer asked for a socket that carries runs' answers (Linux doubles it).
const STREAM_SNDBUF: usize = 256 * 1024;
/// Bytes a connection's runs may have on their way to its socket (queued for the loop, or
/// framed and unsent) before they hold back their mergeable events (see [`Notifier::congested`]).
pub const OUTBOUND_BOUND: usize = 256 * 1024;

/// A message from a worker (or a WebSocket run) back to the loop.
#[derive(Debug)]
pub enum Done {
    /// An answer for the loop to write (or close, when `None`): a non-streaming run's, or a
    /// request's that did not become a run.
    Respond {
        /// Connection slot.
        slot: usize,
        /// Connection id (slots are reused).
        id: u64,
        /// The response, `None` when the client is gone.
        resp: Option<Response>,
        /// HEAD request.
        head_only: bool,
        /// Close after writing.
        close: bool,
        /// For the access-log record.
        info: Option<Box<access::RunInfo>>,
    },
    /// A run wrote its answer to the socket itself (a stream), or could not: the connection is
    /// the loop's again.
    Streamed {
        /// Connection slot.
        slot: usize,
        /// Connection id.
        id: u64,
        /// The connection can carry another request (else it is closed).
        keep: bool,
        /// The answer's status, for the access log.
        status: u16,
        /// Bytes of the answer, for the access log.
        written: u64,
        /// For the access-log record.
        info: Option<Box<access::RunInfo>>,
    },
    /// A run has read the rest of the body the loop lent it: the connection's input is the
    /// loop's again (an end of input now cancels the run; later bytes wait for its end).
    BodyRead {
        /// Connection slot.
        slot: usize,
        /// Connection id.
        id: u64,
    },
    /// Bytes for a WebSocket connection.
    Ws {
        /// Connection slot.
        slot: usize,
        /// Connection id.
        id: u64,
        /// What to send.
        msg: rpc::Outgoing,
    },
}

/// Bytes on their way from a connection's runs to its socket.
#[derive(Debug, Default)]
struct Backlog {
    /// Sent by producers, not yet taken by the loop.
    queued: AtomicUsize,
    /// Framed by the loop, not yet written to the socket.
    unsent: AtomicUsize,
}

/// How workers reach the loop. A WebSocket connection's copy also counts the bytes its runs have
/// on the way, so that they can hold back while the client (or the loop) is behind.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: Sender<Done>,
    waker: Arc<LoopWaker>,
    backlog: Option<Arc<Backlog>>,
}

/// Wakes the loop for a message, but only when it sleeps (or is about to): a loop that is busy
/// drains the channel before it next sleeps, so a wake-up then would cost a system call and an
/// extra turn for nothing. The loop says it is about to sleep, then looks at `queued`; a
/// producer counts its message, then looks at `asleep` — both in sequentially consistent order,
/// so at least one of them sees the other and no message waits for an unrelated event.
#[derive(Debug)]
pub struct LoopWaker {
    waker: Waker,
    asleep: AtomicBool,
    /// The loop's sleep lasts at most [`QUIET_WAIT`].
    capped: AtomicBool,
    /// Messages sent (or being sent) and not yet taken by the loop.
    queued: AtomicUsize,
    /// Runs that may end with a quiet message ([`Notifier::send_quiet`]); while there are any the
    /// loop sleeps at most [`QUIET_WAIT`].
    quiet_runs: AtomicUsize,
}

/// The longest a quiet message waits for the loop (see [`Notifier::send_quiet`]).
pub const QUIET_WAIT: Duration = Duration::from_millis(10);

/// Counts a run that may end with a quiet message, for as long as it lives.
pub struct QuietRun(Arc<LoopWaker>);

impl Drop for QuietRun {
    fn drop(&mut self) {
        self.0.quiet_runs.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LoopWaker {
    fn new(registry: &mio::Registry) -> io::Result<Arc<Self>> {
        let waker = Waker::new(registry, WAKER)?;
        Ok(Arc::new(LoopWaker {
            waker,
            asleep: AtomicBool::new(false),
            capped: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            quiet_runs: AtomicUsize::new(0),
        }))
    }

    /// How long the loop may sleep, given what else it waits for: at most [`QUIET_WAIT`] while
    /// a run may end with a quiet message.
    fn cap(&self, timeout: Option<Duration>) -> Option<Duration> {
        let timeout = match self.quiet_runs.load(Ordering::SeqCst) {
            0 => timeout,
            _ => Some(timeout.map_or(QUIET_WAIT, |t| t.min(QUIET_WAIT))),
        };
        self.capped.store(timeout.is_some_and(|t| t <= QUIET_WAIT), Ordering::SeqCst);
        timeout
    }

    /// The loop is about to wait for events: true when a message is queued (so it must not).
    fn sleeping(&self) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        self.queued.load(Ordering::SeqCst) > 0
    }

    /// The loop is awake (it drains the channel before it next sleeps).
    fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// The loop took a message.
    fn took(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

fn ws_len(msg: &rpc::Outgoing) -> usize {
    msg.wire_len()
}

impl Notifier {
    /// Send `d`, waking the loop if it sleeps.
    pub fn send(&self, d: Done) {
        let n = match (&self.backlog, &d) {
            (Some(b), Done::Ws { msg, .. }) => {
                let n = ws_len(msg);
                b.queued.fetch_add(n, Ordering::Relaxed);
                n
            }
            _ => 0,
        };
        if !self.post(d, false)
            && let Some(b) = &self.backlog
        {
            b.queued.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Send `d` without waking the loop unless it sleeps longer than [`QUIET_WAIT`]: for the end
    /// of a run whose answer is already written on a connection that stays open. The client's
    /// next request wakes the loop, which then takes this first — one wake-up per request
    /// instead of two — and a client that sends nothing more has its connection back within
    /// [`QUIET_WAIT`].
    pub fn send_quiet(&self, d: Done) {
        self.post(d, true);
    }

    /// Queue `d` and wake the loop if it sleeps (`quiet`: only if it sleeps longer than
    /// [`QUIET_WAIT`]); false when the loop is gone.
    fn post(&self, d: Done, quiet: bool) -> bool {
        let w = &self.waker;
        // Counted before it is sent, so the loop never takes a message it has not counted (it
        // may see the count a moment before the message, and look again).
        w.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(d).is_err() {
            w.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if w.asleep.load(Ordering::SeqCst) && !(quiet && w.capped.load(Ordering::SeqCst)) {
            let _ = w.waker.wake();
        }
        true
    }

    /// Count a run that may end with [`Notifier::send_quiet`], while the result lives.
    pub fn quiet_run(&self) -> QuietRun {
        self.waker.quiet_runs.fetch_add(1, Ordering::SeqCst);
        QuietRun(self.waker.clone())
    }

    /// True while this connection has more than [`OUTBOUND_BOUND`] bytes on their way to its
    /// socket: a producer then merges what it would send into its next message instead of
    /// queueing more, so a client that reads slowly costs fewer messages, not more memory.
    pub fn congested(&self) -> bool {
        self.backlog
            .as_ref()
            .is_some_and(|b| b.queued.load(Ordering::Relaxed) + b.unsent.load(Ordering::Relaxed) > OUTBOUND_BOUND)
    }

    /// A copy that counts one connection's outbound bytes.
    fn for_connection(&self) -> Notifier {
        Notifier { backlog: Some(Arc::new(Backlog::default())), ..self.clone() }
    }

    /// The loop took a message of `n` bytes from the channel.
    fn taken(&self, n: usize) {
        if let Some(b) = &self.backlog {
            let _ = b.queued.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| Some(q.saturating_sub(n)));
        }
    }

    /// The loop has `n` framed bytes not yet written.
    fn unsent(&self, n: usize) {
        if let Some(b) = &self.backlog {
            b.unsent.store(n, Ordering::Relaxed);
        }
    }
}

/// Ends a job for the loop and the run registry if it panics: a non-streaming job's client gets
/// a 500 (its connection still belongs to the loop), a streaming job's connection is closed (part
/// of its response may already be on the wire).
struct JobGuard {
    notifier: Notifier,
    slot: usize,
    id: u64,
    runs: Arc<crate::agent::registry::Registry>,
    /// The registry's record of the run, should it end here.
    summary: Option<crate::agent::registry::RunSummary>,
    /// For a non-streaming job: the answer's headers, `HEAD`.
    buffered: Option<(Vec<(&'static str, String)>, bool)>,
    armed: bool,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        crate::log!(Error, "a run failed unexpectedly on connection #{}", self.id);
        if let Some(mut s) = self.summary.take() {
            s.error = Some(crate::agent::RunError::Backend("the run failed unexpectedly".into()));
            s.ended_at = crate::util::now_ms();
            self.runs.finish(s);
        }
        let d = match self.buffered.take() {
            Some((headers, head_only)) => {
                let resp = handler::with_headers(internal_error().response(), headers);
                Done::Respond { slot: self.slot, id: self.id, resp: Some(resp), head_only, close: true, info: None }
            }
            None => Done::Streamed { slot: self.slot, id: self.id, keep: false, status: 500, written: 0, info: None },
        };
        self.notifier.send(d);
    }
}

fn internal_error() -> ApiError {
    ApiError::server(500, "internal_error", "The server had an error while processing your request")
}

struct Conn {
    id: u64,
    stream: Option<TcpStream>,
    /// A duplicate of the socket for the runs that write their answers themselves: made on the
    /// connection's first chat request and kept (it shares the socket, flags and all).
    shared: Option<Arc<std::net::TcpStream>>,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Framing and timers.
    http: HttpConn,
    /// The WebSocket session, once upgraded.
    ws: Option<Box<rpc::Session>>,
    /// The deadline this connection is filed under in the loop's timers.
    timer: Option<Instant>,
    eof: bool,
    /// The kernel may hold bytes not read yet. A read that returns less than it asked for has
    /// emptied the receive queue, and anything arriving later raises a new (edge-triggered)
    /// readiness event: until then another read would only return `WouldBlock`.
    readable: bool,
    /// A readiness event said the peer closed its side: read on to the end, however short a read.
    read_closed: bool,
    cancel: Option<CancelToken>,
    /// Counts this connection in `gatelet_open_connections`.
    gauge: crate::metrics::ConnGauge,
    /// The request being answered, for the access log.
    access: Option<Box<access::Pending>>,
    /// The connection's own notifier (WebSocket), counting what its runs send.
    notifier: Option<Notifier>,
    /// Set with `cancel` when the client goes away (the run then ends without an answer).
    gone: Option<Arc<AtomicBool>>,
    /// Set when bytes arrive while a run is in flight (a pipelined or early next request): the
    /// run's end then wakes the loop rather than wait for the client ([`Notifier::send_quiet`]).
    held: Option<Arc<AtomicBool>>,
    /// The share of the body budget held by the body being read.
    ticket: Option<budget::Ticket>,
    /// A run is reading the rest of a large request body from the socket itself
    /// ([`exchange::Exchange::rest`]): the loop does not read until it says it is done.
    lent: bool,
}

impl Conn {
    fn state(&self) -> State {
        self.http.state()
    }

    /// When this connection's next timer is due: the WebSocket session's, else the HTTP machine's.
    fn deadline(&self) -> Option<Instant> {
        match &self.ws {
            Some(s) => s.deadline(),
            None => self.http.deadline(),
        }
    }

    /// The WebSocket session ended (or never started): close once what is queued is sent.
    fn ws_closed(&mut self, now: Instant) {
        self.ws = None;
        self.http.closing(now);
    }

    /// Its run has ended: nothing is left to cancel or tell.
    fn run_ended(&mut self) {
        self.cancel = None;
        self.gone = None;
        self.held = None;
    }

    /// The client went away (or the connection is being closed): cancel its run.
    fn cancel_run(&self) {
        if let Some(g) = &self.gone {
            g.store(true, Ordering::SeqCst);
        }
        if let Some(c) = &self.cancel {
            c.cancel();
        }
    }
}

/// The listening gateway.
pub struct Server {
    poll: Poll,
    /// Closed (`None`) once draining starts.
    listener: Option<TcpListener>,
    gw: Arc<Gateway>,
    conns: Vec<Option<Conn>>,
    /// Free slots, lowest first: new connections fill the table from the bottom, so that its
    /// tail empties after a burst and can be given back.
    free: BinaryHeap<Reverse<usize>>,
    live: usize,
    next_id: u64,
    notifier: Notifier,
    rx: Receiver<Done>,
    scratch: Vec<u8>,
    accept_paused: bool,
    /// The accept budget ran out with connections possibly left in the backlog.
    accept_more: bool,
    /// Open connections per client address.
    per_ip: HashMap<IpAddr, usize>,
    /// Connections that have not completed a request head yet, oldest first (id → slot); may
    /// hold stale entries, checked when used.
    fresh: BTreeMap<u64, usize>,
    /// Connections that stopped short of `WouldBlock` to give others a turn: driven next turn.
    again: Vec<(usize, u64)>,
    /// Every connection's next deadline, soonest first, as (when, slot, id); a connection's
    /// entry is the one its `timer` names.
    timers: BTreeSet<(Instant, usize, u64)>,
    /// Request-body bytes held across all connections (`gateway.http.maxBodyBytesInFlight`).
    bodies: Arc<budget::BodyBudget>,
    signals: mio::net::UnixStream,
    /// SIGHUP arrives here.
    hup: mio::net::UnixStream,
    /// Loads the config again on SIGHUP.
    reloader: Option<Reloader>,
    /// Set once a stop signal arrived: the deadline for in-flight work.
    draining: Option<Instant>,
}

/// Reads and validates the config file again (with the same command line and environment).
pub type Reloader = Box<dyn FnMut() -> Result<crate::config::Config, crate::config::ConfigError> + Send>;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({} connections)", self.live)
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// A listening socket with our own backlog: std and mio fix it at 128, which makes a burst of
/// connects wait out SYN retries (1 s, 3 s, …) although the host allows far more.
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(sock.into()))
}

impl Server {
    /// Bind the configured address.
    pub fn bind(gw: Arc<Gateway>) -> io::Result<Server> {
        let addr = SocketAddr::new(gw.config().gateway.bind, gw.config().gateway.port);
        let mut listener = listen(addr, gw.config().gateway.listen_backlog)?;
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = LoopWaker::new(poll.registry())?;
        // SIGTERM/SIGINT write to a socket pair that the loop polls like any other source.
        let (mut signals, sig_tx) = mio::net::UnixStream::pair()?;
        let sig_tx: std::os::unix::net::UnixStream = sig_tx.into();
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, sig_tx.try_clone()?)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, sig_tx)?;
        poll.registry().register(&mut signals, SIGNAL, Interest::READABLE)?;
        // SIGHUP (reload) on its own pair: a registered handler also keeps it from killing us.
        let (mut hup, hup_tx) = mio::net::UnixStream::pair()?;
        signal_hook::low_level::pipe::register(
            signal_hook::consts::SIGHUP,
            std::os::unix::net::UnixStream::from(hup_tx),
        )?;
        poll.registry().register(&mut hup, RELOAD, Interest::READABLE)?;
        let (tx, rx) = channel();
        Ok(Server {
            poll,
            listener: Some(listener),
            gw,
            conns: Vec::new(),
            free: BinaryHeap::new(),
            live: 0,
            next_id: 1,
            notifier: Notifier { tx, waker, backlog: None },
            rx,
            scratch: vec![0; 16 * 1024],
            accept_paused: false,
            accept_more: false,
            per_ip: HashMap::new(),
            fresh: BTreeMap::new(),
            again: Vec::new(),
            timers: BTreeSet::new(),
            bodies: Arc::default(),
            signals,
            hup,
            reloader: None,
            draining: None,
        })
    }

    /// What SIGHUP runs to get the new config; without one, SIGHUP is logged and ignored.
    pub fn set_reloader(&mut self, r: Reloader) {
        self.reloader = Some(r);
    }

    /// SIGHUP: validate the file; on success new requests get the new config, while work in
    /// flight keeps the gateway it started with; on failure the old config stays.
    fn reload(&mut self) {
        if self.draining.is_some() {
            crate::log!(Warn, "SIGHUP while draining: config not reloaded");
            return;
        }
        let Some(load) = self.reloader.as_mut() else {
            crate::log!(Warn, "SIGHUP: this gateway has no config file to reload");
            return;
        };
        let cfg = match load() {
            Ok(c) => c,
            Err(e) => {
                crate::metrics::reloaded(false);
                for p in &e.problems {
                    crate::log!(Error, "config reload failed, keeping the running config: {p}");
                }
                return;
            }
        };
        for w in &cfg.warnings {
            crate::log!(Warn, "{w}");
        }
        let (gw, restart) = self.gw.reloaded(cfg);
        for what in restart {
            crate::log!(Warn, "config reload: a change to {what} takes effect only after a restart");
        }
        let l = &gw.config().gateway.log;
        crate::log::apply(l.level, l.format.as_deref(), l.access);
        crate::metrics::reloaded(true);
        crate::log!(Info, "config reloaded (agents: {})", gw.agent_ids());
        self.gw = Arc::new(gw);
        if self.accept_paused {
            // maxConnections may have grown.
            self.accept_all();
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "no longer listening")),
        }
    }

    /// Run the loop until a stop signal has drained the gateway.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_shrink = Instant::now();
        let mut done_more = false;
        self.gw.set_ready(true);
        loop {
            if let Some(deadline) = self.draining {
                if self.live == 0 {
                    crate::log!(Info, "drained; exiting");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    crate::log!(Warn, "drain grace over; closing {} connection(s)", self.live);
                    for slot in 0..self.conns.len() {
                        self.close(slot);
                    }
                    return Ok(());
                }
            }
            let timeout = if done_more || self.accept_more || !self.again.is_empty() {
                // Work left over from the last turn: look at new events, then do it.
                Some(Duration::ZERO)
            } else {
                // Sleep until the next deadline; with connections (or a table to give back), at
                // most until the next shrink; with nothing at all, until an event.
                let now = Instant::now();
                let next = self.timers.first().map(|(t, ..)| t.saturating_duration_since(now));
                let shrink = (self.live > 0 || !self.conns.is_empty())
                    .then(|| (last_shrink + SHRINK_EVERY).saturating_duration_since(now));
                let drain = self.draining.map(|d| d.saturating_duration_since(now));
                self.notifier.waker.cap([next, shrink, drain].into_iter().flatten().min())
            };
            // Said after the cap, so a quiet message sees the cap of this sleep.
            let timeout = if self.notifier.waker.sleeping() { Some(Duration::ZERO) } else { timeout };
            let polled = self.poll.poll(&mut events, timeout);
            self.notifier.waker.awake();
            if let Err(e) = polled {
                if interrupted(&e) {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    SIGNAL => {
                        let mut b = [0u8; 64];
                        while matches!(self.signals.read(&mut b), Ok(n) if n > 0) {}
                        if self.draining.is_some() {
                            crate::log!(Warn, "second stop signal: exiting now");
                            return Ok(());
                        }
                        self.start_drain();
                    }
                    RELOAD => {
                        let mut b = [0u8; 64];
                        while matches!(self.hup.read(&mut b), Ok(n) if n > 0) {}
                        self.reload();
                    }
                    Token(t) => self.on_event(t - FIRST_CONN, ev.is_readable(), ev.is_read_closed() || ev.is_error()),
                }
            }
            // Bounded per turn, like reads and accepts, so that sockets keep getting turns.
            done_more = true;
            for _ in 0..DONE_BUDGET {
                let Ok(d) = self.rx.try_recv() else {
                    done_more = false;
                    break;
                };
                self.notifier.waker.took();
                self.on_done(d);
            }
            if self.accept_more {
                self.accept_more = false;
                self.accept_all();
            }
            for (slot, id) in std::mem::take(&mut self.again) {
                if self.conns.get(slot).and_then(Option::as_ref).is_some_and(|c| c.id == id) {
                    self.drive(slot);
                }
            }
            self.fire_timers(Instant::now());
            if last_shrink.elapsed() >= SHRINK_EVERY {
                last_shrink = Instant::now();
                self.shrink();
            }
        }
    }

    /// Stop accepting, tell WebSocket clients, close idle connections, let runs finish.
    fn start_drain(&mut self) {
        let grace = self.gw.config().gateway.drain_timeout;
        crate::log!(Info, "stop signal: draining (up to {} s; send again to exit now)", grace.as_secs());
        self.gw.set_ready(false);
        self.draining = Some(Instant::now() + grace);
        // Stop listening at once rather than only stop accepting: new connections are refused,
        // so a load balancer moves them to another instance at the first try instead of
        // leaving them in a backlog nobody serves.
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else { continue };
            if let Some(s) = &mut conn.ws {
                // The session sends `shutdown` and a 1001 close, then waits briefly for the
                // client's close frame so the socket ends cleanly.
                s.on_shutdown(&mut conn.wbuf);
                if s.is_closed() {
                    conn.ws_closed(now);
                }
                self.drive(slot);
            } else if conn.state() == State::Idle {
                self.close(slot);
            }
        }
    }

    /// Accept what the backlog holds (up to [`ACCEPT_BUDGET`] per turn). At `maxConnections`, a
    /// newcomer takes the place of the oldest connection that has not sent a complete request
    /// (a slow or silent head), else of the longest-idle keep-alive connection; only when every
    /// connection is busy do newcomers wait in the backlog.
    fn accept_all(&mut self) {
        if self.draining.is_some() {
            return;
        }
        let per_ip_cap = self.gw.config().gateway.max_connections_per_ip;
        for _ in 0..ACCEPT_BUDGET {
            let full = self.live >= self.gw.config().gateway.max_connections;
            if full && self.victim().is_none() {
                // Leave the rest in the backlog until a connection closes.
                self.accept_paused = true;
                return;
            }
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let ip = peer.ip().to_canonical();
                    let held = self.per_ip.get(&ip).copied().unwrap_or(0);
                    if per_ip_cap > 0 && held >= per_ip_cap {
                        crate::log!(Debug, "{ip} holds {held} connections (gateway.maxConnectionsPerIp): closed");
                        continue;
                    }
                    if self.live >= self.gw.config().gateway.max_connections
                        && let Some(v) = self.victim()
                    {
                        crate::log!(Debug, "at maxConnections: closing #{} for a newcomer", self.conn_id(v));
                        self.close(v);
                    }
                    let _ = stream.set_nodelay(true);
                    let slot = self.free.pop().map(|Reverse(s)| s).unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    let token = Token(slot + FIRST_CONN);
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        self.free.push(Reverse(slot));
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    self.live += 1;
                    *self.per_ip.entry(ip).or_insert(0) += 1;
                    self.fresh.insert(id, slot);
                    self.conns[slot] = Some(Conn {
                        id,
                        stream: Some(stream),
                        shared: None,
                        peer,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                        http: HttpConn::new(Instant::now(), timeouts(&self.gw)),
                        ws: None,
                        timer: None,
                        eof: false,
                        readable: true,
                        read_closed: false,
                        cancel: None,
                        gauge: crate::metrics::ConnGauge::open(),
                        access: None,
                        notifier: None,
                        gone: None,
                        held: None,
                        ticket: None,
                        lent: false,
                    });
                    crate::log!(Trace, "accepted {peer} as #{id}");
                    // A request sent with the connection is usually waiting already: serve it
                    // before later arrivals can make this connection the oldest newcomer.
                    self.drive(slot);
                }
                Err(e) if would_block(&e) => {
                    self.accept_paused = false;
                    return;
                }
                Err(e) if interrupted(&e) => {}
                Err(e) => {
                    // EMFILE and friends: back off until a connection closes.
                    crate::log!(Warn, "accept failed: {e}");
                    self.accept_paused = true;
                    return;
                }
            }
        }
        // Budget spent: the backlog may hold more, and no new readiness event will say so.
        self.accept_more = true;
    }

    fn conn_id(&self, slot: usize) -> u64 {
        self.conns.get(slot).and_then(Option::as_ref).map_or(0, |c| c.id)
    }

    /// The connection to close for a newcomer when full: one that has not completed a request
    /// head — the oldest of those from the address holding the most connections (so a flood
    /// from one address churns its own connections, never a newcomer from elsewhere whose
    /// request is still on its way), else the oldest of any address — and failing those the
    /// keep-alive connection idle the longest (nearest idle deadline).
    fn victim(&mut self) -> Option<usize> {
        fn candidate(conns: &[Option<Conn>], id: u64, slot: usize) -> Option<&Conn> {
            conns.get(slot).and_then(Option::as_ref).filter(|c| {
                c.id == id
                    && !c.http.served()
                    && c.stream.is_some()
                    && matches!(c.state(), State::Idle | State::Head | State::Closing)
            })
        }
        // Entries that stopped being candidates never become candidates again.
        while let Some((&id, &slot)) = self.fresh.first_key_value() {
            if candidate(&self.conns, id, slot).is_some() {
                break;
            }
            self.fresh.pop_first();
        }
        if let Some((_, &oldest)) = self.fresh.first_key_value() {
            let top = self.per_ip.iter().max_by_key(|(_, n)| **n).map(|(ip, _)| *ip);
            // Bounded look: past it, the oldest of any address will do.
            for (&id, &slot) in self.fresh.iter().take(256) {
                if let Some(c) = candidate(&self.conns, id, slot)
                    && Some(c.peer.ip().to_canonical()) == top
                {
                    return Some(slot);
                }
            }
            return Some(oldest);
        }
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let idle = matches!(c.state(), State::Idle | State::Closing) && c.ws.is_none() && c.stream.is_some();
                idle.then_some((c.http.deadline(), i))
            })
            .min()
            .map(|(_, i)| i)
    }

    fn on_event(&mut self, slot: usize, readable: bool, hangup: bool) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
        conn.readable |= readable || hangup;
        conn.read_closed |= hangup;
        if hangup && conn.state() == State::Running {
            conn.eof = true;
        }
        self.drive(slot);
    }

    /// Read, process, write, and close if finished.
    fn drive(&mut self, slot: usize) {
        let gw = self.gw.clone();
        // Bytes read this turn: past READ_BUDGET the connection waits for the next turn, so a
        // fast sender (a pipelining flood, a large upload) cannot hold the loop.
        let mut taken = 0;
        if let Some(Some(conn)) = self.conns.get_mut(slot) {
            // A reload's timeouts apply to the timers set from now on.
            conn.http.set_timeouts(timeouts(&gw));
        }
        loop {
            let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
            let registry = self.poll.registry();
            let mut ctx = Ctx { gw: &gw, bodies: &self.bodies, slot, notifier: &self.notifier, registry };
            while let Some(stream) = conn.stream.as_mut() {
                let reading = !conn.eof
                    && !conn.lent
                    && conn.readable
                    && conn.http.state() != State::Closing
                    && conn.wbuf.len() < WRITE_CAP
                    && (conn.rbuf.len() < READ_CAP || conn.http.reading_request());
                let mut progressed = false;
                if reading {
                    // A body of declared length is read straight into place (nothing buffered
                    // may come before it); up to what is left of this turn's budget.
                    let mut asked = self.scratch.len();
                    let read = match conn.rbuf.is_empty() {
                        true => conn.http.read_body_in_place(READ_BUDGET.saturating_sub(taken), Instant::now(), |b| {
                            asked = b.len();
                            stream.read(b)
                        }),
                        false => None,
                    };
                    let in_place = read.is_some();
                    match read.unwrap_or_else(|| stream.read(&mut self.scratch)) {
                        Ok(0) => conn.eof = true,
                        Ok(n) => {
                            if !in_place {
                                conn.rbuf.extend_from_slice(&self.scratch[..n]);
                            }
                            // Drained: skip the read that would only say `WouldBlock`.
                            conn.readable = n == asked || conn.read_closed;
                            // (`held` is there only while a run is in flight.)
                            if let Some(h) = &conn.held {
                                h.store(true, Ordering::SeqCst);
                            }
                            progressed = true;
                            taken += n;
                        }
                        Err(e) if would_block(&e) => conn.readable = false,
                        Err(e) if interrupted(&e) => progressed = true,
                        Err(_) => conn.eof = true,
                    }
                }
                // One connection's input must never take the loop down: a panic in the codecs or
                // routing closes that connection with a 500 and is logged.
                let panicked = catch_unwind(AssertUnwindSafe(|| process(conn, &mut ctx))).is_err();
                if panicked {
                    crate::log!(
                        Error,
                        "internal error while handling #{} from {}; connection closed",
                        conn.id,
                        conn.peer
                    );
                    conn.rbuf.clear();
                    if conn.ws.is_none() {
                        let e = internal_error();
                        let before = conn.wbuf.len();
                        encode(conn, e.response(), false, true);
                        let bytes = (conn.wbuf.len() - before) as u64;
                        match conn.access.take() {
                            Some(a) => a.finish(500, bytes),
                            None => access::immediate(None, Instant::now(), 500, bytes, None),
                        }
                    }
                    conn.ws_closed(Instant::now());
                }
                if !progressed || taken >= READ_BUDGET {
                    break;
                }
            }
            let held = conn.wbuf.len() >= WRITE_CAP;
            if conn.eof {
                if let Some(s) = &mut conn.ws {
                    // Requests that came before the end are still answered.
                    s.on_eof();
                    if s.is_closed() {
                        conn.ws_closed(Instant::now());
                    }
                } else {
                    match conn.state() {
                        State::Running => conn.cancel_run(),
                        State::Closing => {}
                        // Requests that arrived before the end are still answered once it drains.
                        _ if held && !conn.rbuf.is_empty() => {}
                        // The peer is done sending; nothing more can arrive, so finish what is queued.
                        _ => conn.http.closing(Instant::now()),
                    }
                }
            }
            if flush(conn) {
                return self.close(slot);
            }
            self.rearm(slot);
            let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
            if taken >= READ_BUDGET {
                // More may be waiting in the kernel, and edge-triggered readiness will not repeat.
                let id = conn.id;
                self.again.push((slot, id));
                return;
            }
            // Reading and parsing paused while the write buffer was full. Bytes already waiting in
            // the kernel raise no new readiness event, so go on by hand once it has drained.
            if !(held && conn.wbuf.len() < WRITE_CAP) {
                return;
            }
        }
    }

    fn on_done(&mut self, d: Done) {
        let (slot, id) = match &d {
            Done::Respond { slot, id, .. }
            | Done::Streamed { slot, id, .. }
            | Done::BodyRead { slot, id }
            | Done::Ws { slot, id, .. } => (*slot, *id),
        };
        let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
        if conn.id != id {
            return;
        }
        if conn.lent && !matches!(d, Done::Ws { .. }) {
            // Whatever the run says now, it no longer reads the socket.
            conn.lent = false;
            hear_input(self.poll.registry(), conn, slot, true);
        }
        match d {
            Done::BodyRead { .. } => {
                // Bytes may have arrived behind the body (or the end) while the run read it.
                conn.readable = true;
                self.drive(slot);
            }
            Done::Respond { resp, head_only, close, info, .. } => {
                conn.run_ended();
                // Draining: no further request will be read, so the answer says so.
                let close = close || !self.gw.is_ready();
                let mut pending = conn.access.take();
                if let (Some(a), Some(i)) = (pending.as_mut(), info) {
                    i.apply(a);
                }
                match resp {
                    Some(r) if !conn.eof => {
                        let status = r.status;
                        let before = conn.wbuf.len();
                        encode(conn, r, head_only, close);
                        if let Some(a) = pending {
                            a.finish(status, (conn.wbuf.len() - before) as u64);
                        }
                        finish_exchange(conn, close, &self.gw);
                    }
                    _ => {
                        if let Some(a) = pending {
                            a.finish(access::CLIENT_CLOSED, 0);
                        }
                        conn.http.closing(Instant::now());
                    }
                }
                self.drive(slot);
            }
            Done::Streamed { keep, status, written, info, .. } => {
                conn.run_ended();
                if let Some(mut a) = conn.access.take() {
                    if let Some(i) = info {
                        i.apply(&mut a);
                    }
                    a.finish(status, written);
                }
                if !keep {
                    return self.close(slot);
                }
                finish_exchange(conn, false, &self.gw);
                self.drive(slot);
            }
            Done::Ws { msg, .. } => {
                if let Some(n) = &conn.notifier {
                    n.taken(ws_len(&msg));
                }
                if let Some(s) = &mut conn.ws {
                    s.outgoing(msg, &mut conn.wbuf);
                    if s.is_closed() {
                        conn.ws_closed(Instant::now());
                    }
                }
                self.drive(slot);
            }
        }
    }

    /// File connection `slot` under its current deadline (or none), replacing its old entry.
    fn rearm(&mut self, slot: usize) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
        if conn.ws.is_none() && conn.state() == State::Closing && conn.http.deadline().is_none() {
            // Whatever way a connection came to be closing, it gets a bounded time to take its
            // last bytes: a peer that stops reading cannot hold the slot forever.
            conn.http.closing(Instant::now());
        }
        let want = conn.deadline();
        if want == conn.timer {
            return;
        }
        if let Some(t) = conn.timer.take() {
            self.timers.remove(&(t, slot, conn.id));
        }
        if let Some(t) = want {
            self.timers.insert((t, slot, conn.id));
            conn.timer = Some(t);
        }
    }

    /// Fire the timers that are due; only those connections are touched.
    fn fire_timers(&mut self, now: Instant) {
        // Taken out first, so that each fires at most once per turn whatever it re-arms.
        let mut due = Vec::new();
        while self.timers.first().is_some_and(|(t, ..)| *t <= now) {
            due.extend(self.timers.pop_first());
        }
        for (t, slot, id) in due {
            let Some(Some(conn)) = self.conns.get_mut(slot) else { continue };
            if conn.id != id || conn.timer != Some(t) {
                continue;
            }
            conn.timer = None;
            if let Some(s) = &mut conn.ws {
                s.on_timer(now, &mut conn.wbuf);
                if s.is_closed() {
                    conn.ws_closed(now);
                }
                // Only what the timer queued is written: an idle socket is not read.
                if flush(conn) {
                    self.close(slot);
                } else {
                    self.rearm(slot);
                }
                continue;
            }
            match conn.http.on_timer(now) {
                Some(Action::Refuse(e, head)) => {
                    conn.ticket = None;
                    let before = conn.wbuf.len();
                    let status = e.status;
                    encode(conn, e.response(), false, true);
                    let bytes = (conn.wbuf.len() - before) as u64;
                    match conn.access.take() {
                        Some(a) => a.finish(status, bytes),
                        None => access::immediate(head.as_deref(), now, status, bytes, None),
                    }
                    self.drive(slot);
                }
                Some(Action::Close) => self.close(slot),
                _ => self.rearm(slot),
            }
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else { return };
        conn.cancel_run();
        if let Some(a) = conn.access.take() {
            a.finish(access::CLIENT_CLOSED, 0);
        }
        if let Some(s) = &mut conn.ws {
            s.on_eof();
        }
        if let Some(mut s) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if let Some(t) = conn.timer {
            self.timers.remove(&(t, slot, conn.id));
        }
        crate::log!(Trace, "closed #{}", conn.id);
        self.free.push(Reverse(slot));
        self.live -= 1;
        let ip = conn.peer.ip().to_canonical();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        self.fresh.remove(&conn.id);
        if self.accept_paused {
            // Resumed by the loop, not from here: close() runs inside accept_all().
            self.accept_more = true;
        }
    }

    /// Give memory back once a burst is over: trailing free slots of the connection table, the
    /// bookkeeping maps, and buffers of idle connections (dropped when empty).
    fn shrink(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            if c.ws.is_none() && c.state() == State::Idle {
                if c.rbuf.is_empty() && c.rbuf.capacity() > 0 {
                    c.rbuf = Vec::new();
                }
                if c.wbuf.is_empty() && c.wbuf.capacity() > 0 {
                    c.wbuf = Vec::new();
                }
            }
        }
        let used = self.conns.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        if (used == 0 && !self.conns.is_empty()) || (self.conns.len() > used + 64 && self.conns.len() > 2 * used) {
            self.conns.truncate(used);
            self.conns.shrink_to(used.max(16));
            self.free.retain(|&Reverse(s)| s < used);
            self.free.shrink_to(self.free.len().max(16));
        }
        if self.per_ip.capacity() > 4 * self.per_ip.len() + 64 {
            self.per_ip.shrink_to(self.per_ip.len());
        }
        if self.again.capacity() > 1024 {
            self.again.shrink_to(64);
        }
        if self.scratch.len() != 16 * 1024 {
            self.scratch = vec![0; 16 * 1024];
        }
    }
}

/// What `process` needs from the server besides the connection.
struct Ctx<'a> {
    gw: &'a Arc<Gateway>,
    bodies: &'a Arc<budget::BodyBudget>,
    slot: usize,
    notifier: &'a Notifier,
    registry: &'a mio::Registry,
}

/// Connection slot `n` is registered under token `n + FIRST_CONN` (below: listener, signals...).
const FIRST_CONN: usize = 2;

/// Whether the loop hears of bytes arriving on `conn`: not while a run reads them itself
/// ([`Conn::lent`]), which would only wake the loop for nothing, once per arriving segment.
fn hear_input(registry: &mio::Registry, conn: &mut Conn, slot: usize, readable: bool) {
    let interest = if readable { Interest::READABLE | Interest::WRITABLE } else { Interest::WRITABLE };
    if let Some(s) = conn.stream.as_mut() {
        let _ = registry.reregister(s, Token(slot + FIRST_CONN), interest);
    }
}

/// Write queued bytes. Returns true when the connection should be closed now.
fn flush(conn: &mut Conn) -> bool {
    let Some(stream) = conn.stream.as_mut() else { return false };
    let mut written = 0;
    while written < conn.wbuf.len() {
        match stream.write(&conn.wbuf[written..]) {
            Ok(0) => return true,
            Ok(n) => written += n,
            Err(e) if would_block(&e) => break,
            Err(e) if interrupted(&e) => {}
            Err(_) => return true,
        }
    }
    conn.wbuf.drain(..written);
    if conn.wbuf.is_empty() && conn.ws.is_some() && conn.wbuf.capacity() > 0 {
        // A WebSocket connection mostly waits: it holds no write buffer while it does.
        conn.wbuf = Vec::new();
    } else if conn.wbuf.is_empty() && conn.wbuf.capacity() > 64 * 1024 {
        conn.wbuf.shrink_to(4096);
    }
    if let Some(n) = &conn.notifier {
        n.unsent(conn.wbuf.len());
    }
    conn.wbuf.is_empty() && conn.ws.is_none() && conn.state() == State::Closing
}

/// The connection timeouts of the current config.
fn timeouts(gw: &Gateway) -> Timeouts {
    let g = &gw.config().gateway;
    Timeouts { header: g.header_timeout, idle: g.idle_timeout, linger: LINGER }
}

/// Queue a response; an HTTP/1.0 client that asked for keep-alive gets it confirmed.
fn encode(conn: &mut Conn, resp: Response, head_only: bool, close: bool) {
    let resp = if conn.http.minor() == 0 && !close { resp.header("Connection", "keep-alive") } else { resp };
    resp.encode(&mut conn.wbuf, &http_date(), head_only, close);
}

thread_local! {
    static DATE: std::cell::Cell<Option<HttpDate>> = const { std::cell::Cell::new(None) };
}

/// The `Date` for responses sent now: rendered at most once a second per thread (the loop and
/// each worker), since `http::response` reads no clock.
pub(crate) fn http_date() -> HttpDate {
    let now = crate::util::now_secs();
    DATE.with(|d| match d.get() {
        Some(date) if date.secs() == now => date,
        _ => {
            let date = HttpDate::from_unix(now);
            d.set(Some(date));
            date
        }
    })
}

/// After a response: back to idle (with the idle timer), or closing.
fn finish_exchange(conn: &mut Conn, close: bool, gw: &Gateway) {
    // Not ready means draining: no further requests on this connection.
    let close = close || conn.eof || !gw.is_ready();
    conn.http.answered(close, Instant::now());
    if !close && conn.rbuf.capacity() > 64 * 1024 && conn.rbuf.len() < 4096 {
        conn.rbuf.shrink_to(4096);
    }
}

/// Parse and act on whatever complete requests are buffered, in order.
fn process(conn: &mut Conn, ctx: &mut Ctx<'_>) {
    if let Some(s) = &mut conn.ws {
        let n = s.on_bytes(&conn.rbuf, &mut conn.wbuf);
        conn.rbuf.drain(..n);
        if conn.rbuf.is_empty() && conn.rbuf.capacity() > 0 {
            // Nor a read buffer.
            conn.rbuf = Vec::new();
        }
        if s.is_closed() {
            conn.ws_closed(Instant::now());
        }
        return;
    }
    let limit = ctx.gw.config().gateway.max_body_in_flight;
    loop {
        let hold = conn.wbuf.len() >= WRITE_CAP;
        let Some(action) = conn.http.feed(&mut conn.rbuf, Instant::now(), hold) else {
            // A chunked body takes its share of the budget as it grows.
            if let (Some(n), Some(t)) = (conn.http.body_len(), conn.ticket.as_mut())
                && !t.hold(n, limit)
            {
                let head = conn.http.body_head().cloned();
                conn.http.closing(Instant::now());
                over_budget(conn, ctx.gw, head.as_ref());
            }
            return;
        };
        match action {
            Action::Head(h) => on_head(conn, ctx, h),
            Action::Dispatch(h, body) => {
                if conn.ticket.as_mut().is_some_and(|t| !t.hold(body.len() as u64, limit)) {
                    conn.http.closing(Instant::now());
                    return over_budget(conn, ctx.gw, Some(&h));
                }
                dispatch_chat(conn, ctx, *h, body, 0)
            }
            Action::Refuse(e, head) => {
                conn.ticket = None;
                let status = e.status;
                let before = conn.wbuf.len();
                encode(conn, e.response(), false, true);
                let bytes = (conn.wbuf.len() - before) as u64;
                match conn.access.take() {
                    Some(a) => a.finish(status, bytes),
                    None => access::immediate(head.as_deref(), Instant::now(), status, bytes, None),
                }
                return;
            }
            Action::Close => return,
        }
        if conn.ws.is_some() {
            return process(conn, ctx);
        }
    }
}

fn on_head(conn: &mut Conn, ctx: &mut Ctx<'_>, h: Box<Head>) {
    let start = Instant::now();
    let head_only = h.method == "HEAD";
    let has_body = !matches!(h.body, Some(Framing::None) | None);
    match handler::on_head(ctx.gw, &h, conn.peer.ip()) {
        HeadAction::Respond(mut resp) => {
            if route_is_chat(&h) {
                resp = resp.header("x-request-id", format!("req-{}", crate::util::random_hex(24)));
            }
            // An unread body would be taken for the next request: close instead. Draining: no
            // further request will be read.
            let close = h.close || has_body || !ctx.gw.is_ready();
            let (status, before) = (resp.status, conn.wbuf.len());
            let rid = access::request_id(&resp.headers).map(str::to_string);
            encode(conn, resp, head_only, close);
            conn.http.answered(close, Instant::now());
            access::immediate(Some(&h), start, status, (conn.wbuf.len() - before) as u64, rid.as_deref());
        }
        HeadAction::ReadBody { limit, continue_100 } => {
            // A declared body takes its whole share of the budget before it is read.
            let mut ticket = budget::Ticket::new(ctx.bodies);
            let declared = match h.body {
                Some(Framing::Length(n)) => n,
                _ => 0,
            };
            if !ticket.hold(declared, ctx.gw.config().gateway.max_body_in_flight) {
                // The body is not read: the connection closes after the answer.
                conn.http.answered(true, Instant::now());
                conn.access = Some(Box::new(access::Pending::new(&h, start)));
                return over_budget(conn, ctx.gw, Some(&h));
            }
            conn.ticket = Some(ticket);
            if continue_100 {
                conn.wbuf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            conn.access = Some(Box::new(access::Pending::new(&h, start)));
            // A large chat body is read by its run: copying megabytes out of the kernel is work
            // for a worker, and the loop stays free for every other connection. Only what came
            // with the head moves with it.
            let rest = declared.saturating_sub(conn.rbuf.len() as u64);
            if route_is_chat(&h) && declared >= LARGE_INPUT as u64 && rest > 0 {
                let body = std::mem::take(&mut conn.rbuf);
                return dispatch_chat(conn, ctx, *h, body, rest);
            }
            conn.http.read_body(h, limit, Instant::now());
        }
        HeadAction::Upgrade => match ws::handshake::accept(&h) {
            Ok(resp_bytes) => {
                access::immediate(Some(&h), start, 101, resp_bytes.len() as u64, None);
                conn.gauge.upgrade();
                conn.wbuf.extend_from_slice(&resp_bytes);
                conn.http.upgraded();
                let notifier = ctx.notifier.for_connection();
                let outbox = Arc::new(outbox::ConnOutbox { notifier: notifier.clone(), slot: ctx.slot, id: conn.id });
                conn.notifier = Some(notifier);
                let (gw, ip, now) = (ctx.gw.clone(), conn.peer.ip(), Instant::now());
                conn.ws = Some(Box::new(rpc::Session::new(outbox, gw, ip, conn.id, now, &mut conn.wbuf)));
            }
            Err(e) => {
                let resp = ApiError::from(e).response();
                let close = h.close || has_body;
                let (status, before) = (resp.status, conn.wbuf.len());
                encode(conn, resp, head_only, close);
                conn.http.answered(close, Instant::now());
                access::immediate(Some(&h), start, status, (conn.wbuf.len() - before) as u64, None);
            }
        },
    }
}

fn route_is_chat(h: &Head) -> bool {
    matches!(handler::route(h.path()), handler::Route::Chat)
}

/// Answer a chat request that did not become a run; `unread` when part of its body is still in
/// the socket (the connection then closes).
fn chat_error(conn: &mut Conn, e: ApiError, h: &Head, gw: &Gateway, unread: bool) {
    let rid = format!("req-{}", crate::util::random_hex(24));
    let resp = handler::with_headers(e.response(), handler::api_headers(gw, h)).header("x-request-id", rid.clone());
    let (status, before) = (resp.status, conn.wbuf.len());
    let close = h.close || unread || !gw.is_ready();
    encode(conn, resp, false, close);
    if let Some(mut a) = conn.access.take() {
        a.request_id = Some(rid);
        a.finish(status, (conn.wbuf.len() - before) as u64);
    }
    finish_exchange(conn, close, gw);
}

/// 503 for a body that does not fit in the budget for bodies in flight; the connection is closing
/// (its body is not read, or only partly).
fn over_budget(conn: &mut Conn, gw: &Gateway, h: Option<&Head>) {
    conn.ticket = None;
    crate::log!(Warn, "request bodies in flight over gateway.http.maxBodyBytesInFlight: 503 to {}", conn.peer);
    crate::metrics::run_rejected();
    let rid = format!("req-{}", crate::util::random_hex(24));
    let e = ApiError::bodies_over_budget(gw.config().gateway.max_body_in_flight);
    let headers = h.map(|h| handler::api_headers(gw, h)).unwrap_or_default();
    let resp = handler::with_headers(e.response(), headers).header("x-request-id", rid.clone());
    let (status, before) = (resp.status, conn.wbuf.len());
    encode(conn, resp, false, true);
    if let Some(mut a) = conn.access.take() {
        a.request_id = Some(rid);
        a.finish(status, (conn.wbuf.len() - before) as u64);
    }
}

/// A chat completion request: admit it and hand the exchange to a worker, which parses,
/// validates, resolves and runs it. Admission stays here, before the body is parsed, so that an
/// overloaded gateway answers 503 (and an address over its run limit 429) without spending a
/// worker on the request. `rest` bytes of the body are still in the socket, for the run to read
/// (the connection's input is lent to it meanwhile; a refusal then closes the connection).
fn dispatch_chat(conn: &mut Conn, ctx: &mut Ctx<'_>, h: Head, body: Vec<u8>, rest: u64) {
    let gw = ctx.gw;
    // The body came through the read buffer: do not keep its size for as long as the run lasts.
    if conn.rbuf.capacity() > 4096 {
        conn.rbuf.shrink_to(conn.rbuf.len());
    }
    // The run writes its own answer (or hands it back): what the loop still holds of earlier
    // answers goes out first, from here if the socket takes it, else from the run.
    let _ = flush(conn);
    let Some(sock) = shared_socket(conn) else {
        crate::log!(Warn, "no descriptor for a run's socket: 503 to {}", conn.peer);
        return chat_error(conn, ApiError::overloaded(), &h, gw, rest > 0);
    };
    let admission = match gw.pool().admit_from(Some(conn.peer.ip().to_canonical())) {
        Ok(a) => a,
        Err(Refused::Full) => {
            crate::log!(Warn, "run queue full: 503 to {}", conn.peer);
            crate::metrics::run_rejected();
            return chat_error(conn, ApiError::overloaded(), &h, gw, rest > 0);
        }
        Err(Refused::PerIp(limit)) => {
            crate::log!(Debug, "{} has {limit} runs (gateway.maxRunsPerIp): 429", conn.peer);
            crate::metrics::run_rejected();
            return chat_error(conn, ApiError::too_many_runs(limit), &h, gw, rest > 0);
        }
    };
    let cancel = CancelToken::new();
    let gone = Arc::new(AtomicBool::new(false));
    // Bytes behind this request (pipelined) are held already.
    let held = Arc::new(AtomicBool::new(!conn.rbuf.is_empty()));
    conn.held = Some(held.clone());
    conn.cancel = Some(cancel.clone());
    conn.gone = Some(gone.clone());
    conn.http.start_run();
    if rest > 0 {
        conn.lent = true;
        hear_input(ctx.registry, conn, ctx.slot, false);
    }
    let ex = exchange::Exchange {
        gw: gw.clone(),
        headers: handler::api_headers(gw, &h),
        head: Box::new(h),
        body,
        rest,
        ticket: conn.ticket.take(),
        cancel,
        gone,
        held,
        notifier: ctx.notifier.clone(),
        slot: ctx.slot,
        id: conn.id,
        peer: conn.peer,
        sock,
        // Only bytes move: an empty buffer's capacity stays with the connection for its next answer.
        prefix: if conn.wbuf.is_empty() { Vec::new() } else { std::mem::take(&mut conn.wbuf) },
    };
    admission.submit(None, move || ex.run());
}

/// The connection's duplicate socket for its runs, made on first use. Token streams need little
/// bandwidth; left to autotuning, the kernel would keep up to 4 MiB per socket for a client that
/// does not read (and the stall would show that late), so the send buffer is capped then.
fn shared_socket(conn: &mut Conn) -> Option<Arc<std::net::TcpStream>> {
    if conn.shared.is_none() {
        let s = socket2::SockRef::from(conn.stream.as_ref()?).try_clone().ok()?;
        let _ = s.set_send_buffer_size(STREAM_SNDBUF);
        conn.shared = Some(Arc::new(s.into()));
    }
    conn.shared.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_date_is_the_current_second_rendered() {
        let before = crate::util::now_secs();
        let d = http_date();
        assert!((before..=crate::util::now_secs()).contains(&d.secs()), "{d:?}");
        assert_eq!(d, HttpDate::from_unix(d.secs()));
    }

    fn event(len: usize) -> Done {
        Done::Ws { slot: 0, id: 1, msg: rpc::Outgoing::Event { name: "agent", payload: "x".repeat(len) } }
    }

    fn notifier() -> (Notifier, Receiver<Done>, Poll) {
        let poll = Poll::new().unwrap();
        let waker = LoopWaker::new(poll.registry()).unwrap();
        let (tx, rx) = channel();
        (Notifier { tx, waker, backlog: None }, rx, poll)
    }

    fn registered(runs: &crate::agent::registry::Registry) -> crate::agent::registry::RunSummary {
        runs.start("chatcmpl-1", None, "agent:main:k", &CancelToken::new());
        crate::agent::registry::RunSummary {
            run_id: "chatcmpl-1".into(),
            session_key: "agent:main:k".into(),
            agent_id: "main".into(),
            started_at: 1,
            ended_at: 1,
            text: String::new(),
            tool_calls: Vec::new(),
            finish: crate::agent::FinishReason::Stop,
            usage: Default::default(),
            error: None,
        }
    }

    #[test]
    fn a_panicking_non_streaming_job_answers_500_and_ends_its_run() {
        let (n, rx, _poll) = notifier();
        let runs = Arc::new(crate::agent::registry::Registry::new());
        let summary = Some(registered(&runs));
        assert_eq!(runs.active(), 1);
        let headers = vec![("x-request-id", "chatcmpl-1".to_string())];
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _guard = JobGuard {
                notifier: n.clone(),
                slot: 3,
                id: 9,
                runs: runs.clone(),
                summary,
                buffered: Some((headers, false)),
                armed: true,
            };
            panic!("backend bug");
        }));
        assert!(r.is_err());
        match rx.try_recv() {
            Ok(Done::Respond { slot: 3, id: 9, resp: Some(resp), head_only: false, close: true, .. }) => {
                assert_eq!(resp.status, 500);
                let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
                assert_eq!(body["error"]["code"], "internal_error");
                assert_eq!(access::request_id(&resp.headers), Some("chatcmpl-1"));
            }
            other => panic!("expected a 500 answer, got {other:?}"),
        }
        assert_eq!(runs.active(), 0, "the registry sees the run end");
        assert!(matches!(
            runs.wait("chatcmpl-1", None),
            crate::agent::registry::Wait::Done(s) if s.error.is_some()
        ));
    }

    #[test]
    fn a_panicking_streaming_job_gives_its_connection_back_to_be_closed() {
        let (n, rx, _poll) = notifier();
        let runs = Arc::new(crate::agent::registry::Registry::new());
        let summary = Some(registered(&runs));
        let guard = JobGuard { notifier: n, slot: 1, id: 2, runs: runs.clone(), summary, buffered: None, armed: true };
        drop(guard);
        assert!(matches!(rx.try_recv(), Ok(Done::Streamed { slot: 1, id: 2, keep: false, .. })));
        assert_eq!(runs.active(), 0);
    }

    #[test]
    fn a_disarmed_job_guard_sends_nothing() {
        let (n, rx, _poll) = notifier();
        let runs = Arc::new(crate::agent::registry::Registry::new());
        let summary = Some(registered(&runs));
        let guard = JobGuard { notifier: n, slot: 1, id: 2, runs: runs.clone(), summary, buffered: None, armed: false };
        drop(guard);
        assert!(rx.try_recv().is_err());
        assert_eq!(runs.active(), 1);
    }

    #[test]
    fn a_message_wakes_the_loop_only_while_it_sleeps_and_a_queued_one_keeps_it_awake() {
        let (n, rx, mut poll) = notifier();
        let mut events = Events::with_capacity(4);
        let woken = |poll: &mut Poll, events: &mut Events| {
            poll.poll(events, Some(Duration::from_millis(50))).unwrap();
            events.iter().any(|e| e.token() == WAKER)
        };
        // Awake (busy): no wake-up, but the loop sees the message before it would sleep.
        n.send(event(1));
        assert!(!woken(&mut poll, &mut events), "a busy loop was woken");
        assert!(n.waker.sleeping(), "a queued message did not keep the loop from sleeping");
        n.waker.awake();
        let _ = rx.try_recv().unwrap();
        n.waker.took();
        // Asleep with nothing queued: the next message wakes it.
        assert!(!n.waker.sleeping());
        n.send(event(1));
        assert!(woken(&mut poll, &mut events), "a sleeping loop was not woken");
    }

    #[test]
    fn a_connection_is_congested_while_its_outbound_bytes_exceed_the_bound() {
        let poll = Poll::new().unwrap();
        let waker = LoopWaker::new(poll.registry()).unwrap();
        let (tx, rx) = channel();
        let shared = Notifier { tx, waker, backlog: None };
        let conn = shared.for_connection();
        // The loop's own notifier counts nothing.
        shared.send(event(OUTBOUND_BOUND + 1));
        assert!(!shared.congested());
        let _ = rx.try_recv();
        // Queued and not yet taken by the loop.
        conn.send(event(OUTBOUND_BOUND / 2));
        assert!(!conn.congested());
        conn.send(event(OUTBOUND_BOUND / 2 + 1));
        assert!(conn.congested());
        // Taken by the loop and framed, but not yet written: still on its way.
        for _ in 0..2 {
            let Ok(Done::Ws { msg, .. }) = rx.try_recv() else { panic!("message lost") };
            conn.taken(ws_len(&msg));
        }
        assert!(!conn.congested());
        conn.unsent(OUTBOUND_BOUND + 1);
        assert!(conn.congested());
        conn.unsent(0);
        assert!(!conn.congested());
        // A copy (a run's link) shares the count.
        let link = conn.clone();
        link.send(event(OUTBOUND_BOUND + 1));
        assert!(conn.congested());
    }
}
