//! The mio event loop: accepts connections, moves bytes between sockets and the HTTP codecs,
//! fires timers and hands runs to the worker pool.
//!
//! mio is edge-triggered: after a readiness event we read or write until `WouldBlock`, and
//! spurious events are harmless. A streaming run *owns* its connection's socket while it runs;
//! the loop then only watches a duplicate of the descriptor for hang-up (to cancel the run) and
//! takes the socket back through a channel and a [`Waker`] when the run ends.

pub mod access;
pub mod cors;
pub mod handler;
mod outbox;
pub mod stream;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::agent::CancelToken;
use crate::agent::pool::Refused;
use crate::gateway::Gateway;
use crate::http::chunked::ChunkedDecoder;
use crate::http::head::{self, BodyFraming, Head};
use crate::http::response::Response;
use crate::openai::{ApiError, chat};
use crate::{rpc, ws};
use handler::HeadAction;
use stream::ChatJob;

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
/// Worker messages handled per loop turn.
const DONE_BUDGET: usize = 1024;
/// Send buffer asked for a socket lent to a streaming run (Linux doubles it).
const STREAM_SNDBUF: usize = 256 * 1024;
/// Bytes a connection's runs may have on their way to its socket (queued for the loop, or
/// framed and unsent) before they hold back their mergeable events (see [`Notifier::congested`]).
pub const OUTBOUND_BOUND: usize = 256 * 1024;

/// A message from a worker (or a WebSocket run) back to the loop.
#[derive(Debug)]
pub enum Done {
    /// A non-streaming run finished: write this (or close, when `None`).
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
    },
    /// A streaming run gives its socket back.
    Return {
        /// Connection slot.
        slot: usize,
        /// Connection id.
        id: u64,
        /// The socket, when it can be reused.
        stream: Option<std::net::TcpStream>,
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
    waker: Arc<Waker>,
    backlog: Option<Arc<Backlog>>,
}

fn ws_len(msg: &rpc::Outgoing) -> usize {
    msg.wire_len()
}

impl Notifier {
    /// Send `d` and wake the loop.
    pub fn send(&self, d: Done) {
        let n = match (&self.backlog, &d) {
            (Some(b), Done::Ws { msg, .. }) => {
                let n = ws_len(msg);
                b.queued.fetch_add(n, Ordering::Relaxed);
                n
            }
            _ => 0,
        };
        if self.tx.send(d).is_ok() {
            let _ = self.waker.wake();
        } else if let Some(b) = &self.backlog {
            b.queued.fetch_sub(n, Ordering::Relaxed);
        }
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

/// Sends a message when dropped unless disarmed: a panicking job still releases its connection.
struct ReturnGuard {
    notifier: Notifier,
    slot: usize,
    id: u64,
    armed: bool,
}

impl Drop for ReturnGuard {
    fn drop(&mut self) {
        if self.armed {
            self.notifier.send(Done::Return { slot: self.slot, id: self.id, stream: None });
        }
    }
}

enum BodyReader {
    Length(u64),
    Chunked(ChunkedDecoder),
}

enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Part of a head has arrived.
    Head,
    /// Reading a request body.
    Body { head: Box<Head>, reader: BodyReader, body: Vec<u8> },
    /// A non-streaming run is in flight.
    Running,
    /// A streaming run owns the socket.
    Lent,
    /// A WebSocket session.
    Ws(Box<rpc::Session>),
    /// Flush what is queued, then close.
    Closing,
}

struct Conn {
    id: u64,
    stream: Option<TcpStream>,
    /// Duplicate descriptor watched for hang-up while the socket is lent.
    watcher: Option<TcpStream>,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    phase: Phase,
    deadline: Option<Instant>,
    eof: bool,
    cancel: Option<CancelToken>,
    /// HTTP minor version of the current request (1.0 keep-alive must be confirmed).
    minor: u8,
    /// Counts this connection in `gatelet_open_connections`.
    gauge: crate::metrics::ConnGauge,
    /// The request being answered, for the access log.
    access: Option<Box<access::Pending>>,
    /// A complete request head has arrived on this connection (it is no longer a candidate
    /// for eviction as a slow or silent newcomer).
    served: bool,
    /// The connection's own notifier (WebSocket), counting what its runs send.
    notifier: Option<Notifier>,
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
        let addr = SocketAddr::new(gw.config.gateway.bind, gw.config.gateway.port);
        let mut listener = listen(addr, gw.config.gateway.listen_backlog)?;
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
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
        let l = &gw.config.gateway.log;
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
        let mut last_sweep = Instant::now();
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
            } else if self.live > 0 || !self.conns.is_empty() {
                // Timers, and (with no connection left) one more turn to give the table back.
                Some(Duration::from_millis(250))
            } else {
                None
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
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
                    Token(t) => self.on_event(t - 2, ev.is_read_closed() || ev.is_error()),
                }
            }
            // Bounded per turn, like reads and accepts, so that sockets keep getting turns.
            done_more = true;
            for _ in 0..DONE_BUDGET {
                let Ok(d) = self.rx.try_recv() else {
                    done_more = false;
                    break;
                };
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
            if last_sweep.elapsed() >= Duration::from_millis(250) {
                last_sweep = Instant::now();
                self.sweep(last_sweep);
                self.shrink();
            }
        }
    }

    /// Stop accepting, tell WebSocket clients, close idle connections, let runs finish.
    fn start_drain(&mut self) {
        let grace = self.gw.config.gateway.drain_timeout;
        crate::log!(Info, "stop signal: draining (up to {} s; send again to exit now)", grace.as_secs());
        self.gw.set_ready(false);
        self.draining = Some(Instant::now() + grace);
        // Stop listening at once rather than only stop accepting: new connections are refused,
        // so a load balancer moves them to another instance at the first try instead of
        // leaving them in a backlog nobody serves.
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else { continue };
            match &mut conn.phase {
                Phase::Idle => self.close(slot),
                Phase::Ws(s) => {
                    // The session sends `shutdown` and a 1001 close, then waits briefly for the
                    // client's close frame so the socket ends cleanly.
                    s.on_shutdown(&mut conn.wbuf);
                    if s.is_closed() {
                        conn.phase = Phase::Closing;
                    }
                    self.drive(slot);
                }
                _ => {}
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
        let per_ip_cap = self.gw.config.gateway.max_connections_per_ip;
        for _ in 0..ACCEPT_BUDGET {
            let full = self.live >= self.gw.config.gateway.max_connections;
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
                    if self.live >= self.gw.config.gateway.max_connections
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
                    let token = Token(slot + 2);
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
                    let g = &self.gw.config.gateway;
                    // The first request gets the head deadline from the moment of accept: a
                    // newcomer that stays silent is not kept as long as an idle keep-alive one.
                    let first = g.header_timeout.min(g.idle_timeout);
                    self.conns[slot] = Some(Conn {
                        id,
                        stream: Some(stream),
                        watcher: None,
                        peer,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                        phase: Phase::Idle,
                        deadline: Some(Instant::now() + first),
                        eof: false,
                        cancel: None,
                        minor: 1,
                        gauge: crate::metrics::ConnGauge::open(),
                        access: None,
                        served: false,
                        notifier: None,
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
                    && !c.served
                    && c.stream.is_some()
                    && matches!(c.phase, Phase::Idle | Phase::Head | Phase::Closing)
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
                let idle = matches!(c.phase, Phase::Idle | Phase::Closing) && c.stream.is_some();
                idle.then_some((c.deadline, i))
            })
            .min()
            .map(|(_, i)| i)
    }

    fn on_event(&mut self, slot: usize, hangup: bool) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
        if matches!(conn.phase, Phase::Lent) {
            if hangup && let Some(c) = &conn.cancel {
                c.cancel();
            }
            return;
        }
        if hangup && matches!(conn.phase, Phase::Running) {
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
        loop {
            let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
            let mut ctx = Ctx { gw: &gw, slot, notifier: &self.notifier, registry: self.poll.registry() };
            while let Some(stream) = conn.stream.as_mut() {
                let reading = !conn.eof
                    && !matches!(conn.phase, Phase::Closing)
                    && conn.wbuf.len() < WRITE_CAP
                    && (conn.rbuf.len() < READ_CAP
                        || matches!(conn.phase, Phase::Idle | Phase::Head | Phase::Body { .. }));
                let mut progressed = false;
                if reading {
                    match stream.read(&mut self.scratch) {
                        Ok(0) => conn.eof = true,
                        Ok(n) => {
                            conn.rbuf.extend_from_slice(&self.scratch[..n]);
                            progressed = true;
                            taken += n;
                        }
                        Err(e) if would_block(&e) => {}
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
                    if !matches!(conn.phase, Phase::Ws(_)) {
                        let e = ApiError::server(
                            500,
                            "internal_error",
                            "The server had an error while processing your request",
                        );
                        let before = conn.wbuf.len();
                        respond(conn, e.response(), false, true);
                        let bytes = (conn.wbuf.len() - before) as u64;
                        match conn.access.take() {
                            Some(a) => a.finish(500, bytes),
                            None => access::immediate(None, Instant::now(), 500, bytes, None),
                        }
                    }
                    conn.phase = Phase::Closing;
                    conn.deadline = Some(Instant::now() + LINGER);
                }
                if !progressed || taken >= READ_BUDGET {
                    break;
                }
            }
            let held = conn.wbuf.len() >= WRITE_CAP;
            if conn.eof {
                match conn.phase {
                    Phase::Running => {
                        if let Some(c) = &conn.cancel {
                            c.cancel();
                        }
                    }
                    Phase::Lent => {}
                    Phase::Ws(ref mut s) => {
                        s.on_eof();
                        conn.phase = Phase::Closing;
                    }
                    // Requests that arrived before the end are still answered once it drains.
                    _ if held && !conn.rbuf.is_empty() => {}
                    _ => {
                        // The peer is done sending; nothing more can arrive, so finish what is queued.
                        conn.phase = Phase::Closing;
                    }
                }
            }
            if flush(conn) {
                return self.close(slot);
            }
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
            Done::Respond { slot, id, .. } | Done::Return { slot, id, .. } | Done::Ws { slot, id, .. } => (*slot, *id),
        };
        let Some(Some(conn)) = self.conns.get_mut(slot) else { return };
        if conn.id != id {
            return;
        }
        match d {
            Done::Respond { resp, head_only, close, .. } => {
                conn.cancel = None;
                let pending = conn.access.take();
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
                        conn.phase = Phase::Closing
                    }
                }
                self.drive(slot);
            }
            Done::Return { stream, .. } => {
                conn.cancel = None;
                if let Some(mut w) = conn.watcher.take() {
                    let _ = self.poll.registry().deregister(&mut w);
                }
                let Some(std) = stream else { return self.close(slot) };
                if std.set_nonblocking(true).is_err() {
                    return self.close(slot);
                }
                let mut s = TcpStream::from_std(std);
                let token = Token(slot + 2);
                if self.poll.registry().register(&mut s, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                    return self.close(slot);
                }
                conn.stream = Some(s);
                finish_exchange(conn, false, &self.gw);
                self.drive(slot);
            }
            Done::Ws { msg, .. } => {
                if let Some(n) = &conn.notifier {
                    n.taken(ws_len(&msg));
                }
                if let Phase::Ws(s) = &mut conn.phase {
                    s.outgoing(msg, &mut conn.wbuf);
                    if s.is_closed() {
                        conn.phase = Phase::Closing;
                    }
                }
                self.drive(slot);
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else { continue };
            if let Phase::Ws(s) = &mut conn.phase {
                s.on_timer(now, &mut conn.wbuf);
                if s.is_closed() {
                    conn.phase = Phase::Closing;
                    conn.deadline = Some(now + LINGER);
                }
                self.drive(slot);
                continue;
            }
            if matches!(conn.phase, Phase::Closing) && conn.deadline.is_none() {
                // Whatever way a connection came to be closing, it gets a bounded time to take
                // its last bytes: a peer that stops reading cannot hold the slot forever.
                conn.deadline = Some(now + LINGER);
            }
            let Some(d) = conn.deadline else { continue };
            if now < d {
                continue;
            }
            match conn.phase {
                Phase::Head | Phase::Body { .. } => {
                    let before = conn.wbuf.len();
                    let head = match &conn.phase {
                        Phase::Body { head, .. } => Some(head.as_ref().clone()),
                        _ => None,
                    };
                    respond(conn, ApiError::timed_out().response(), false, true);
                    let bytes = (conn.wbuf.len() - before) as u64;
                    match conn.access.take() {
                        Some(a) => a.finish(408, bytes),
                        None => access::immediate(head.as_ref(), now, 408, bytes, None),
                    }
                    conn.deadline = Some(now + LINGER);
                    self.drive(slot);
                }
                Phase::Idle | Phase::Closing => self.close(slot),
                _ => {}
            }
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else { return };
        if let Some(c) = &conn.cancel {
            c.cancel();
        }
        if let Some(a) = conn.access.take() {
            a.finish(access::CLIENT_CLOSED, 0);
        }
        if let Phase::Ws(s) = &mut conn.phase {
            s.on_eof();
        }
        if let Some(mut s) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if let Some(mut w) = conn.watcher.take() {
            let _ = self.poll.registry().deregister(&mut w);
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
            if matches!(c.phase, Phase::Idle) {
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
    slot: usize,
    notifier: &'a Notifier,
    registry: &'a mio::Registry,
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
    if conn.wbuf.is_empty() && conn.wbuf.capacity() > 64 * 1024 {
        conn.wbuf.shrink_to(4096);
    }
    if let Some(n) = &conn.notifier {
        n.unsent(conn.wbuf.len());
    }
    conn.wbuf.is_empty() && matches!(conn.phase, Phase::Closing)
}

/// Queue a response; an HTTP/1.0 client that asked for keep-alive gets it confirmed.
fn encode(conn: &mut Conn, resp: Response, head_only: bool, close: bool) {
    let resp = if conn.minor == 0 && !close { resp.header("Connection", "keep-alive") } else { resp };
    resp.encode(&mut conn.wbuf, head_only, close);
}

/// Queue a response and move to the next request (or to closing).
fn respond(conn: &mut Conn, resp: Response, head_only: bool, close: bool) {
    encode(conn, resp, head_only, close);
    conn.phase = if close { Phase::Closing } else { Phase::Idle };
}

/// After a response: back to idle (with the idle timer), or closing.
fn finish_exchange(conn: &mut Conn, close: bool, gw: &Gateway) {
    // Not ready means draining: no further requests on this connection.
    if close || conn.eof || !gw.is_ready() {
        conn.phase = Phase::Closing;
        conn.deadline = Some(Instant::now() + LINGER);
    } else {
        conn.phase = Phase::Idle;
        conn.deadline = Some(Instant::now() + gw.config.gateway.idle_timeout);
        if conn.rbuf.capacity() > 64 * 1024 && conn.rbuf.len() < 4096 {
            conn.rbuf.shrink_to(4096);
        }
    }
}

/// Parse and act on whatever complete requests are buffered, in order.
fn process(conn: &mut Conn, ctx: &mut Ctx<'_>) {
    loop {
        match &mut conn.phase {
            Phase::Idle | Phase::Head => {
                if conn.rbuf.is_empty() || conn.wbuf.len() >= WRITE_CAP {
                    return;
                }
                match head::parse(&conn.rbuf) {
                    Ok(None) => {
                        if matches!(conn.phase, Phase::Idle) {
                            conn.phase = Phase::Head;
                            // A newcomer's head deadline runs from accept (set then).
                            if conn.served {
                                conn.deadline = Some(Instant::now() + ctx.gw.config.gateway.header_timeout);
                            }
                        }
                        return;
                    }
                    Err(e) => {
                        let err = ApiError::from(e);
                        let before = conn.wbuf.len();
                        respond(conn, err.response(), false, true);
                        let bytes = (conn.wbuf.len() - before) as u64;
                        access::immediate(None, Instant::now(), e.status(), bytes, None);
                        conn.deadline = Some(Instant::now() + LINGER);
                        return;
                    }
                    Ok(Some((h, n))) => {
                        conn.rbuf.drain(..n);
                        conn.served = true;
                        on_head(conn, ctx, h);
                    }
                }
            }
            Phase::Body { reader, body, .. } => {
                let before = conn.rbuf.len();
                let done = match reader {
                    BodyReader::Length(left) => {
                        let n = (*left).min(conn.rbuf.len() as u64) as usize;
                        body.extend_from_slice(&conn.rbuf[..n]);
                        conn.rbuf.drain(..n);
                        *left -= n as u64;
                        *left == 0
                    }
                    BodyReader::Chunked(d) => match d.decode(&conn.rbuf, body) {
                        Ok(n) => {
                            conn.rbuf.drain(..n);
                            d.is_done()
                        }
                        Err(e) => {
                            let err = ApiError::from_chunk(e, ctx.gw.config.gateway.max_body_bytes);
                            let status = err.status;
                            let before = conn.wbuf.len();
                            respond(conn, err.response(), false, true);
                            if let Some(a) = conn.access.take() {
                                a.finish(status, (conn.wbuf.len() - before) as u64);
                            }
                            conn.deadline = Some(Instant::now() + LINGER);
                            return;
                        }
                    },
                };
                if !done {
                    if conn.rbuf.len() < before {
                        // A slow upload that keeps making progress is not a stalled one.
                        conn.deadline = Some(Instant::now() + ctx.gw.config.gateway.header_timeout);
                    }
                    return;
                }
                let Phase::Body { head, body, .. } = std::mem::replace(&mut conn.phase, Phase::Idle) else { return };
                dispatch_chat(conn, ctx, *head, body);
            }
            Phase::Ws(s) => {
                let n = s.on_bytes(&conn.rbuf, &mut conn.wbuf, ctx.gw, conn.peer.ip());
                conn.rbuf.drain(..n);
                if s.is_closed() {
                    conn.phase = Phase::Closing;
                    conn.deadline = Some(Instant::now() + LINGER);
                }
                return;
            }
            Phase::Running | Phase::Lent | Phase::Closing => return,
        }
    }
}

fn on_head(conn: &mut Conn, ctx: &mut Ctx<'_>, h: Head) {
    conn.minor = h.minor;
    let start = Instant::now();
    let head_only = h.method == "HEAD";
    let has_body = !matches!(h.body, Some(BodyFraming::None) | None);
    match handler::on_head(ctx.gw, &h, conn.peer.ip()) {
        HeadAction::Respond(mut resp) => {
            if route_is_chat(&h) {
                resp = resp.header("x-request-id", format!("req-{}", crate::util::random_hex(24)));
            }
            // An unread body would be taken for the next request: close instead.
            let close = h.close || has_body;
            let (status, before) = (resp.status, conn.wbuf.len());
            let rid = access::request_id(&resp.headers).map(str::to_string);
            respond(conn, resp, head_only, close);
            access::immediate(Some(&h), start, status, (conn.wbuf.len() - before) as u64, rid.as_deref());
            if close {
                conn.deadline = Some(Instant::now() + LINGER);
            } else {
                conn.deadline = Some(Instant::now() + ctx.gw.config.gateway.idle_timeout);
            }
        }
        HeadAction::ReadBody { limit, continue_100 } => {
            if continue_100 {
                conn.wbuf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let reader = match h.body {
                Some(BodyFraming::Length(n)) => BodyReader::Length(n),
                Some(BodyFraming::Chunked) => BodyReader::Chunked(ChunkedDecoder::new(limit)),
                _ => BodyReader::Length(0),
            };
            conn.deadline = Some(Instant::now() + ctx.gw.config.gateway.header_timeout);
            conn.access = Some(Box::new(access::Pending::new(&h, start)));
            conn.phase = Phase::Body { head: Box::new(h), reader, body: Vec::new() };
        }
        HeadAction::Upgrade => match ws::handshake::accept(&h) {
            Ok(resp_bytes) => {
                access::immediate(Some(&h), start, 101, resp_bytes.len() as u64, None);
                conn.gauge.upgrade();
                conn.wbuf.extend_from_slice(&resp_bytes);
                conn.deadline = None;
                let notifier = ctx.notifier.for_connection();
                let outbox = Arc::new(outbox::ConnOutbox { notifier: notifier.clone(), slot: ctx.slot, id: conn.id });
                conn.notifier = Some(notifier);
                conn.phase = Phase::Ws(Box::new(rpc::Session::new(outbox, conn.id, Instant::now(), &mut conn.wbuf)));
            }
            Err(e) => {
                let resp = ApiError::from(e).response();
                let close = h.close || has_body;
                let (status, before) = (resp.status, conn.wbuf.len());
                respond(conn, resp, head_only, close);
                access::immediate(Some(&h), start, status, (conn.wbuf.len() - before) as u64, None);
            }
        },
    }
}

fn route_is_chat(h: &Head) -> bool {
    matches!(handler::route(h.path()), handler::Route::Chat)
}

fn chat_error(conn: &mut Conn, e: ApiError, h: &Head, gw: &Gateway) {
    let rid = format!("req-{}", crate::util::random_hex(24));
    let resp = handler::with_headers(e.response(), handler::api_headers(gw, h)).header("x-request-id", rid.clone());
    let (status, before) = (resp.status, conn.wbuf.len());
    encode(conn, resp, false, h.close);
    if let Some(mut a) = conn.access.take() {
        a.request_id = Some(rid);
        a.finish(status, (conn.wbuf.len() - before) as u64);
    }
    finish_exchange(conn, h.close, gw);
}

/// A complete chat completion request: validate, resolve, admit, and hand to a worker.
fn dispatch_chat(conn: &mut Conn, ctx: &mut Ctx<'_>, h: Head, body: Vec<u8>) {
    let gw = ctx.gw;
    // The body came through the read buffer: do not keep its size for as long as the run lasts.
    if conn.rbuf.capacity() > 4096 {
        conn.rbuf.shrink_to(conn.rbuf.len());
    }
    let req = match chat::parse(&body) {
        Ok(r) => r,
        Err(e) => return chat_error(conn, e, &h, gw),
    };
    drop(body);
    let run = match chat::to_run(gw, &req, h.agent_id.as_deref(), h.session_key.as_deref()) {
        Ok(r) => r,
        Err(e) => return chat_error(conn, e, &h, gw),
    };
    if let Some(a) = conn.access.as_mut().filter(|_| crate::log::access_enabled()) {
        a.agent = Some(gw.agents[run.agent].cfg.id.clone());
        a.session_key = Some(run.session_key.clone());
        a.request_id = Some(run.run_id.clone());
    }
    let admission = match gw.pool.admit_from(Some(conn.peer.ip().to_canonical())) {
        Ok(a) => a,
        Err(Refused::Full) => {
            crate::log!(Warn, "run queue full: 503 to {}", conn.peer);
            crate::metrics::run_rejected();
            return chat_error(conn, ApiError::overloaded(), &h, gw);
        }
        Err(Refused::PerIp(limit)) => {
            crate::log!(Debug, "{} has {limit} runs (gateway.maxRunsPerIp): 429", conn.peer);
            crate::metrics::run_rejected();
            return chat_error(conn, ApiError::too_many_runs(limit), &h, gw);
        }
    };
    let cancel = CancelToken::new();
    conn.cancel = Some(cancel.clone());
    conn.deadline = None;
    let model = chat::echo_model(&req, &gw.agents[run.agent].cfg.id);
    let session = run.sticky.then(|| run.session_key.clone());
    crate::log!(Debug, "run {} {} agent={} stream={}", run.run_id, conn.peer, gw.agents[run.agent].cfg.id, req.stream);
    let job = ChatJob {
        gw: gw.clone(),
        run,
        model,
        include_usage: req.include_usage,
        cancel,
        http10: h.minor == 0,
        close: h.close,
        head_only: h.method == "HEAD",
        headers: handler::api_headers(gw, &h),
        access: None,
        written: Default::default(),
        status: Default::default(),
    };
    let (slot, id) = (ctx.slot, conn.id);
    let notifier = ctx.notifier.clone();
    if !req.stream {
        conn.phase = Phase::Running;
        let close = h.close;
        admission.submit(session, move || {
            let mut guard = ReturnGuard { notifier: notifier.clone(), slot, id, armed: true };
            let resp = job.run_buffered();
            guard.armed = false;
            notifier.send(Done::Respond { slot, id, resp, head_only: job.head_only, close });
        });
        return;
    }
    // Streaming: lend the socket to the worker and watch a duplicate for hang-up.
    let Some(mut mio_stream) = conn.stream.take() else { return };
    let _ = ctx.registry.deregister(&mut mio_stream);
    let std_stream: std::net::TcpStream = mio_stream.into();
    // Token streams need little bandwidth; left to autotuning, the kernel would keep up to
    // 4 MiB per socket for a client that does not read (and the stall would show that late).
    let _ = socket2::SockRef::from(&std_stream).set_send_buffer_size(STREAM_SNDBUF);
    let watch = std_stream.try_clone().map(TcpStream::from_std);
    if let Ok(mut w) = watch
        && ctx.registry.register(&mut w, Token(slot + 2), Interest::READABLE).is_ok()
    {
        conn.watcher = Some(w);
    }
    let prefix = std::mem::take(&mut conn.wbuf);
    conn.phase = Phase::Lent;
    let keep_alive = !h.close;
    let mut job = job;
    job.access = conn.access.take();
    let earlier = prefix.len() as u64;
    admission.submit(session, move || {
        let mut sock = std_stream;
        let mut guard = ReturnGuard { notifier: notifier.clone(), slot, id, armed: true };
        let ok = sock.set_nonblocking(false).is_ok() && sock.set_write_timeout(Some(stream::WRITE_STEP)).is_ok();
        let reuse = ok && job.run_streaming(&mut sock, prefix) && keep_alive;
        if let Some(a) = &job.access {
            // The prefix holds earlier responses' bytes.
            a.finish(job.status.get(), job.written.get().saturating_sub(earlier));
        }
        guard.armed = false;
        notifier.send(Done::Return { slot, id, stream: reuse.then_some(sock) });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(len: usize) -> Done {
        Done::Ws { slot: 0, id: 1, msg: rpc::Outgoing::Event { name: "agent", payload: "x".repeat(len) } }
    }

    #[test]
    fn a_connection_is_congested_while_its_outbound_bytes_exceed_the_bound() {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).unwrap());
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
