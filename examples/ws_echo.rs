//! An RFC 6455 echo server (text and binary) built on gatelet's own WebSocket layers: the request
//! head parser, the handshake and the connection type (frame codec, UTF-8 validation, pings, the
//! close handshake, the 25 MiB message limit) that the gateway uses. It exists so that the
//! Autobahn|Testsuite cases can check that code (`docs/conformance.md`):
//!
//! ```sh
//! cargo run --release --example ws_echo -- 127.0.0.1:9001
//! ```
//!
//! One thread per connection with blocking sockets keeps the example short; the gateway drives
//! the same [`Conn`] from its event loop.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use gatelet::http::head;
use gatelet::ws::conn::{Conn, Incoming, MAX_MESSAGE};
use gatelet::ws::handshake;

/// Time allowed for the upgrade request, as the gateway's header timeout.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".to_string());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ws_echo: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().map_or(addr, |a| a.to_string());
    eprintln!("ws_echo listening on ws://{local}/");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(s) {
                        eprintln!("ws_echo: connection ended: {e}");
                    }
                });
            }
            Err(e) => eprintln!("ws_echo: accept failed: {e}"),
        }
    }
}

/// Read into `buf`; `Ok(false)` at end of file.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]) -> io::Result<bool> {
    let n = s.read(chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// The `Date` for an error response sent now.
fn date() -> gatelet::http::response::HttpDate {
    gatelet::http::response::HttpDate::from_unix(gatelet::util::now_secs())
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HEAD_TIMEOUT))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let head = loop {
        match head::parse(&buf) {
            Ok(Some((h, n))) => {
                buf.drain(..n);
                break h;
            }
            Ok(None) if fill(&mut s, &mut buf, &mut chunk)? => {}
            Ok(None) => return Ok(()),
            Err(e) => {
                let mut out = Vec::new();
                let body = serde_json::json!({ "error": { "message": e.to_string() } }).to_string();
                gatelet::http::response::Response::json(e.status(), body.into_bytes()).encode(
                    &mut out,
                    &date(),
                    false,
                    true,
                );
                return s.write_all(&out);
            }
        }
    };
    match handshake::accept(&head) {
        Ok(resp) => s.write_all(&resp)?,
        Err(e) => {
            let mut out = Vec::new();
            gatelet::openai::ApiError::from(e).response().encode(&mut out, &date(), false, true);
            return s.write_all(&out);
        }
    }
    let mut conn = Conn::new(MAX_MESSAGE);
    let mut out = Vec::new();
    loop {
        let mut pos = 0;
        loop {
            let (n, ev) = conn.feed(&buf[pos..], Instant::now(), &mut out);
            pos += n;
            match ev {
                Some(Incoming::Text(t)) => conn.send_text(&mut out, &t),
                Some(Incoming::Binary(b)) => conn.send_binary(&mut out, &b),
                Some(_) => {}
                None => break,
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            s.write_all(&out)?;
            out.clear();
        }
        if conn.is_closed() {
            break;
        }
        // Wait for bytes, or for the close handshake's deadline.
        let wait = conn.deadline().map(|d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        s.set_read_timeout(wait)?;
        match fill(&mut s, &mut buf, &mut chunk) {
            Ok(true) => {}
            Ok(false) => conn.on_eof(),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                conn.on_timer(Instant::now())
            }
            Err(e) => return Err(e),
        }
        if conn.is_closed() {
            break;
        }
    }
    // The server closes the TCP connection first (RFC 6455 §7.1.1). Reading what the peer still
    // sends until its FIN keeps the close a FIN rather than a reset.
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
    Ok(())
}
