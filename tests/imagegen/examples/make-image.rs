//! Writes one generated image, for manual checks and benchmark inputs:
//!
//! `cargo run -p weir-imagegen --example make-image -- FORMAT DIR NAME SEED REFERENCE SIZE...`
//!
//! FORMAT: oci | oci-plain | oci-dir | multiarch | multiarch-dir | classic | skopeo | docker-oci.
//! SIZE: bytes of random content per layer (suffixes K, M, G = KiB, MiB, GiB).

use std::path::Path;
use std::process::ExitCode;

use weir_imagegen::*;

fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'K') => (&s[..i], 1 << 10),
        (i, 'M') => (&s[..i], 1 << 20),
        (i, 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok().map(|n| n * unit)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        eprintln!("usage: make-image FORMAT DIR NAME SEED REFERENCE SIZE...");
        return ExitCode::from(2);
    }
    let (format, dir, name, reference) = (&args[0], Path::new(&args[1]), &args[2], &args[4]);
    let Ok(seed) = args[3].parse::<u64>() else {
        eprintln!("SEED must be an integer: {}", args[3]);
        return ExitCode::from(2);
    };
    let mut layers = Vec::new();
    for s in &args[5..] {
        match parse_size(s) {
            Some(size) => layers.push(LayerSpec { size }),
            None => {
                eprintln!("bad layer size {s}");
                return ExitCode::from(2);
            }
        }
    }
    let platforms = [("linux", "amd64"), ("linux", "arm64")];
    let result = match format.as_str() {
        "oci" => oci_archive(dir, name, seed, &layers, reference),
        "oci-plain" => oci_archive_uncompressed(dir, name, seed, &layers, reference),
        "oci-dir" => oci_layout_dir(dir, name, seed, &layers, reference),
        "multiarch" => multiarch_oci_archive(dir, name, seed, &platforms, &layers, reference),
        "multiarch-dir" => {
            multiarch_oci_layout_dir(dir, name, seed, &platforms, &layers, reference)
        }
        "classic" => docker_archive(dir, name, seed, &layers, reference, DockerFlavor::Classic),
        "skopeo" => docker_archive(dir, name, seed, &layers, reference, DockerFlavor::Skopeo),
        "docker-oci" => docker_archive(
            dir,
            name,
            seed,
            &layers,
            reference,
            DockerFlavor::OciInDocker,
        ),
        other => {
            eprintln!("unknown format {other}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(image) => {
            println!("{image:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-image: {e}");
            ExitCode::FAILURE
        }
    }
}
