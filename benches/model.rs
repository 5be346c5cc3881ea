//! `cargo bench --bench model [-- --quick]`: the whole-model benchmarks of [`xmoe_top::bench`].

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: set before any thread starts (see cli::main).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    xmoe_top::bench::run(quick, &candle_core::Device::Cpu, threads)
}
