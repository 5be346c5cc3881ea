//! A session on a small random model: live control, pause, reset, budgets, generate.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use common::{small_config, write_random};
use xmoe_top::model::format::StoreDtype;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{Model, RoutingConfig};
use xmoe_top::profiling::snapshot::{Snapshot, TokenOrigin};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::session::{Layers, Session, SessionConfig};
use xmoe_top::workload::{EvalSpec, GenerateSpec, TextSource, Workload};

const WAIT: Duration = Duration::from_secs(120);
const SEQ: usize = 16;
/// Exactly one window of SEQ + 1 bytes: every eval batch is the same batch.
const TEXT: &[u8] = b"hard tokens take ";

fn model_file(dir: &Path) -> PathBuf {
    let mut cfg = small_config();
    cfg.n_experts = 16;
    write_random(dir, "m.safetensors", &cfg, 3, false, StoreDtype::F32)
}

fn eval_workload(model: &Model) -> Workload {
    Workload::eval(
        EvalSpec {
            text: TextSource {
                name: "test text".into(),
                bytes: TEXT.to_vec(),
            },
            batch: 1,
            seq_len: SEQ,
        },
        model.config(),
    )
    .unwrap()
}

fn config(model: &Model) -> SessionConfig {
    let mut c = SessionConfig::new(model, "CPU (test)");
    let e = model.config().n_experts;
    c.routing = RoutingConfig::uniform(RoutingPolicy::threshold(0.9), 2, e).unwrap();
    c.snapshot_interval = Duration::from_millis(20);
    c.reference_every = 2;
    c.device_sample_period = None;
    c
}

/// Mean experts per token of each MoE layer on the test batch, run directly.
fn direct_means(model: &Model, routing: &RoutingConfig) -> Vec<f64> {
    let tokens: Vec<u32> = TEXT[..SEQ].iter().map(|&b| b as u32).collect();
    let mut trace = ForwardTrace::default();
    model
        .forward(&tokens, 1, routing, None, &mut trace)
        .unwrap();
    trace
        .moe
        .iter()
        .map(|m| m.routing.pairs() as f64 / m.routing.tokens() as f64)
        .collect()
}

fn layer_means(s: &Snapshot) -> Vec<f64> {
    s.epoch
        .cumulative
        .layers
        .iter()
        .map(|l| l.mean_experts_per_token)
        .collect()
}

#[test]
fn threshold_change_pause_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path());
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let twin = Model::load(&path, &Device::Cpu).unwrap();
    let before = direct_means(
        &twin,
        &RoutingConfig::uniform(RoutingPolicy::threshold(0.9), 2, 16).unwrap(),
    );
    let mut lowered = RoutingConfig::uniform(RoutingPolicy::threshold(0.9), 2, 16).unwrap();
    lowered.set_policy(Some(1), RoutingPolicy::threshold(0.2).check(16).unwrap());
    let after = direct_means(&twin, &lowered);
    assert_eq!(before[0], after[0], "layer 0 precedes the change");
    assert!(
        after[1] < before[1],
        "{before:?} -> {after:?}: the test needs a visible change"
    );

    let session = Session::start(model, eval_workload(&twin), config(&twin)).unwrap();
    let ctl = session.controller();
    let s0 = session
        .wait_for(WAIT, |s| s.epoch.forward_passes >= 3)
        .expect("passes run");
    assert_eq!(s0.epoch.id, 0);
    // Every pass of the epoch is the same batch under the same routing.
    assert_eq!(layer_means(&s0), before);
    assert_eq!(s0.epoch.window.tokens % SEQ as u64, 0);

    // Lower layer 1's threshold: the next epoch's passes all use it, from its first pass on.
    ctl.set_threshold(Layers::Slot(1), 0.2).unwrap();
    let s1 = session
        .wait_for(WAIT, |s| s.epoch.id == 1 && s.epoch.forward_passes >= 1)
        .expect("new epoch with a pass");
    assert_eq!(s1.epoch.reason, "threshold of layer 1 set to 0.20");
    assert_eq!(layer_means(&s1), after);
    assert_eq!(
        s1.policy.layers[1].policy,
        xmoe_top::routing::RoutingPolicy::threshold(0.2)
    );
    let prev = s1.previous_epoch.as_ref().expect("previous epoch kept");
    assert_eq!(prev.layer_mean_experts_per_token, before);
    // The reference (Dense) comparison runs every 2 batches.
    let s1q = session
        .wait_for(WAIT, |s| {
            s.epoch.id == 1 && s.epoch.quality.reference_batches >= 1
        })
        .expect("a reference pass");
    let q = &s1q.epoch.quality;
    assert!(q.bits_per_byte.unwrap() > 0.0);
    assert!(q.delta_bits_per_byte.is_some());
    assert!(
        q.mean_kl_bits.unwrap() > 0.0,
        "threshold 0.2 differs from dense"
    );
    assert!(q.reference_time_s > 0.0);
    // Reference passes are not counted as tokens or forward passes.
    assert_eq!(
        s1q.epoch.histograms.forward_latency_us.count,
        s1q.epoch.forward_passes
    );

    // Pause really pauses.
    ctl.set_paused(true).unwrap();
    let p = session.wait_for(WAIT, |s| s.paused).expect("paused");
    std::thread::sleep(Duration::from_millis(300));
    let still = session.latest().unwrap();
    assert!(still.paused);
    assert_eq!(still.tokens_processed_total, p.tokens_processed_total);
    assert_eq!(still.epoch.id, 1, "pausing does not start an epoch");
    ctl.set_paused(false).unwrap();
    session
        .wait_for(WAIT, |s| {
            !s.paused && s.tokens_processed_total > p.tokens_processed_total
        })
        .expect("runs again after resume");

    // Reset really resets.
    ctl.reset_stats().unwrap();
    let r = session
        .wait_for(WAIT, |s| s.epoch.id == 2)
        .expect("reset epoch");
    assert_eq!(r.epoch.reason, "statistics reset");
    assert!(r.previous_epoch.is_none());
    assert!(r.epoch.tokens <= SEQ as u64 * 2, "{}", r.epoch.tokens);
    // Same settings after a reset.
    let r2 = session
        .wait_for(WAIT, |s| s.epoch.id == 2 && s.epoch.forward_passes >= 1)
        .unwrap();
    assert_eq!(layer_means(&r2), after);

    // Invalid orders are refused before they reach the model thread.
    assert!(ctl.set_threshold(Layers::Slot(5), 0.5).is_err());
    assert!(ctl.set_threshold(Layers::All, 0.0).is_err());

    // Dense everywhere: experts per token becomes E on every layer.
    ctl.set_policy(Layers::All, RoutingPolicy::Dense).unwrap();
    let d = session
        .wait_for(WAIT, |s| s.epoch.id == 3 && s.epoch.forward_passes >= 1)
        .unwrap();
    assert_eq!(layer_means(&d), vec![16.0, 16.0]);
    assert!(d.epoch.window.flops.moe_saved_vs_all_experts_pct.abs() < 1e-9);

    let out = session.stop().unwrap();
    assert_eq!(out.final_snapshot.ended.as_deref(), Some("stopped"));
}

#[test]
fn token_budget_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    let w = eval_workload(&model);
    let mut c = config(&model);
    c.token_budget = Some(10 * SEQ as u64);
    let out = Session::start(model, w, c).unwrap().join().unwrap();
    let s = &out.final_snapshot;
    assert_eq!(s.ended.as_deref(), Some("token budget of 160 reached"));
    assert_eq!(s.tokens_processed_total, 160);
    assert_eq!(s.epoch.histograms.token_latency_us.count, 160);
    assert!(s.epoch.tokens_per_second > 0.0);
    // The model comes back for reuse.
    assert_eq!(out.model.moe_layers(), &[0, 1]);
}

#[test]
fn generate_streams_prompt_and_generated_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    let w = Workload::generate(
        GenerateSpec {
            prompts: vec![b"Hello".to_vec()],
            source: "--prompt".into(),
            max_len: 20,
            temperature: 0.8,
            seed: 1,
        },
        model.config(),
    )
    .unwrap();
    let mut c = config(&model);
    // Two full sequences: 5 prompt + 15 decode positions each.
    c.token_budget = Some(40);
    let out = Session::start(model, w, c).unwrap().join().unwrap();
    let s = out.final_snapshot;
    let g = s.generated.as_ref().expect("generate stream");
    assert_eq!(g.tokens.len(), 40);
    let prompt: Vec<u32> = g.tokens[..5].iter().map(|t| t.token).collect();
    assert_eq!(prompt, b"Hello".map(u32::from));
    assert!(
        g.tokens[..5]
            .iter()
            .all(|t| t.origin == TokenOrigin::Prompt)
    );
    assert!(
        g.tokens[5..20]
            .iter()
            .all(|t| t.origin == TokenOrigin::Generated)
    );
    assert_eq!(g.tokens[20].origin, TokenOrigin::Prompt);
    assert_ne!(g.tokens[19].sequence, g.tokens[20].sequence);
    assert!(g.tokens.iter().all(|t| t.experts_per_layer.len() == 2
        && t.experts_per_layer.iter().all(|&n| (1..=16).contains(&n))));
    // Decode steps are the latency samples; prefill is not.
    assert_eq!(s.epoch.histograms.token_latency_us.count, 30);
    assert!(s.epoch.decode_tokens_per_second.unwrap() > 0.0);
    assert!(s.epoch.quality.bits_per_byte.is_none());
}

#[test]
fn sink_receives_every_published_snapshot_including_the_last() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    let w = eval_workload(&model);
    let mut c = config(&model);
    c.token_budget = Some(20 * SEQ as u64);
    let seen: Arc<Mutex<Vec<Snapshot>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let session =
        Session::start_with_sink(model, w, c, move |s| sink.lock().unwrap().push(s)).unwrap();
    let last = session
        .wait_for(WAIT, |s| s.ended.is_some())
        .expect("the session ends on its budget");
    let out = session.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2);
    assert!(seen.windows(2).all(|w| w[0].sequence + 1 == w[1].sequence));
    assert_eq!(seen.last().unwrap().sequence, last.sequence);
    assert_eq!(out.final_snapshot.sequence, last.sequence);
}

#[test]
fn quick_tune_runs_between_passes_and_applies_as_one_epoch() {
    use xmoe_top::profiling::snapshot::TuneStatus;
    use xmoe_top::session::Control;
    use xmoe_top::session::tune::Budget;
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    // Eight windows of SEQ + 1 bytes: four search and four verification batches.
    let text: Vec<u8> = TEXT.iter().copied().cycle().take(8 * SEQ + 1).collect();
    let w = Workload::eval(
        EvalSpec {
            text: TextSource {
                name: "test text".into(),
                bytes: text,
            },
            batch: 1,
            seq_len: SEQ,
        },
        model.config(),
    )
    .unwrap();
    let c = config(&model);
    let session = Session::start(model, w, c).unwrap();
    let ctl = session.controller();
    session
        .wait_for(WAIT, |s| s.epoch.forward_passes >= 1)
        .expect("passes run");
    // Any quality loss is within a budget of 100 bits/byte: every layer ends at the grid's
    // lowest threshold, and the verification agrees.
    ctl.send(Control::QuickTune(Budget::AbsoluteBitsPerByte(100.0)))
        .unwrap();
    let done = session
        .wait_for(WAIT, |s| matches!(s.tune, Some(TuneStatus::Done(_))))
        .expect("the quick tune finishes");
    let Some(TuneStatus::Done(q)) = &done.tune else {
        unreachable!()
    };
    assert_eq!(q.policies, vec![RoutingPolicy::threshold(0.5); 2]);
    assert!(q.tuned.within_budget);
    assert_eq!((q.search_tokens, q.verify_tokens), (4 * 16, 4 * 16));
    let epoch = done.epoch.id;
    ctl.send(Control::ApplyTune).unwrap();
    let applied = session
        .wait_for(WAIT, |s| s.epoch.id > epoch)
        .expect("a new epoch");
    assert_eq!(
        applied.epoch.reason,
        "thresholds from the quick tune: t=0.5"
    );
    assert!(applied.tune.is_none(), "applying clears the dialog");
    assert!(
        applied
            .policy
            .layers
            .iter()
            .all(|l| l.policy == RoutingPolicy::threshold(0.5))
    );
    session.stop().unwrap();
}

#[test]
fn quick_tune_on_a_generate_session_says_why_not() {
    use xmoe_top::profiling::snapshot::TuneStatus;
    use xmoe_top::session::Control;
    use xmoe_top::session::tune::Budget;
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    let w = Workload::generate(
        GenerateSpec {
            prompts: vec![b"Hello".to_vec()],
            source: "--prompt".into(),
            max_len: 20,
            temperature: 0.8,
            seed: 1,
        },
        model.config(),
    )
    .unwrap();
    let c = config(&model);
    let session = Session::start(model, w, c).unwrap();
    let ctl = session.controller();
    ctl.send(Control::QuickTune(Budget::RelativeBitsPerByte(0.01)))
        .unwrap();
    let s = session
        .wait_for(WAIT, |s| matches!(s.tune, Some(TuneStatus::Failed(_))))
        .expect("a refusal");
    let Some(TuneStatus::Failed(why)) = &s.tune else {
        unreachable!()
    };
    assert!(why.contains("eval text"), "{why}");
    ctl.send(Control::DismissTune).unwrap();
    session
        .wait_for(WAIT, |s| s.tune.is_none())
        .expect("dismissed");
    session.stop().unwrap();
}

#[test]
fn token_routes_are_published_only_while_followed_and_match_a_direct_pass() {
    use xmoe_top::session::Control;
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path());
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let twin = Model::load(&path, &Device::Cpu).unwrap();
    let c = config(&twin);
    let routing = c.routing.clone();
    let session = Session::start(model, eval_workload(&twin), c).unwrap();
    let ctl = session.controller();
    let s = session
        .wait_for(WAIT, |s| s.epoch.forward_passes >= 2)
        .expect("passes run");
    assert!(s.routes.is_none(), "no routes unless asked");
    ctl.send(Control::FollowTokens(true)).unwrap();
    let s = session
        .wait_for(WAIT, |s| s.routes.is_some())
        .expect("routes while followed");
    let r = s.routes.clone().unwrap();
    assert_eq!(r.layers, vec![0, 1]);
    assert_eq!(r.tokens.len(), SEQ);

    // The same tokens run directly: every probability, choice and loss agrees.
    let tokens: Vec<u32> = TEXT[..SEQ].iter().map(|&b| b as u32).collect();
    let mut trace = ForwardTrace::default();
    let logits = twin
        .forward(&tokens, 1, &routing, None, &mut trace)
        .unwrap();
    let vocab = twin.config().vocab_size;
    for (i, t) in r.tokens.iter().enumerate() {
        assert_eq!((t.token, t.position), (tokens[i], i));
        assert_eq!(t.bytes, vec![TEXT[i]]);
        assert_eq!(t.target, Some((TEXT[i + 1] as u32, vec![TEXT[i + 1]])));
        let row = &logits[i * vocab..(i + 1) * vocab];
        let lse = row.iter().map(|&z| (z as f64).exp()).sum::<f64>().ln();
        let want = lse - row[TEXT[i + 1] as usize] as f64;
        assert!(
            (t.loss_nats.unwrap() as f64 - want).abs() < 1e-4,
            "token {i}: {} vs {want}",
            t.loss_nats.unwrap()
        );
        for (slot, l) in t.layers.iter().enumerate() {
            let m = &trace.moe[slot].routing;
            assert_eq!(l.probs, m.probs[i * 16..(i + 1) * 16].to_vec());
            let direct: Vec<(u16, f32, bool)> =
                m.choices(i).map(|(e, w, k)| (e as u16, w, k)).collect();
            assert_eq!(l.chosen, direct, "token {i}, slot {slot}");
        }
    }
    ctl.send(Control::FollowTokens(false)).unwrap();
    session
        .wait_for(WAIT, |s| s.routes.is_none())
        .expect("routes stop with the view");
    session.stop().unwrap();
}
