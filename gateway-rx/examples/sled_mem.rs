// temporary experiment: sled memory under the shard store's write pattern
fn rss() -> u64 {
    let t = std::fs::read_to_string("/proc/self/status").unwrap();
    t.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).cache_capacity(8 << 20).open().unwrap();
    let t = db.open_tree("b").unwrap();
    let blocks: u32 = 104_000;
    let mut round = 0u32;
    // each commit touches ~100 blocks, bitmap grows
    for commit in 0..(blocks / 100 * 5) {
        let mut batch = sled::Batch::default();
        for j in 0..100u32 {
            let b = (commit * 100 + j) % blocks;
            let mut k = [0u8; 36];
            k[32..].copy_from_slice(&b.to_be_bytes());
            batch.insert(&k[..], &[round as u8; 5][..]);
        }
        t.apply_batch(batch).unwrap();
        db.flush().unwrap();
        if commit % 1000 == 0 {
            println!("commit {commit}: rss {} MiB, disk {:?}", rss() / 1024, db.size_on_disk().ok().map(|s| s >> 20));
        }
        round += 1;
    }
    println!("end rss {} MiB", rss() / 1024);
    let mut batch = sled::Batch::default();
    for k in t.iter().keys() { batch.remove(k.unwrap()); }
    println!("batch built rss {} MiB", rss() / 1024);
    t.apply_batch(batch).unwrap();
    println!("batch applied rss {} MiB", rss() / 1024);
    db.flush().unwrap();
    println!("flushed rss {} MiB", rss() / 1024);
}
