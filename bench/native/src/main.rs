//! `pd-bench-native KERNEL REPS INPUT OUTPUT`: run a ProcessDistro kernel's pure Rust logic
//! (the same crates as static/wasm/*.wasm) on the task input in file INPUT, once to warm up and
//! then REPS timed times; write the output bytes to OUTPUT and print the per-run times in ms as
//! JSON: `{"kernel": .., "best_ms": .., "median_ms": .., "times_ms": [..]}`.
//! KERNEL is `mandelbrot`, `matrix_mul` or `password_hash` (inputs as in docs/wasm-abi.md).

use std::hint::black_box;
use std::time::Instant;

fn run(kernel: &str, input: &[u8]) -> Result<Vec<u8>, String> {
    let result = match kernel {
        "mandelbrot" => mandelbrot::run(input),
        "matrix_mul" => matrix_mul::run(input).map(|out| out.as_bytes().to_vec()),
        "password_hash" => password_hash::run(input),
        other => return Err(format!("unknown kernel {other:?}")),
    };
    result.map_err(|status| format!("{kernel}: status {status}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: pd-bench-native KERNEL REPS INPUT OUTPUT");
        std::process::exit(2);
    }
    let kernel = args[1].as_str();
    let reps: usize = args[2].parse().expect("REPS must be a positive integer");
    let input = std::fs::read(&args[3]).expect("cannot read INPUT");
    // Warm-up run; its output is the one written (every run gives the same bytes).
    let out = match run(kernel, black_box(&input)) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let o = run(kernel, black_box(&input)).expect("run failed");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(o == out, "non-deterministic output");
        black_box(o);
    }
    std::fs::write(&args[4], &out).expect("cannot write OUTPUT");
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let list: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
    println!(
        "{{\"kernel\": \"{kernel}\", \"best_ms\": {:.4}, \"median_ms\": {median:.4}, \"times_ms\": [{}]}}",
        sorted[0],
        list.join(", ")
    );
}
