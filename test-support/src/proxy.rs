//! A TCP proxy on loopback that a test puts between a client and a server
//! (gateway-tx and a source registry) to break the connection at a chosen
//! point: after N bytes of responses, all connections are cut and new ones
//! refused until [`TcpProxy::restore`]. That is "the registry went away in
//! the middle of a blob" at a byte the test picks, whatever the client's
//! timing; it can also throttle responses.
//!
//! Plain std threads: one accepting, two per connection (one per
//! direction). Bytes are counted from server to client ("down").

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const CHUNK: usize = 16 * 1024;

/// A running proxy; stops (and cuts every connection) on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    /// New connections are accepted and closed at once, and connections
    /// being cut forward nothing more.
    refusing: AtomicBool,
    meter: Mutex<Meter>,
    accepted: AtomicU64,
    refused: AtomicU64,
    cuts: AtomicU64,
    /// Bytes per second for responses, all connections together; 0: none.
    throttle_bps: AtomicU64,
    /// When the throttle lets the next byte go.
    throttle_next: Mutex<Instant>,
    /// Both ends of every open connection, to cut them.
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_id: AtomicU64,
}

/// Response bytes, counted under one lock with the cut mark so that no
/// byte past the mark is forwarded whatever the number of connections.
struct Meter {
    /// Response bytes forwarded to clients, all connections.
    down: u64,
    /// Cut when `down` reaches this.
    cut_at: Option<u64>,
}

/// Locks, ignoring poisoning: a panicked pump thread leaves nothing half
/// done that the others could trip over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Shuts every open connection down; `refusing` must be set already.
    fn cut_all(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
        for [client, server] in lock(&self.conns).values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    /// Waits until the throttle lets `n` more bytes go.
    fn pace(&self, n: usize) {
        let bps = self.throttle_bps.load(Ordering::SeqCst);
        if bps == 0 {
            return;
        }
        let wait_until = {
            let mut next = lock(&self.throttle_next);
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / bps as f64);
            *next
        };
        let now = Instant::now();
        if wait_until > now {
            thread::sleep(wait_until - now);
        }
    }
}

impl TcpProxy {
    /// Listens on a free 127.0.0.1 port and forwards every connection to
    /// `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let addr = listener.local_addr()?;
        // Non-blocking accept, polled, so the thread sees `stop` promptly.
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            meter: Mutex::new(Meter {
                down: 0,
                cut_at: None,
            }),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            throttle_bps: AtomicU64::new(0),
            throttle_next: Mutex::new(Instant::now()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("tcp-proxy-accept".into())
            .spawn(move || accept_loop(listener, s))
            .context("starting the proxy's accept thread")?;
        Ok(TcpProxy { addr, shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the host part of references through the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Arms the cut: once `bytes` more response bytes have gone to clients
    /// (exactly that many: the chunk that crosses the mark is split), every
    /// connection is cut and new ones are refused.
    pub fn cut_after(&self, bytes: u64) {
        let mut meter = lock(&self.shared.meter);
        meter.cut_at = Some(meter.down.saturating_add(bytes));
    }

    /// Cuts every connection now and refuses new ones.
    pub fn cut_now(&self) {
        {
            let mut meter = lock(&self.shared.meter);
            meter.cut_at = None;
            self.shared.refusing.store(true, Ordering::SeqCst);
        }
        self.shared.cut_all();
    }

    /// Accepts and forwards again; disarms a pending cut.
    pub fn restore(&self) {
        let mut meter = lock(&self.shared.meter);
        meter.cut_at = None;
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// Limits responses to `bytes_per_second` (all connections together);
    /// None lifts the limit.
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        *lock(&self.shared.throttle_next) = Instant::now();
        self.shared
            .throttle_bps
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// Response bytes forwarded to clients so far.
    pub fn bytes_down(&self) -> u64 {
        lock(&self.shared.meter).down
    }

    /// Connections forwarded (refused ones not counted).
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the proxy was refusing.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// How many times every connection was cut.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    pub fn is_refusing(&self) -> bool {
        self.shared.refusing.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.cut_all();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if shared.refusing.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let s = shared.clone();
                let _ = thread::Builder::new()
                    .name("tcp-proxy-conn".into())
                    .spawn(move || {
                        let _ = connect(client, s);
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn connect(client: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    lock(&shared.conns).insert(id, [client.try_clone()?, server.try_clone()?]);
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    // A cut may have come between the accept and the registration above.
    if shared.refusing.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
    let (up_from, up_to) = (client.try_clone()?, server.try_clone()?);
    let up = thread::Builder::new()
        .name("tcp-proxy-up".into())
        .spawn(move || pump_up(up_from, up_to))?;
    pump_down(&server, &client, &shared);
    let _ = up.join();
    lock(&shared.conns).remove(&id);
    Ok(())
}

/// Client to server, as it comes.
fn pump_up(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Server to client: counted, throttled, and cut at the armed mark.
fn pump_down(from: &TcpStream, to: &TcpStream, shared: &Shared) {
    let (mut from, mut to) = (from, to);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let throttled = shared.throttle_bps.load(Ordering::SeqCst);
        // Under a throttle, small reads keep the pace smooth.
        let want = if throttled > 0 {
            CHUNK.min((throttled / 20).max(1) as usize)
        } else {
            CHUNK
        };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        shared.pace(n);
        let (allowed, cut) = {
            let mut meter = lock(&shared.meter);
            if shared.refusing.load(Ordering::SeqCst) {
                // Being cut: not a byte more.
                (0, false)
            } else {
                let room = meter.cut_at.map_or(u64::MAX, |at| at - meter.down);
                let allowed = n.min(usize::try_from(room).unwrap_or(usize::MAX));
                meter.down += allowed as u64;
                let cut = meter.cut_at.is_some_and(|at| meter.down >= at);
                if cut {
                    meter.cut_at = None;
                    shared.refusing.store(true, Ordering::SeqCst);
                }
                (allowed, cut)
            }
        };
        let written = allowed == 0 || to.write_all(&buf[..allowed]).is_ok();
        if cut {
            let _ = to.flush();
            shared.cut_all();
        }
        if !written || allowed < n || cut {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every connection with `len` bytes, then closes.
    fn server(len: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                thread::spawn(move || {
                    let mut req = [0u8; 16];
                    let _ = conn.read(&mut req);
                    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                    let _ = conn.write_all(&body);
                });
            }
        });
        addr
    }

    /// Sends a request line and reads until EOF or error: what arrived.
    fn fetch(addr: SocketAddr) -> Vec<u8> {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = conn.write_all(b"GET\n");
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    }

    #[test]
    fn forwards_whole_responses() {
        let proxy = TcpProxy::start(server(300_000)).unwrap();
        let got = fetch(proxy.addr());
        assert_eq!(got.len(), 300_000);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        assert_eq!(proxy.bytes_down(), 300_000);
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.cuts(), 0);
    }

    #[test]
    fn cuts_at_the_byte_asked_then_refuses_until_restored() {
        let proxy = TcpProxy::start(server(500_000)).unwrap();
        assert_eq!(fetch(proxy.addr()).len(), 500_000);
        proxy.cut_after(123_457);
        let got = fetch(proxy.addr());
        assert_eq!(got.len(), 123_457, "cut exactly at the mark");
        assert_eq!(proxy.cuts(), 1);
        assert!(proxy.is_refusing());
        // Refused: the connection closes before a byte of the response.
        assert!(fetch(proxy.addr()).is_empty());
        assert!(proxy.refused() >= 1);
        proxy.restore();
        assert_eq!(fetch(proxy.addr()).len(), 500_000);
    }

    #[test]
    fn no_byte_past_the_mark_whatever_the_number_of_connections() {
        let proxy = TcpProxy::start(server(1_000_000)).unwrap();
        proxy.cut_after(700_000);
        let addr = proxy.addr();
        let readers: Vec<_> = (0..4).map(|_| thread::spawn(move || fetch(addr))).collect();
        let received: usize = readers.into_iter().map(|r| r.join().unwrap().len()).sum();
        assert_eq!(proxy.bytes_down(), 700_000);
        assert!(received <= 700_000, "{received} bytes received");
        assert_eq!(proxy.cuts(), 1);
    }

    /// The pull tests' use: a registry behind the proxy, a real client
    /// (skopeo) cut in the middle of a 3 MB layer, then served once restored.
    #[test]
    fn a_pull_through_the_proxy_is_cut_mid_blob_and_succeeds_once_restored() {
        if !crate::skopeo::available() {
            return;
        }
        let Some(registry) = crate::Registry::start().unwrap() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let layers = [weir_imagegen::LayerSpec { size: 3_000_000 }];
        let img = weir_imagegen::oci_archive(dir.path(), "big.tar", 7, &layers, "t/big:1").unwrap();
        crate::skopeo::push_archive(&img.path, &registry.access(), "team-a/big:1").unwrap();
        let proxy = TcpProxy::start(registry.addr()).unwrap();
        proxy.cut_after(1 << 20);
        let src = format!("docker://{}/team-a/big:1", proxy.host());
        let first = dir.path().join("first");
        let err = crate::skopeo::copy(&src, &format!("dir:{}", first.display()))
            .expect_err("the copy must break at the cut");
        assert_eq!(proxy.cuts(), 1, "{err:#}");
        assert_eq!(proxy.bytes_down(), 1 << 20);
        assert!(crate::skopeo::copy(&src, &format!("dir:{}", first.display())).is_err());
        assert!(proxy.refused() >= 1);

        proxy.restore();
        let second = dir.path().join("second");
        crate::skopeo::copy(&src, &format!("dir:{}", second.display())).unwrap();
        let layer = &img.layer_digests[0];
        let bytes = std::fs::read(second.join(layer.trim_start_matches("sha256:"))).unwrap();
        let got = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        );
        assert_eq!(&got, layer);
    }

    #[test]
    fn cut_now_breaks_a_transfer_in_flight() {
        let proxy = TcpProxy::start(server(2_000_000)).unwrap();
        proxy.throttle(Some(400_000));
        let addr = proxy.addr();
        let reader = thread::spawn(move || fetch(addr));
        // Cut once bytes are flowing (2 MB at 400 kB/s takes 5 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.bytes_down() == 0 {
            assert!(Instant::now() < deadline, "no bytes went through");
            thread::sleep(Duration::from_millis(20));
        }
        proxy.cut_now();
        let got = reader.join().unwrap();
        assert!(
            !got.is_empty() && got.len() < 2_000_000,
            "{} bytes",
            got.len()
        );
        assert!(fetch(addr).is_empty(), "refusing after the cut");
    }

    #[test]
    fn throttles_responses() {
        let proxy = TcpProxy::start(server(200_000)).unwrap();
        proxy.throttle(Some(100_000));
        let start = Instant::now();
        assert_eq!(fetch(proxy.addr()).len(), 200_000);
        let took = start.elapsed();
        // 200 kB at 100 kB/s: 2 s; the first chunk goes out at once.
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        proxy.throttle(None);
        let start = Instant::now();
        assert_eq!(fetch(proxy.addr()).len(), 200_000);
        // Unthrottled, well under what the throttle allows, with room for
        // a loaded machine.
        let took = start.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
}
