//! `https://` upstreams against a local TLS server whose throwaway CA and certificate are made at
//! test time with the `openssl` command: trusted through `caFile`, refused without it, refused
//! for a host name the certificate does not cover.
#![cfg(feature = "tls")]

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use util::upstream as up;
use util::{Gateway, chat_request, config};

/// A throwaway CA and a `localhost` certificate it signed, as PEM files in `dir`.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=gatelet test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost"]);
    run(&csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (dir.join("ca.pem"), dir.join("leaf.pem"), dir.join("leaf.key"))
}

/// A TLS upstream answering every request with a short streamed reply, keeping connections.
struct TlsUpstream {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl TlsUpstream {
    fn start(cert: &Path, key: &Path) -> TlsUpstream {
        Self::spawn(cert, key, false, &[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    fn spawn(
        cert: &Path,
        key: &Path,
        silent: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsUpstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (cfg, r) = (cfg.clone(), r.clone());
                std::thread::spawn(move || serve(s, cfg, &r, silent));
            }
        });
        TlsUpstream { port, connections, requests }
    }
}

fn serve(s: TcpStream, cfg: Arc<rustls::ServerConfig>, requests: &AtomicUsize, silent: bool) {
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        // One request: head, then Content-Length bytes.
        let (head_end, len) = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                    .unwrap_or(0);
                break (i + 4, len);
            }
            match tls.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        while buf.len() < head_end + len {
            match tls.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        buf.drain(..head_end + len);
        requests.fetch_add(1, Ordering::SeqCst);
        if silent {
            // Hold the connection until the client closes it.
            let _ = tls.read(&mut tmp);
            return;
        }
        let mut out =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for rec in [up::content("secure"), up::content(" hello"), up::finish("stop"), up::DONE.into()] {
            out.extend_from_slice(format!("{:x}\r\n{rec}\r\n", rec.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        if tls.write_all(&out).and_then(|_| tls.flush()).is_err() {
            return;
        }
    }
}

fn gateway(base_url: &str, extra: &str) -> Gateway {
    Gateway::with_config(&config(
        "",
        &format!(
            "agents: {{ list: [{{ id: 'up', default: true, backend: {{ kind: 'openai', baseUrl: '{base_url}', {extra} }} }}] }}"
        ),
    ))
}

const BODY: &str = r#"{"model":"gatelet","messages":[{"role":"user","content":"hi"}]}"#;

fn ask(gw: &Gateway) -> (u16, Value) {
    let r = gw.one(&chat_request(BODY));
    (r.status, r.json())
}

#[test]
fn https_upstreams_verify_the_certificate_and_the_host_name() {
    let dir = util::temp_dir("tls");
    let (ca, cert, key) = make_certs(&dir);
    let up = TlsUpstream::start(&cert, &key);
    let ca_file = format!("caFile: '{}',", ca.display());

    // Trusted through caFile: works, and the TLS connection is kept for the next runs.
    let gw = gateway(&format!("https://localhost:{}/v1", up.port), &ca_file);
    for _ in 0..3 {
        let (status, v) = ask(&gw);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "secure hello");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "one TLS connection carried every run");
    drop(gw);

    // The bundled web roots do not know the throwaway CA.
    let gw = gateway(&format!("https://localhost:{}/v1", up.port), "");
    let (status, v) = ask(&gw);
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "backend_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("invalid peer certificate") && msg.contains("UnknownIssuer") && msg.contains("caFile"),
        "{msg}"
    );
    drop(gw);

    // The certificate is for `localhost`, not for 127.0.0.1.
    let gw = gateway(&format!("https://127.0.0.1:{}/v1", up.port), &ca_file);
    let (status, v) = ask(&gw);
    assert_eq!(status, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("invalid peer certificate") && msg.contains("not valid for name \"127.0.0.1\""), "{msg}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3, "no request went over an unverified connection");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_ca_file_that_is_not_pem_is_a_config_error() {
    let dir = util::temp_dir("tls-bad");
    let bad = dir.join("ca.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let text = format!(
        "{{gateway: {{auth: {{token: 'x'}}}},\n agents: {{ list: [{{ id: 'a', backend: {{ kind: 'openai', baseUrl: 'https://localhost/v1',\n   caFile: '{}' }} }}] }} }}",
        bad.display()
    );
    let e = gatelet::config::parse(&text, Some("g.json5".into()), dir.clone(), &Default::default(), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("g.json5:3:4: `agents.list[0].backend.caFile`"), "{e}");
    assert!(e.contains("no PEM certificates"), "{e}");
    let missing = text.replace("ca.pem", "missing.pem");
    let e = gatelet::config::parse(&missing, Some("g.json5".into()), dir.clone(), &Default::default(), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read") && e.contains("missing.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deadlines_and_the_connect_budget_hold_through_tls() {
    let dir = util::temp_dir("tls-slow");
    let (ca, cert, key) = make_certs(&dir);
    let ca_file = format!("caFile: '{}',", ca.display());

    // A server that accepts TCP but never says a TLS word: the handshake is in the connect budget.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = mute.incoming().take(4).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(held);
    });
    let gw = gateway(&format!("https://localhost:{mute_port}/v1"), &format!("{ca_file} connectTimeoutMs: 700,"));
    let t = std::time::Instant::now();
    let (status, v) = ask(&gw);
    assert_eq!(status, 502, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no connection within 700 ms"), "{v}");
    assert!(t.elapsed() < std::time::Duration::from_secs(15), "{:?}", t.elapsed());
    drop(gw);

    // A TLS upstream that takes the request and never answers: the run's deadline ends it.
    let up = TlsUpstream::spawn(&cert, &key, true, &[&rustls::version::TLS13]);
    let gw = Gateway::with_config(&config(
        "",
        &format!(
            "agents: {{ list: [{{ id: 'up', default: true, timeoutSeconds: 1, backend: {{ kind: 'openai', \
             baseUrl: 'https://localhost:{}/v1', {ca_file} }} }}] }}",
            up.port
        ),
    ));
    let t = std::time::Instant::now();
    let (status, v) = ask(&gw);
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "agent_timeout");
    assert!(t.elapsed() < std::time::Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tls_1_2_only_upstream_works() {
    let dir = util::temp_dir("tls12");
    let (ca, cert, key) = make_certs(&dir);
    let up = TlsUpstream::spawn(&cert, &key, false, &[&rustls::version::TLS12]);
    let gw = gateway(&format!("https://localhost:{}/v1", up.port), &format!("caFile: '{}',", ca.display()));
    for _ in 0..2 {
        let (status, v) = ask(&gw);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "secure hello");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
