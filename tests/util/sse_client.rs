//! Reads a streamed chat completion from the gateway record by record, as it arrives.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One streamed response being read.
pub struct SseStream {
    pub sock: TcpStream,
    pub status: u16,
    pub head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
    /// Chunked framing has ended (or the connection closed).
    pub ended: bool,
}

impl SseStream {
    /// Send `req` on `sock` and read the response head.
    pub fn open(mut sock: TcpStream, req: &[u8]) -> SseStream {
        sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        sock.write_all(req).unwrap();
        let mut s = SseStream { sock, status: 0, head: String::new(), raw: Vec::new(), body: Vec::new(), ended: false };
        let end = loop {
            if let Some(i) = s.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(s.fill(), "connection closed before a response head");
        };
        s.head = String::from_utf8_lossy(&s.raw[..end]).into_owned();
        s.raw.drain(..end);
        s.status = s.head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        s
    }

    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match self.sock.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Move complete chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(i) = self.raw.windows(2).position(|w| w == b"\r\n") else { return };
            let n = usize::from_str_radix(String::from_utf8_lossy(&self.raw[..i]).trim(), 16).expect("chunk size");
            if n == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < i + 2 + n + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[i + 2..i + 2 + n]);
            self.raw.drain(..i + 2 + n + 2);
        }
    }

    /// The next SSE record (`data: …` or a `: comment`) without its blank line, or `None` when
    /// the body ended.
    pub fn next_record(&mut self) -> Option<String> {
        loop {
            self.dechunk();
            if let Some(i) = self.body.windows(2).position(|w| w == b"\n\n") {
                let rec = String::from_utf8_lossy(&self.body[..i]).into_owned();
                self.body.drain(..i + 2);
                return Some(rec);
            }
            if self.ended || !self.fill() {
                self.ended = true;
                return None;
            }
        }
    }

    /// The next `data:` payload, skipping comments.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            let r = self.next_record()?;
            if let Some(d) = r.strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Every remaining record.
    pub fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_record()).collect()
    }
}
