//! The HTTP/1.1 endpoint a Prometheus server scrapes: `GET /metrics`.
//!
//! One connection at a time, on one thread: a scrape takes milliseconds,
//! and a client that is slow or hostile holds the thread for at most
//! [`REQUEST_DEADLINE`] to send its request and [`WRITE_TIMEOUT`] to read
//! the answer; the gateway's own stages never wait for it. A request head
//! longer than [`MAX_REQUEST_BYTES`] is refused unread. Nothing a client
//! sends can make it panic.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::Shutdown;

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time a client has to take each part of the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the shutdown while nobody connects.
pub(crate) const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// After refusing a request, how long what the client still sends is read
/// and dropped, and how much of it.
const LINGER: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 64 * 1024;
/// The path served.
pub const METRICS_PATH: &str = "/metrics";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Listen(#[from] crate::config::FieldError),
    #[error("metrics.listen {addr}: cannot listen there")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, serving once [`MetricsEndpoint::serve`] runs.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    /// The address asked for (`[metrics] listen`).
    configured: SocketAddr,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    /// Binds `addr` now, so that a port in use fails the gateway's start.
    pub fn bind(addr: SocketAddr) -> Result<MetricsEndpoint, MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        // Non-blocking accepts let the loop notice the shutdown.
        listener.set_nonblocking(true).map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        Ok(MetricsEndpoint {
            listener,
            configured: addr,
            addr: bound,
        })
    }

    /// The address asked for (port 0 stays 0 here).
    pub fn configured_addr(&self) -> SocketAddr {
        self.configured
    }

    /// The address bound (the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests one at a time until `shutdown`; `render` makes the
    /// text of each scrape.
    pub fn serve(self, shutdown: &Shutdown, render: impl Fn() -> String) {
        tracing::info!(address = %self.addr, "metrics endpoint listening (GET {METRICS_PATH})");
        while !shutdown.is_triggered() {
            if self.accept_one(&render) == Accepted::Nobody {
                shutdown.sleep(ACCEPT_POLL);
            }
        }
    }

    /// Answers the connection waiting, if one is.
    pub(crate) fn accept_one(&self, render: &impl Fn() -> String) -> Accepted {
        match self.listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, render) {
                    tracing::debug!(peer = %peer, error = %e, "metrics request abandoned");
                }
                Accepted::Answered
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Accepted::Nobody,
            Err(e) if e.kind() == ErrorKind::Interrupted => Accepted::Answered,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                Accepted::Nobody
            }
        }
    }
}

/// What one look at the listener found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    Answered,
    /// Nobody waiting (or accept failed): the caller sleeps a little.
    Nobody,
}

/// What the request asks for, as far as the answer depends on it.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    WrongMethod,
    NotFound,
    Malformed,
    TooLarge,
}

/// Reads one request from `stream` and answers it; the connection closes.
fn answer(mut stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let Some(request) = read_request(&mut stream)? else {
        return Ok(()); // closed or too slow: nobody to answer
    };
    let refused = !matches!(request, Request::Metrics { .. });
    let (status, extra, body, head_only) = match request {
        Request::Metrics { head_only } => (
            "200 OK",
            format!("Content-Type: {}\r\n", super::CONTENT_TYPE),
            render(),
            head_only,
        ),
        Request::WrongMethod => (
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n".to_string(),
            "only GET and HEAD\n".to_string(),
            false,
        ),
        Request::NotFound => (
            "404 Not Found",
            String::new(),
            format!("not found; metrics are at {METRICS_PATH}\n"),
            false,
        ),
        Request::Malformed => (
            "400 Bad Request",
            String::new(),
            "bad request\n".to_string(),
            false,
        ),
        Request::TooLarge => (
            "431 Request Header Fields Too Large",
            String::new(),
            format!("request head over {MAX_REQUEST_BYTES} bytes\n"),
            false,
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if refused {
        // Closing with unread input resets the connection, and the client
        // may lose the answer before reading it.
        drain(&mut stream);
    }
    Ok(())
}

/// Reads and drops what the client still sends, bounded by [`LINGER`] and
/// [`LINGER_BYTES`].
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut chunk = [0u8; 4096];
    let mut read = 0;
    while read < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// Reads the request head within [`REQUEST_DEADLINE`] and at most
/// [`MAX_REQUEST_BYTES`]; `None` when the client closed or was too slow.
fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            return Ok(Some(parse_request(&head[..end])));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(Some(Request::TooLarge));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Where the head ends (the blank line), if it has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_request(head: &[u8]) -> Request {
    if head.len() > MAX_REQUEST_BYTES {
        return Request::TooLarge;
    }
    let Ok(head) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != METRICS_PATH {
        return Request::NotFound;
    }
    match method {
        "GET" => Request::Metrics { head_only: false },
        "HEAD" => Request::Metrics { head_only: true },
        _ => Request::WrongMethod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An endpoint on a free loopback port serving `text`, on its own
    /// thread; stopped (and joined) on drop.
    struct Serving {
        addr: SocketAddr,
        shutdown: Shutdown,
        scrapes: Arc<AtomicUsize>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Serving {
        fn start(text: &'static str) -> Serving {
            let endpoint = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = endpoint.local_addr();
            let shutdown = Shutdown::new();
            let scrapes = Arc::new(AtomicUsize::new(0));
            let thread = std::thread::spawn({
                let (shutdown, scrapes) = (shutdown.clone(), scrapes.clone());
                move || {
                    endpoint.serve(&shutdown, || {
                        scrapes.fetch_add(1, Ordering::SeqCst);
                        text.to_string()
                    })
                }
            });
            Serving {
                addr,
                shutdown,
                scrapes,
                thread: Some(thread),
            }
        }

        /// Sends `request` and reads the whole answer.
        fn exchange(&self, request: &[u8]) -> String {
            let mut s = TcpStream::connect(self.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(request);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        }
    }

    impl Drop for Serving {
        fn drop(&mut self) {
            self.shutdown.trigger();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn get_metrics_answers_the_text_with_the_prometheus_content_type() {
        let s = Serving::start("weir_test_up 1\n");
        let got = s.exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(
            got.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{got}"
        );
        assert!(got.contains("Content-Length: 15\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nweir_test_up 1\n"), "{got}");
        // A query string is ignored; HEAD gets the head alone.
        let got = s.exchange(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        let got = s.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
        assert_eq!(s.scrapes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn other_paths_are_404_and_other_methods_405() {
        let s = Serving::start("x\n");
        for path in ["/", "/metricsx", "/metrics/", "/status.json"] {
            let got = s.exchange(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
            assert!(
                got.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{path}: {got}"
            );
        }
        let got = s.exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 405 "), "{got}");
        assert!(got.contains("Allow: GET, HEAD\r\n"), "{got}");
        assert_eq!(s.scrapes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_oversize_or_garbled_request_is_refused_and_the_next_one_served() {
        let s = Serving::start("weir_test_up 1\n");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while huge.len() <= MAX_REQUEST_BYTES + 100 {
            huge.extend_from_slice(
                b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        huge.extend_from_slice(b"\r\n");
        let got = s.exchange(&huge);
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        // No blank line ever: refused once the bound is passed.
        let got = s.exchange(&vec![b'a'; 3 * MAX_REQUEST_BYTES]);
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        for garbage in [
            &b"\xff\xfe\x00\x01\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics SMTP/1.0\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
        ] {
            let got = s.exchange(garbage);
            assert!(got.starts_with("HTTP/1.1 400 "), "{garbage:?}: {got}");
        }
        assert_eq!(s.scrapes.load(Ordering::SeqCst), 0);
        let got = s.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(got.ends_with("weir_test_up 1\n"), "{got}");
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_deadline_and_scrapes_go_on() {
        let s = Serving::start("weir_test_up 1\n");
        let started = Instant::now();
        // Connects and says nothing, holding the connection open.
        let mut silent = TcpStream::connect(s.addr).unwrap();
        silent.write_all(b"GET /metr").unwrap();
        let got = s.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(got.ends_with("weir_test_up 1\n"), "{got}");
        let waited = started.elapsed();
        assert!(
            waited >= REQUEST_DEADLINE - Duration::from_millis(200)
                && waited < REQUEST_DEADLINE + Duration::from_secs(3),
            "{waited:?}"
        );
        // The silent one was closed without an answer.
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = silent.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }

    #[test]
    fn a_port_in_use_is_an_error_naming_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = MetricsEndpoint::bind(addr).unwrap_err();
        let message = format!("{:#}", anyhow::Error::from(err));
        assert!(
            message.starts_with(&format!("metrics.listen {addr}: cannot listen there: "))
                && message.matches("in use").count() == 1,
            "{message}"
        );
    }

    #[test]
    fn the_request_line_decides_the_answer() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: a"),
            Request::Metrics { head_only: false }
        );
        assert_eq!(
            parse_request(b"DELETE /metrics HTTP/1.1"),
            Request::WrongMethod
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(parse_request(b""), Request::Malformed);
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
    }
}
