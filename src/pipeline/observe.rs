//! `/metrics` (Prometheus text), `/health` and `/ready` on one small HTTP
//! listener thread. Ready means: weights loaded, prefix prefilled, sink built,
//! source started.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusBuilder;

static READY: AtomicBool = AtomicBool::new(false);

pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::SeqCst);
}

pub fn is_ready() -> bool {
    READY.load(Ordering::SeqCst)
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("metrics listener on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("metrics recorder: {0}")]
    Recorder(String),
}

/// Installs the Prometheus recorder and serves it on `addr` (e.g. `0.0.0.0:9100`).
pub fn serve(addr: &str) -> Result<std::net::SocketAddr, ObserveError> {
    let listener = TcpListener::bind(addr).map_err(|e| ObserveError::Bind { addr: addr.into(), source: e })?;
    let local = listener.local_addr().map_err(|e| ObserveError::Bind { addr: addr.into(), source: e })?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| ObserveError::Recorder(e.to_string()))?;
    std::thread::Builder::new()
        .name("kairos-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", handle.render()),
                    "/health" => ("200 OK", "ok\n".to_string()),
                    "/ready" if is_ready() => ("200 OK", "ready\n".to_string()),
                    "/ready" => ("503 Service Unavailable", "not ready\n".to_string()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let mut s = &stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| ObserveError::Bind { addr: addr.into(), source: e })?;
    Ok(local)
}
