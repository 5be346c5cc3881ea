//! `--metrics-addr`: a minimal HTTP endpoint that serves the latest snapshot as Prometheus
//! metrics ([`crate::report::metrics`]) at `/metrics`, on a thread of its own.
//!
//! One connection at a time, each with short read and write timeouts and a bounded request, so a
//! slow or hostile client can delay a scrape but never the model, and never grow memory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::profiling::snapshot::Snapshot;

/// The largest request read; anything longer is answered 431.
const MAX_REQUEST: usize = 8 * 1024;

/// The endpoint; stops when dropped.
pub struct MetricsServer {
    body: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` (e.g. `127.0.0.1:9464`; port 0 picks a free one).
    pub fn start(addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("--metrics-addr: cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        // Non-blocking accept lets the thread notice `stop` within one poll interval.
        listener.set_nonblocking(true)?;
        let body = Arc::new(Mutex::new(String::from("# xmoe-top: no snapshot yet\n")));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (body.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, &b, &s))
            .context("cannot start the metrics thread")?;
        Ok(Self {
            body,
            stop,
            thread: Some(thread),
            addr: local,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `snapshot` from now on.
    pub fn publish(&self, snapshot: &Snapshot) {
        let text = crate::report::metrics::render(snapshot);
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, body: &Mutex<String>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer(stream, body);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            // A connection that failed before it was accepted (reset by the peer) is the
            // peer's problem; keep serving.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn answer(mut stream: TcpStream, body: &Mutex<String>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if request.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        match stream.read(&mut buf)? {
            0 => break,
            n => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let text = body.lock().unwrap_or_else(|e| e.into_inner()).clone();
            respond(
                &mut stream,
                "200 OK",
                crate::report::metrics::CONTENT_TYPE,
                &text,
            )
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics only\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
