//! Soak: a long headless session with the thresholds and the policy changed every few seconds,
//! statistics reset now and then, and a routing trace being written: resident memory, threads and
//! open files must stay flat. In-process (this test binary runs nothing else), sampling
//! `/proc/self` once a second.
//!
//! CI runs 60 s; the long version (recorded in docs/robustness.md) is
//! `XMOE_SOAK_SECONDS=1800 XMOE_SOAK_CSV=soak-headless.csv cargo test --release --test soak -- --nocapture`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{LoadOptions, Model};
use xmoe_top::report::trace::{TraceOptions, TraceWriter};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::session::{Layers, PassObserver, Session, SessionConfig};
use xmoe_top::workload::tokenizer::TextTokenizer;
use xmoe_top::workload::{GenerateSpec, Workload, builtin_prompts};

#[path = "support/proc.rs"]
mod proc;
use proc::{Drift, drift, proc_sample};

fn seconds() -> u64 {
    std::env::var("XMOE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

#[test]
fn headless_session_with_changing_policies_and_a_trace_stays_flat() {
    let total = Duration::from_secs(seconds());
    let file = xmoe_top::embedded::model_file().unwrap();
    let model = Model::from_file(
        &file,
        &candle_core::Device::Cpu,
        LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = model.config().clone();
    let workload = Workload::generate_tokenized(
        GenerateSpec {
            prompts: builtin_prompts(),
            source: "built-in prompts".into(),
            max_len: 128,
            temperature: 0.8,
            seed: 7,
        },
        &cfg,
        Arc::new(TextTokenizer::Byte),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("soak.jsonl");
    let writer =
        TraceWriter::create(&trace_path, &cfg, TraceOptions { probs: false }, false).unwrap();
    let writer = Arc::new(Mutex::new(Some(writer)));
    let sink = writer.clone();
    let mut config = SessionConfig::new(&model, "CPU");
    config.pass_observer = Some(PassObserver(Arc::new(Mutex::new(
        move |tokens: &[u32], trace: &ForwardTrace| -> anyhow::Result<()> {
            match sink.lock().unwrap().as_mut() {
                Some(w) => w.write_pass(tokens, trace),
                None => Ok(()),
            }
        },
    ))));
    let session = Session::start(model, workload, config).unwrap();
    let control = session.controller();

    let start = Instant::now();
    let mut samples: Vec<(f64, u64, usize, usize)> = Vec::new();
    let mut changes = 0u64;
    let mut tick = 0u64;
    while start.elapsed() < total {
        std::thread::sleep(Duration::from_millis(500));
        tick += 1;
        // Drain snapshots as a UI would.
        while session.snapshots().try_recv().is_ok() {}
        // A change every 2 s: thresholds, per layer and global, top-k, dense, renormalised,
        // and a reset now and then.
        if tick.is_multiple_of(4) {
            let step = tick / 4;
            let r = match step % 6 {
                0 => control.set_threshold(Layers::All, 0.5 + 0.08 * (step % 6) as f32),
                1 => control.set_threshold(Layers::Slot(1), 0.3),
                2 => control.set_policy(
                    Layers::All,
                    RoutingPolicy::TopK {
                        k: 1 + (step % 4) as usize,
                        renormalize: step.is_multiple_of(2),
                    },
                ),
                3 => control.set_policy(Layers::All, RoutingPolicy::Dense),
                4 => control.set_policy(
                    Layers::All,
                    RoutingPolicy::threshold(0.9).with_renormalize(true),
                ),
                _ => control.reset_stats(),
            };
            r.unwrap();
            changes += 1;
        }
        if tick.is_multiple_of(2) {
            let (rss, threads, fds) = proc_sample("self");
            samples.push((start.elapsed().as_secs_f64(), rss, threads, fds));
        }
        assert!(!session.is_finished(), "the session ended by itself");
    }
    let outcome = session.stop().unwrap();
    let trace_file = writer.lock().unwrap().take().unwrap().finish().unwrap();
    let trace_bytes = std::fs::metadata(&trace_file).unwrap().len();
    let tokens = outcome.final_snapshot.tokens_processed_total;

    if let Ok(path) = std::env::var("XMOE_SOAK_CSV") {
        let mut csv = String::from("seconds,rss_kib,threads,fds\n");
        for (t, rss, th, fd) in &samples {
            csv.push_str(&format!("{t:.0},{rss},{th},{fd}\n"));
        }
        std::fs::write(path, csv).unwrap();
    }
    let n = samples.len();
    assert!(n >= 8, "{n} samples");
    let counters: Vec<(u64, usize, usize)> = samples.iter().map(|s| (s.1, s.2, s.3)).collect();
    let Drift {
        rss: (early, late),
        threads: (t_min, t_max),
        fds: (f_min, f_max),
    } = drift(&counters);
    println!(
        "soak: {:.0} s, {tokens} tokens, {changes} policy changes, trace {:.1} MB; RSS {early} -> {late} KiB; threads {t_min} -> {t_max}; open files {f_min} -> {f_max}",
        start.elapsed().as_secs_f64(),
        trace_bytes as f64 / 1e6
    );
    assert!(tokens > 0 && changes > 0 && trace_bytes > 0);
    // Flat: the last quarter's median resident set within 16 MiB of the first quarter's.
    assert!(
        late <= early + 16 * 1024,
        "resident memory grew from {early} to {late} KiB"
    );
    assert_eq!(t_min, t_max, "thread count changed");
    assert_eq!(f_min, f_max, "open files changed");
}
