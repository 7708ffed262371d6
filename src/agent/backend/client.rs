//! The HTTP/1.1 client transport for upstreams: connections (plain or TLS), a bounded keep-alive
//! pool per upstream, and the one-retry rule for connections that went stale while idle.
//!
//! Everything blocks on the worker thread that owns the run, in steps of [`TICK`]: sockets carry a
//! [`TICK`] read/write timeout, and between steps the run's cancel token and deadline are checked
//! and the event sink is ticked. So a cancel or a deadline ends a run within a step whatever the
//! upstream does: while resolving (on a helper thread), connecting (non-blocking
//! connect polled in steps), in the TLS handshake, or waiting for bytes.
//!
//! A connection goes back to the pool only after a response whose end the framing proved
//! (`Content-Length` or chunked, not close-delimited) and that the upstream did not mark
//! `Connection: close`; a cancelled or failed exchange drops its connection, which closes it — that
//! is how the upstream learns to stop generating.

use crate::metrics::POOL_STATS;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::upstream::{self, BaseUrl, ResponseHead, Stop, UpstreamError};
use crate::agent::{EventSink, RunControl, TICK};
use crate::http::framing::{BodyDecoder, Framing};

/// A pooled connection idle for longer than this is probed (a non-blocking peek) before reuse,
/// so one the upstream closed a while ago is not even written to. Younger ones rely on the retry.
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// Most bytes read at once from a socket.
const READ_SIZE: usize = 16 * 1024;

/// How an upstream is reached.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Budget for DNS, TCP connect and TLS handshake together.
    pub connect_timeout: Duration,
    /// Longest silence tolerated once connected.
    pub read_timeout: Duration,
    /// Idle connections kept (0: one connection per request).
    pub max_idle: usize,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
    /// DER certificates of the roots to trust instead of the bundled web PKI roots (`caFile`).
    pub ca_certs: Vec<Vec<u8>>,
}

/// The client for one upstream (one `baseUrl`): shared by every worker running it.
#[derive(Debug)]
pub struct Client {
    url: BaseUrl,
    opts: ClientOptions,
    pool: Arc<Pool>,
    #[cfg(feature = "tls")]
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

#[derive(Debug)]
struct Pool {
    state: Mutex<PoolState>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Oldest first; each with the instant it became idle.
    idle: Vec<(Conn, Instant)>,
    /// A reaper thread is closing expired connections.
    reaping: bool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn idle_gone(n: usize) {
    POOL_STATS.idle.fetch_sub(n as i64, Relaxed);
}

/// Closes idle connections as they expire, so an upstream sees them go after `idleTimeoutMs` even
/// when no run comes. Exits when the pool is empty (or dropped); the next release starts another.
fn reap(pool: Weak<Pool>) {
    loop {
        let wait = {
            let Some(p) = pool.upgrade() else { return };
            let now = Instant::now();
            let mut st = p.lock();
            let expired: Vec<_> = {
                let keep = st.idle.iter().position(|(_, t)| now.duration_since(*t) < p.idle_timeout);
                let n = keep.unwrap_or(st.idle.len());
                st.idle.drain(..n).collect()
            };
            idle_gone(expired.len());
            let next = st.idle.first().map(|(_, t)| (*t + p.idle_timeout).saturating_duration_since(now));
            if next.is_none() {
                st.reaping = false;
            }
            drop(st);
            drop(expired);
            match next {
                Some(d) => d,
                None => return,
            }
        };
        std::thread::sleep(wait + Duration::from_millis(5));
    }
}

/// A response whose head has arrived; its body is read with [`Exchange::read_body`].
#[derive(Debug)]
pub struct Exchange {
    conn: Conn,
    /// The response head.
    pub head: ResponseHead,
    /// Raw bytes received after the head and not yet decoded.
    buf: Vec<u8>,
    body: BodyDecoder,
}

impl Exchange {
    /// Decode the next body bytes into `plain` (appending), reading from the upstream once when
    /// nothing is buffered. `Ok(false)` when the body is complete; a close the framing did not
    /// expect is `Err(UpstreamError::ClosedMidBody)`.
    pub fn read_body(&mut self, plain: &mut Vec<u8>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<bool, Stop> {
        loop {
            if !self.buf.is_empty() {
                let used = self.body.decode(&self.buf, plain).map_err(UpstreamError::Chunked)?;
                self.buf.drain(..used);
                if used > 0 || self.body.is_done() {
                    return Ok(!self.body.is_done());
                }
            }
            if self.body.is_done() {
                return Ok(false);
            }
            if self.conn.recv(&mut self.buf, ctl, out)? == 0 {
                if !self.body.complete_at_close() {
                    return Err(UpstreamError::ClosedMidBody.into());
                }
                return Ok(false);
            }
        }
    }

    /// Whether the framing says the body is complete.
    pub fn is_done(&self) -> bool {
        self.body.is_done()
    }

    /// Read the rest of the body when it is short and (nearly) all there, so the connection can
    /// be reused: at most `max_bytes` more and one wait of at most [`TICK`]. False when it did not
    /// end in that budget (the connection is then closed by the caller dropping it).
    pub fn finish_quietly(&mut self, max_bytes: usize, ctl: &RunControl, out: &mut dyn EventSink) -> bool {
        if self.body.is_done() {
            return true;
        }
        // One silent step is all the wait allowed: the reply is complete already.
        let idle = std::mem::replace(&mut self.conn.idle, TICK);
        self.conn.last_byte = Instant::now();
        let start = Instant::now();
        let mut sink = Vec::new();
        while !self.body.is_done() {
            if sink.len() > max_bytes || start.elapsed() >= TICK {
                return false;
            }
            match self.read_body(&mut sink, ctl, out) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => return false,
            }
        }
        self.conn.idle = idle;
        self.body.is_done()
    }
}

impl Client {
    /// A client for `url`. Fails only when TLS cannot be set up (an https URL in a build without
    /// TLS, or `ca_certs` that are not certificates).
    pub fn new(url: BaseUrl, opts: ClientOptions) -> Result<Client, String> {
        #[cfg(feature = "tls")]
        let tls = if url.tls { Some(tls_config(&url.host, &opts.ca_certs)?) } else { None };
        #[cfg(not(feature = "tls"))]
        if url.tls {
            return Err("https:// upstreams need TLS, which this build does not include".into());
        }
        let pool = Arc::new(Pool {
            state: Mutex::new(PoolState::default()),
            max_idle: opts.max_idle,
            idle_timeout: opts.idle_timeout,
        });
        Ok(Client {
            url,
            opts,
            pool,
            #[cfg(feature = "tls")]
            tls,
        })
    }

    /// The upstream's base URL.
    pub fn url(&self) -> &BaseUrl {
        &self.url
    }

    /// Send `req` (a whole request) and read the response head: on a pooled connection when one
    /// is idle, else a fresh one. A pooled connection that turns out dead before any response byte
    /// (write error, reset, close) is dropped with every other idle one and the request goes once
    /// more, on a fresh connection. Nothing is retried once a response byte has arrived.
    pub fn send(&self, req: &[u8], ctl: &RunControl, out: &mut dyn EventSink) -> Result<Exchange, Stop> {
        if let Some(conn) = self.take_idle() {
            match self.exchange(conn, req, ctl, out) {
                Ok(ex) => {
                    POOL_STATS.reused.fetch_add(1, Relaxed);
                    return Ok(ex);
                }
                Err((e, false)) if is_stale(&e) => {
                    let dead = std::mem::take(&mut self.pool.lock().idle);
                    idle_gone(dead.len());
                    drop(dead);
                }
                Err((e, _)) => return Err(e),
            }
        }
        let conn = self.connect(ctl, out)?;
        self.exchange(conn, req, ctl, out).map_err(|(e, _)| e)
    }

    /// Give a finished exchange's connection back to the pool when it can carry another request.
    pub fn release(&self, ex: Exchange) {
        let reusable = ex.head.keep_alive
            && ex.body.is_done()
            && ex.buf.is_empty()
            && !matches!(ex.head.framing, Framing::CloseDelimited)
            && self.pool.max_idle > 0;
        if !reusable {
            return;
        }
        let mut st = self.pool.lock();
        let evicted = if st.idle.len() >= self.pool.max_idle { Some(st.idle.remove(0)) } else { None };
        st.idle.push((ex.conn, Instant::now()));
        POOL_STATS.idle.fetch_add(1 - i64::from(evicted.is_some()), Relaxed);
        let start_reaper = !st.reaping;
        st.reaping = true;
        drop(st);
        drop(evicted);
        if start_reaper {
            let weak = Arc::downgrade(&self.pool);
            let spawned = std::thread::Builder::new().name("gatelet-upstream-reaper".into()).spawn(move || reap(weak));
            if spawned.is_err() {
                // No reaper: keep nothing rather than leak idle sockets past their timeout.
                let mut st = self.pool.lock();
                st.reaping = false;
                let idle = std::mem::take(&mut st.idle);
                drop(st);
                idle_gone(idle.len());
                drop(idle);
            }
        }
    }

    fn take_idle(&self) -> Option<Conn> {
        let (conn, since) = {
            let mut st = self.pool.lock();
            let (conn, since) = st.idle.pop()?;
            idle_gone(1);
            if since.elapsed() >= self.pool.idle_timeout {
                // The most recent one expired: so did every other.
                let rest = std::mem::take(&mut st.idle);
                drop(st);
                idle_gone(rest.len());
                drop(rest);
                return None;
            }
            (conn, since)
        };
        if since.elapsed() >= PROBE_AFTER && !conn.looks_alive() {
            return None;
        }
        Some(conn)
    }

    /// Write the request and read up to the end of the response head. The flag on an error says
    /// whether any response byte had arrived.
    fn exchange(
        &self,
        mut conn: Conn,
        req: &[u8],
        ctl: &RunControl,
        out: &mut dyn EventSink,
    ) -> Result<Exchange, (Stop, bool)> {
        conn.last_byte = Instant::now();
        conn.send(req, ctl, out).map_err(|e| (e, false))?;
        let mut buf = Vec::with_capacity(READ_SIZE);
        loop {
            match upstream::parse_head(&buf) {
                Ok(Some((head, n))) => {
                    buf.drain(..n);
                    let body = BodyDecoder::new(head.framing, u64::MAX);
                    return Ok(Exchange { conn, head, buf, body });
                }
                Ok(None) => {}
                Err(e) => return Err((e.into(), true)),
            }
            let got = !buf.is_empty();
            match conn.recv(&mut buf, ctl, out) {
                Ok(0) => return Err((UpstreamError::ClosedBeforeHead.into(), got)),
                Ok(_) => {}
                Err(e) => return Err((e, got)),
            }
        }
    }

    fn connect(&self, ctl: &RunControl, out: &mut dyn EventSink) -> Result<Conn, Stop> {
        let end = Instant::now() + self.opts.connect_timeout;
        let timeout = self.opts.connect_timeout;
        let addrs = resolve(&self.url.host, self.url.port, end, timeout, ctl, out, system_lookup)?;
        let mut last_err = None;
        let mut sock = None;
        for addr in addrs {
            match connect_one(addr, end, timeout, ctl, out) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(Stop::Upstream(UpstreamError::Connect(e))) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        let Some(sock) = sock else {
            return Err(match last_err {
                Some(e) => UpstreamError::Connect(e),
                None => UpstreamError::Resolve(io::Error::new(io::ErrorKind::NotFound, "no addresses")),
            }
            .into());
        };
        POOL_STATS.opened.fetch_add(1, Relaxed);
        // Tokens are small writes that must not wait for Nagle.
        let _ = sock.set_nodelay(true);
        sock.set_read_timeout(Some(TICK)).map_err(UpstreamError::Connect)?;
        sock.set_write_timeout(Some(TICK)).map_err(UpstreamError::Connect)?;
        #[cfg(feature = "tls")]
        if let Some((cfg, name)) = &self.tls {
            let tls = rustls::ClientConnection::new(cfg.clone(), name.clone())
                .map_err(|e| UpstreamError::Tls(e.to_string()))?;
            let mut conn = Conn {
                stream: Stream::Tls(Box::new(TlsStream { sock, tls })),
                idle: self.opts.read_timeout,
                last_byte: Instant::now(),
                ack_due: false,
            };
            conn.handshake(end, timeout, ctl, out)?;
            return Ok(conn);
        }
        Ok(Conn {
            stream: Stream::Plain(sock),
            idle: self.opts.read_timeout,
            last_byte: Instant::now(),
            ack_due: false,
        })
    }
}

/// Whether an error on a reused connection, before any response byte, means it had gone stale.
fn is_stale(e: &Stop) -> bool {
    match e {
        Stop::Upstream(UpstreamError::Write(_) | UpstreamError::ClosedBeforeHead) => true,
        Stop::Upstream(UpstreamError::Read(e)) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// The system's blocking name lookup (what [`resolve`] is given outside tests).
fn system_lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Vec::from_iter)
}

/// The addresses of `host`, without letting a resolver that hangs hold the run: names (not IP
/// literals) are looked up with `lookup` on a short-lived helper thread while this one waits in
/// [`TICK`] steps, giving up at `end` (the connect budget), on cancel or at the run's deadline. A
/// resolver that never answers leaves its helper thread behind until the system resolver gives
/// up. The lookup is a parameter so that tests can stand in a resolver that never answers.
fn resolve(
    host: &str,
    port: u16,
    end: Instant,
    timeout: Duration,
    ctl: &RunControl,
    out: &mut dyn EventSink,
    lookup: fn(&str, u16) -> io::Result<Vec<SocketAddr>>,
) -> Result<Vec<SocketAddr>, Stop> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let name = host.to_string();
    std::thread::Builder::new()
        .name("gatelet-dns".into())
        .spawn(move || {
            let _ = tx.send(lookup(&name, port));
        })
        .map_err(UpstreamError::Resolve)?;
    loop {
        ctl.check()?;
        let now = Instant::now();
        if now >= end {
            return Err(UpstreamError::ConnectTimeout(timeout).into());
        }
        match rx.recv_timeout((end - now).min(TICK)) {
            Ok(r) => return Ok(r.map_err(UpstreamError::Resolve)?),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => out.tick()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(UpstreamError::Resolve(io::Error::other("resolver thread failed")).into());
            }
        }
    }
}

/// A non-blocking connect polled every [`TICK`], so a cancel or the deadline ends it at once even
/// when the upstream drops SYNs.
fn connect_one(
    addr: SocketAddr,
    end: Instant,
    timeout: Duration,
    ctl: &RunControl,
    out: &mut dyn EventSink,
) -> Result<TcpStream, Stop> {
    use mio::{Events, Interest, Poll, Token};
    let mut sock = mio::net::TcpStream::connect(addr).map_err(UpstreamError::Connect)?;
    let mut poll = Poll::new().map_err(UpstreamError::Connect)?;
    poll.registry().register(&mut sock, Token(0), Interest::WRITABLE).map_err(UpstreamError::Connect)?;
    let mut events = Events::with_capacity(4);
    loop {
        ctl.check()?;
        let now = Instant::now();
        if now >= end {
            return Err(UpstreamError::ConnectTimeout(timeout).into());
        }
        match poll.poll(&mut events, Some((end - now).min(TICK))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UpstreamError::Connect(e).into()),
        }
        if events.is_empty() {
            out.tick()?;
            continue;
        }
        // Writable means connected or failed; spurious wake-ups show as NotConnected.
        if let Some(e) = sock.take_error().map_err(UpstreamError::Connect)? {
            return Err(UpstreamError::Connect(e).into());
        }
        match sock.peer_addr() {
            Ok(_) => {
                poll.registry().deregister(&mut sock).map_err(UpstreamError::Connect)?;
                let std: TcpStream = sock.into();
                std.set_nonblocking(false).map_err(UpstreamError::Connect)?;
                return Ok(std);
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
            Err(e) => return Err(UpstreamError::Connect(e).into()),
        }
    }
}

/// The roots, protocol versions and host name for an https upstream.
#[cfg(feature = "tls")]
fn tls_config(
    host: &str,
    ca_certs: &[Vec<u8>],
) -> Result<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>), String> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    if ca_certs.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        for der in ca_certs {
            roots.add(CertificateDer::from(der.clone())).map_err(|e| format!("caFile: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name =
        ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
    Ok((Arc::new(cfg), name))
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream>),
}

#[cfg(feature = "tls")]
#[derive(Debug)]
struct TlsStream {
    sock: TcpStream,
    tls: rustls::ClientConnection,
}

/// One upstream connection. Dropping it closes it.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    /// Longest silence tolerated.
    idle: Duration,
    last_byte: Instant,
    /// Bytes were read since the last acknowledgement was forced (see [`Conn::ack_now`]).
    ack_due: bool,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Conn {
    fn sock(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => &t.sock,
        }
    }

    fn sock_mut(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => &mut t.sock,
        }
    }

    /// An idle connection with nothing to read is alive; one the upstream closed (or that holds
    /// unexpected bytes) is not.
    fn looks_alive(&self) -> bool {
        let s = self.sock();
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let r = s.peek(&mut [0u8; 1]);
        let back = s.set_nonblocking(false).is_ok();
        back && matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Acknowledge what arrived at once rather than after the delayed-ACK timer. An upstream
    /// that writes small pieces with Nagle on (no `TCP_NODELAY`: Python's http.server, cpp-httplib
    /// as in llama.cpp by default) holds each piece until the previous one is acknowledged; on a
    /// kept-alive connection (out of the kernel's initial quick-ACK phase) every such wait would
    /// cost up to 40 ms. The kernel clears the flag as it goes, so it is set again before each
    /// wait that follows a read (the pending ACK leaves at once then): a response that arrives in
    /// one read, the common case, costs no extra system call.
    fn ack_now(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::TcpStreamExt;
            let _ = self.sock().set_quickack(true);
        }
    }

    /// A step of waiting: fail on cancel, deadline or too long a silence; tick the sink.
    fn waited(&self, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Stop> {
        ctl.check()?;
        if self.last_byte.elapsed() >= self.idle {
            return Err(UpstreamError::ReadTimeout(self.idle).into());
        }
        out.tick()?;
        Ok(())
    }

    /// Write all of `buf`.
    pub fn send(&mut self, mut buf: &[u8], ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Stop> {
        match &mut self.stream {
            Stream::Plain(_) => {}
            #[cfg(feature = "tls")]
            Stream::Tls(_) => return self.send_tls(buf, ctl, out),
        }
        while !buf.is_empty() {
            match self.sock_mut().write(buf) {
                Ok(0) => return Err(UpstreamError::Write(io::ErrorKind::WriteZero.into()).into()),
                Ok(n) => {
                    buf = &buf[n..];
                    self.last_byte = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => self.waited(ctl, out)?,
                Err(e) => return Err(UpstreamError::Write(e).into()),
            }
        }
        self.last_byte = Instant::now();
        // The request carried the acknowledgement of anything read before it.
        self.ack_due = false;
        Ok(())
    }

    /// Read some bytes into `buf` (appending); `Ok(0)` at end of stream.
    pub fn recv(&mut self, buf: &mut Vec<u8>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<usize, Stop> {
        match &mut self.stream {
            Stream::Plain(_) => {}
            #[cfg(feature = "tls")]
            Stream::Tls(_) => return self.recv_tls(buf, ctl, out),
        }
        let start = buf.len();
        buf.resize(start + READ_SIZE, 0);
        if std::mem::take(&mut self.ack_due) {
            self.ack_now();
        }
        loop {
            match self.sock_mut().read(&mut buf[start..]) {
                Ok(n) => {
                    buf.truncate(start + n);
                    self.last_byte = Instant::now();
                    self.ack_due = n > 0;
                    // A check per read too, so a flood of data cannot outrun a cancel.
                    ctl.check()?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if let Err(e) = self.waited(ctl, out) {
                        buf.truncate(start);
                        return Err(e);
                    }
                }
                Err(e) => {
                    buf.truncate(start);
                    return Err(UpstreamError::Read(e).into());
                }
            }
        }
    }
}

#[cfg(feature = "tls")]
fn tls_error(e: rustls::Error) -> UpstreamError {
    let hint = match &e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => " (a private CA needs `caFile`)",
        _ => "",
    };
    UpstreamError::Tls(format!("{e}{hint}"))
}

#[cfg(feature = "tls")]
impl Conn {
    fn tls(&mut self) -> &mut TlsStream {
        match &mut self.stream {
            Stream::Tls(t) => t,
            Stream::Plain(_) => unreachable!("a TLS call on a plain connection"),
        }
    }

    /// Write out every pending TLS record.
    fn flush_tls(&mut self, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Stop> {
        while self.tls().tls.wants_write() {
            let t = self.tls();
            match t.tls.write_tls(&mut t.sock) {
                Ok(_) => self.last_byte = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => self.waited(ctl, out)?,
                Err(e) => return Err(UpstreamError::Write(e).into()),
            }
        }
        Ok(())
    }

    /// Read and process TLS records once (waiting a step when there are none). False at EOF.
    fn fill_tls(&mut self, ctl: &RunControl, out: &mut dyn EventSink) -> Result<bool, Stop> {
        let t = self.tls();
        match t.tls.read_tls(&mut t.sock) {
            Ok(0) => Ok(false),
            Ok(_) => {
                self.last_byte = Instant::now();
                self.ack_now();
                if let Err(e) = self.tls().tls.process_new_packets() {
                    // Tell the upstream why (best effort), then fail.
                    let t = self.tls();
                    let _ = t.tls.write_tls(&mut t.sock);
                    return Err(tls_error(e).into());
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) if is_timeout(&e) => self.waited(ctl, out).map(|_| true),
            Err(e) => Err(UpstreamError::Read(e).into()),
        }
    }

    /// Complete the handshake before `end` (the connect budget).
    fn handshake(
        &mut self,
        end: Instant,
        timeout: Duration,
        ctl: &RunControl,
        out: &mut dyn EventSink,
    ) -> Result<(), Stop> {
        while self.tls().tls.is_handshaking() {
            self.flush_tls(ctl, out)?;
            if !self.tls().tls.is_handshaking() {
                break;
            }
            if Instant::now() >= end {
                return Err(UpstreamError::ConnectTimeout(timeout).into());
            }
            if !self.fill_tls(ctl, out)? {
                return Err(UpstreamError::Tls("the upstream closed the connection during the handshake".into()).into());
            }
        }
        self.flush_tls(ctl, out)
    }

    fn send_tls(&mut self, mut buf: &[u8], ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Stop> {
        while !buf.is_empty() {
            let n = self.tls().tls.writer().write(buf).map_err(UpstreamError::Write)?;
            buf = &buf[n..];
            self.flush_tls(ctl, out)?;
        }
        self.last_byte = Instant::now();
        Ok(())
    }

    fn recv_tls(&mut self, buf: &mut Vec<u8>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<usize, Stop> {
        let start = buf.len();
        buf.resize(start + READ_SIZE, 0);
        let r = loop {
            match self.tls().tls.reader().read(&mut buf[start..]) {
                Ok(n) => break Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end of stream like any other (the body's
                // framing decides whether the response was complete).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(0),
                Err(e) => break Err(UpstreamError::Read(e).into()),
            }
            if let Err(e) = self.flush_tls(ctl, out) {
                break Err(e);
            }
            match self.fill_tls(ctl, out) {
                Ok(true) => {}
                // EOF: the reader now reports what is left, then the end.
                Ok(false) => {
                    let t = self.tls();
                    match t.tls.reader().read(&mut buf[start..]) {
                        Ok(n) => break Ok(n),
                        Err(_) => break Ok(0),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match r {
            Ok(n) => {
                buf.truncate(start + n);
                ctl.check()?;
                Ok(n)
            }
            Err(e) => {
                buf.truncate(start);
                Err(e)
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.sock().shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{CancelToken, RunError};

    /// A resolver that never answers (a DNS server that drops every query, with no timeout).
    fn never(_: &str, _: u16) -> io::Result<Vec<SocketAddr>> {
        loop {
            std::thread::park();
        }
    }

    /// Resolve `upstream.example` with [`never`] on a thread of its own; what it returned, or a
    /// panic when it did not return within a generous bound (it would otherwise hang forever).
    fn resolve_stuck(ctl: RunControl, budget: Duration) -> Result<Vec<SocketAddr>, Stop> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let end = Instant::now() + budget;
            let _ = tx.send(resolve("upstream.example", 443, end, budget, &ctl, &mut (), never));
        });
        rx.recv_timeout(Duration::from_secs(60)).expect("resolve did not give up on a silent resolver")
    }

    #[test]
    fn a_resolver_that_never_answers_ends_with_the_connect_budget() {
        let budget = Duration::from_millis(300);
        let r = resolve_stuck(RunControl::new(CancelToken::new(), Duration::from_secs(3600)), budget);
        assert!(matches!(r, Err(Stop::Upstream(UpstreamError::ConnectTimeout(t))) if t == budget), "{r:?}");
    }

    #[test]
    fn a_resolver_that_never_answers_yields_to_cancel_and_the_run_deadline() {
        let hour = Duration::from_secs(3600);
        let cancel = CancelToken::new();
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.cancel();
        });
        let r = resolve_stuck(RunControl::new(cancel, hour), hour);
        assert!(matches!(r, Err(Stop::Run(RunError::Cancelled))), "{r:?}");
        let r = resolve_stuck(RunControl::new(CancelToken::new(), Duration::from_millis(200)), hour);
        assert!(matches!(r, Err(Stop::Run(RunError::Timeout))), "{r:?}");
    }

    #[test]
    fn ip_literals_need_no_resolver() {
        let ctl = RunControl::new(CancelToken::new(), Duration::from_secs(3600));
        let end = Instant::now() + Duration::from_secs(3600);
        let r = resolve("127.0.0.1", 8080, end, Duration::from_secs(1), &ctl, &mut (), never);
        assert_eq!(r.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 8080))]);
    }
}
