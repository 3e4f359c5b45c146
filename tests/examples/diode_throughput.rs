//! How many 1400-byte datagrams per second the diode moves on loopback:
//! a sender blasts as fast as it can, a sink counts, for a few seconds.
//!
//! `cargo run --release -p weir-tests --example diode_throughput [SECONDS] [LOSS]`

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use weir_tests::diode::{Diode, DiodeConfig};

const SIZE: usize = 1400;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let loss: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0.0);

    let sink = UdpSocket::bind("127.0.0.1:0")?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let sink_addr = sink.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sunk = Arc::new(AtomicU64::new(0));
    let sink_thread = {
        let (stop, sunk) = (Arc::clone(&stop), Arc::clone(&sunk));
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    sunk.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut config = DiodeConfig::new("127.0.0.1:0".parse()?, sink_addr);
    config.loss = loss;
    config.seed = 1;
    let diode = Diode::spawn(config)?;
    let to = diode.local_addr();
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        thread::spawn(move || -> std::io::Result<()> {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            let payload = [0x5au8; SIZE];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    // ENOBUFS and the like: the datagram is simply lost.
                    let _ = socket.send_to(&payload, to);
                }
                sent.fetch_add(256, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let stats = diode.stats();
    // Measure after a warm-up second.
    thread::sleep(Duration::from_secs(1));
    let (t0, before) = (Instant::now(), stats.snapshot());
    let sunk0 = sunk.load(Ordering::Relaxed);
    let sent0 = sent.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs_f64(seconds));
    let (dt, after) = (t0.elapsed().as_secs_f64(), stats.snapshot());
    let sunk1 = sunk.load(Ordering::Relaxed);
    let sent1 = sent.load(Ordering::Relaxed);
    let kernel = diode.kernel_drops();
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender thread")?;
    let final_counters = diode.stop()?;
    sink_thread.join().expect("sink thread");

    let per_s = |a: u64, b: u64| (b - a) as f64 / dt;
    let forwarded = per_s(before.forwarded, after.forwarded);
    println!("datagram size        {SIZE} B, loss {loss}, {dt:.1} s measured");
    println!(
        "sender offered       {:>10.0} datagrams/s",
        per_s(sent0, sent1)
    );
    println!(
        "diode received       {:>10.0} datagrams/s",
        per_s(before.received, after.received)
    );
    println!(
        "diode forwarded      {forwarded:>10.0} datagrams/s ({:.0} MB/s)",
        forwarded * SIZE as f64 / 1e6
    );
    println!(
        "sink received        {:>10.0} datagrams/s",
        per_s(sunk0, sunk1)
    );
    println!("kernel drops at diode input: {kernel:?}");
    println!("final counters: {final_counters}");
    Ok(())
}
