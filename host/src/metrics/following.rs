//! The endpoint as the configuration asks for it, reload after reload: a
//! changed `[metrics] listen` moves it, a removed `[metrics]` closes it,
//! an added one opens it, without a restart.

use std::io::ErrorKind;
use std::net::SocketAddr;

use super::endpoint::{Accepted, MetricsEndpoint, MetricsError, ACCEPT_POLL};
use crate::config::MetricsConfig;
use crate::reload::ReloadReader;
use crate::Shutdown;

/// Serves `endpoint` (bound at start, so a port in use fails the start)
/// until `shutdown`, and re-binds whenever `listen` is set to an address
/// other than the one served. A new address that cannot be bound is logged
/// naming `[metrics] listen`; the endpoint serving so far stays (none if
/// there was none), and the next reload tries again.
pub fn serve_following(
    endpoint: Option<MetricsEndpoint>,
    mut listen: ReloadReader<Option<MetricsConfig>>,
    shutdown: &Shutdown,
    render: impl Fn() -> String,
) {
    let mut endpoint = endpoint;
    if let Some(e) = &endpoint {
        tracing::info!(address = %e.local_addr(), "metrics endpoint listening (GET {})", super::METRICS_PATH);
    }
    while !shutdown.is_triggered() {
        if let Some(wanted) = listen.changed() {
            endpoint = follow(endpoint, wanted.as_ref().as_ref());
        }
        let accepted = match &endpoint {
            Some(e) => e.accept_one(&render),
            None => Accepted::Nobody,
        };
        if accepted == Accepted::Nobody {
            shutdown.sleep(ACCEPT_POLL);
        }
    }
}

/// The endpoint `wanted` asks for, given the one serving now.
fn follow(
    current: Option<MetricsEndpoint>,
    wanted: Option<&MetricsConfig>,
) -> Option<MetricsEndpoint> {
    let Some(wanted) = wanted else {
        if let Some(old) = current {
            tracing::info!(address = %old.local_addr(),
                "metrics endpoint closed: [metrics] was removed from the configuration");
        }
        return None;
    };
    let addr = match wanted.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            // Validation refuses such a file before it reaches here.
            tracing::error!(field = "metrics.listen", error = %e,
                "[metrics] listen: {e}; the metrics endpoint is left as it was");
            return current;
        }
    };
    if current
        .as_ref()
        .is_some_and(|c| c.configured_addr() == addr)
    {
        return current;
    }
    let old = current
        .as_ref()
        .map(|c| (c.configured_addr(), c.local_addr()));
    match MetricsEndpoint::bind(addr) {
        Ok(new) => {
            moved(old, &new);
            Some(new)
        }
        // The same port on another address of this host (0.0.0.0 after
        // 127.0.0.1, say): the old listener has to go first.
        Err(MetricsError::Bind { source, .. })
            if source.kind() == ErrorKind::AddrInUse
                && old.is_some_and(|(_, bound)| bound.port() == addr.port()) =>
        {
            drop(current);
            match MetricsEndpoint::bind(addr) {
                Ok(new) => {
                    moved(old, &new);
                    Some(new)
                }
                Err(e) => {
                    // Back where it was, if that can still be had.
                    let back =
                        old.and_then(|(configured, _)| MetricsEndpoint::bind(configured).ok());
                    refused(addr, &e, back.as_ref());
                    back
                }
            }
        }
        Err(e) => {
            refused(addr, &e, current.as_ref());
            current
        }
    }
}

fn moved(old: Option<(SocketAddr, SocketAddr)>, new: &MetricsEndpoint) {
    match old {
        Some((_, was)) => tracing::info!(address = %new.local_addr(), previous = %was,
            "metrics endpoint moved to {} ([metrics] listen reloaded); {was} is closed",
            new.local_addr()),
        None => tracing::info!(address = %new.local_addr(),
            "metrics endpoint listening (GET {}; [metrics] added by a reload)", super::METRICS_PATH),
    }
}

fn refused(addr: SocketAddr, error: &MetricsError, serving: Option<&MetricsEndpoint>) {
    let cause = match error {
        MetricsError::Bind { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    let stays = match serving {
        Some(e) => format!("the endpoint stays on {}", e.local_addr()),
        None => "no metrics endpoint is served".to_string(),
    };
    tracing::error!(field = "metrics.listen", address = %addr, error = %cause,
        "[metrics] listen = \"{addr}\" cannot be bound ({cause}); {stays}; fix the file and \
         reload again");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reload::Reloadable;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn listen(addr: SocketAddr) -> Option<MetricsConfig> {
        Some(MetricsConfig {
            listen: addr.to_string(),
        })
    }

    fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn answers(addr: SocketAddr) -> bool {
        weir_answer(addr).is_some_and(|a| a.ends_with("weir_test_up 1\n"))
    }

    fn weir_answer(addr: SocketAddr) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_reloaded_listen_address_moves_the_endpoint_and_a_removed_one_closes_it() {
        let (a, b) = (free_addr(), free_addr());
        let config = Reloadable::new(listen(a));
        let shutdown = Shutdown::new();
        let endpoint = MetricsEndpoint::bind(a).unwrap();
        let thread = std::thread::spawn({
            let (reader, shutdown) = (config.reader(), shutdown.clone());
            move || {
                serve_following(Some(endpoint), reader, &shutdown, || {
                    "weir_test_up 1\n".into()
                })
            }
        });
        assert!(answers(a));
        config.set(listen(b));
        assert!(eventually(|| answers(b)), "the new address serves");
        assert!(TcpStream::connect(a).is_err(), "the old address is closed");
        // Set again unchanged (every reload sets it): nothing moves.
        config.set(listen(b));
        std::thread::sleep(Duration::from_millis(300));
        assert!(answers(b));
        config.set(None);
        assert!(eventually(|| TcpStream::connect(b).is_err()), "closed");
        config.set(listen(a));
        assert!(eventually(|| answers(a)), "opened again");
        shutdown.trigger();
        thread.join().unwrap();
    }

    #[test]
    fn an_address_that_cannot_be_bound_leaves_the_endpoint_serving_and_is_tried_again() {
        let a = free_addr();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let config = Reloadable::new(listen(a));
        let shutdown = Shutdown::new();
        let endpoint = MetricsEndpoint::bind(a).unwrap();
        let thread = std::thread::spawn({
            let (reader, shutdown) = (config.reader(), shutdown.clone());
            move || {
                serve_following(Some(endpoint), reader, &shutdown, || {
                    "weir_test_up 1\n".into()
                })
            }
        });
        config.set(listen(busy));
        std::thread::sleep(Duration::from_millis(400));
        assert!(answers(a), "the old endpoint stays");
        // Freed, and the next reload sets the same value again.
        drop(taken);
        config.set(listen(busy));
        assert!(eventually(|| answers(busy)), "bound at the next reload");
        assert!(TcpStream::connect(a).is_err());
        shutdown.trigger();
        thread.join().unwrap();
    }
}
