//! A/B: two policies on the same tokens, through a real session on a small random model and
//! through the command line as a user runs it (summary, reports, usage errors).

#[path = "support/cli.rs"]
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use cli::{text, xmoe};
use common::{small_config, write_random};
use xmoe_top::model::format::StoreDtype;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{Model, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::session::{Control, Session, SessionConfig};
use xmoe_top::workload::{EvalSpec, TextSource, Workload};

const SEQ: usize = 16;
/// Exactly one window of SEQ + 1 bytes: every eval batch is the same batch.
const TEXT: &[u8] = b"hard tokens take ";

fn model_file(dir: &Path) -> PathBuf {
    let mut cfg = small_config();
    cfg.n_experts = 16;
    write_random(dir, "m.safetensors", &cfg, 3, false, StoreDtype::F32)
}

fn session(model: Model, a: RoutingPolicy, b: RoutingPolicy, batches: u64) -> Session {
    let e = model.config().n_experts;
    let w = Workload::eval(
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
    .unwrap();
    let mut c = SessionConfig::new(&model, "CPU (test)");
    c.routing = RoutingConfig::uniform(a, 2, e).unwrap();
    c.compare = Some(RoutingConfig::uniform(b, 2, e).unwrap());
    c.snapshot_interval = Duration::from_millis(20);
    c.device_sample_period = None;
    c.token_budget = Some(batches * SEQ as u64);
    Session::start(model, w, c).unwrap()
}

/// Experts chosen per token in each MoE layer on the test batch, run directly.
fn direct_means(model: &Model, policy: RoutingPolicy) -> Vec<f64> {
    let routing = RoutingConfig::uniform(policy, 2, model.config().n_experts).unwrap();
    let tokens: Vec<u32> = TEXT[..SEQ].iter().map(|&b| b as u32).collect();
    let mut trace = ForwardTrace::default();
    model
        .forward(&tokens, 1, &routing, None, &mut trace)
        .unwrap();
    trace
        .moe
        .iter()
        .map(|m| m.routing.pairs() as f64 / m.routing.tokens() as f64)
        .collect()
}

#[test]
fn a_policy_compared_with_itself_agrees_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    let t = RoutingPolicy::threshold(0.7);
    let out = session(model, t, t, 4).join().unwrap();
    let c = out.final_snapshot.compare.expect("the comparison ran");
    assert_eq!((c.batches, c.tokens), (4, 4 * SEQ as u64));
    assert_eq!(c.jaccard_mean, 1.0);
    assert_eq!(c.identical_fraction(), 1.0);
    assert_eq!(c.delta_experts_per_token(), 0.0);
    assert_eq!(c.delta_moe_flops_per_token, 0.0);
    assert!(c.delta_bits_per_byte.unwrap().abs() < 1e-12);
    assert!(c.mean_kl_bits.unwrap().abs() < 1e-9);
    assert_eq!(c.max_abs_share_delta(), 0.0);
    // The session's own figures count A's tokens only.
    assert_eq!(out.final_snapshot.tokens_processed_total, 4 * SEQ as u64);
}

#[test]
fn every_figure_follows_the_two_policies_and_changes_of_a_restart_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path());
    let twin = Model::load(&path, &Device::Cpu).unwrap();
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let (a, b) = (RoutingPolicy::threshold(0.5), RoutingPolicy::Dense);
    let s = session(model, a, b, 1_000_000);
    let snap = s
        .wait_for(Duration::from_secs(120), |s| {
            s.compare.as_ref().is_some_and(|c| c.batches >= 3)
        })
        .expect("three compared batches");
    let c = snap.compare.unwrap();
    let (want_a, want_b) = (direct_means(&twin, a), direct_means(&twin, b));
    for (slot, l) in c.layers.iter().enumerate() {
        assert!(
            (l.experts_per_token_a - want_a[slot]).abs() < 1e-9,
            "A {slot}"
        );
        assert!(
            (l.experts_per_token_b - want_b[slot]).abs() < 1e-9,
            "B {slot}"
        );
        // Dense chooses every expert for every token.
        assert!(l.share_b.iter().all(|&x| x == 1.0));
        // A's set is inside B's: the Jaccard index is |A| / 16 per token.
        assert!(
            (l.jaccard_mean - want_a[slot] / 16.0).abs() < 1e-9,
            "J {slot}"
        );
    }
    assert!(c.delta_experts_per_token() > 0.0 && c.delta_moe_flops_per_token > 0.0);
    assert!(
        c.delta_moe_flops_pct_of_all_experts > 0.0 && c.delta_moe_flops_pct_of_all_experts <= 100.0
    );
    assert_eq!(c.b.moe_flops_fraction_of_all_experts, 1.0);
    assert!(c.mean_kl_bits.unwrap() >= 0.0);
    assert!(c.delta_bits_per_byte_stderr.is_some());
    assert!(c.a.pass_ms_p50 > 0.0 && c.b.pass_ms_p90 >= c.b.pass_ms_p50);
    // A change of A starts the comparison again under the new A.
    s.controller()
        .send(Control::SetPolicy {
            layers: xmoe_top::session::Layers::All,
            policy: RoutingPolicy::threshold(0.9),
        })
        .unwrap();
    let snap = s
        .wait_for(Duration::from_secs(120), |s| {
            s.compare
                .as_ref()
                .is_some_and(|c| c.a.label == "t=0.9" && c.batches >= 1)
        })
        .expect("a restarted comparison");
    assert!(snap.compare.unwrap().batches <= snap.epoch.forward_passes);
    // Stopping it removes it from the snapshots.
    s.controller().send(Control::SetCompare(None)).unwrap();
    let snap = s
        .wait_for(Duration::from_secs(120), |s| s.compare.is_none())
        .expect("comparison stopped");
    assert!(snap.compare.is_none());
    s.stop().unwrap();
}

fn cli_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    model_file(dir.path());
    std::fs::write(
        dir.path().join("t.txt"),
        b"the experts of a small model route words ".repeat(20),
    )
    .unwrap();
    dir
}

#[test]
fn run_compare_prints_and_reports_the_comparison() {
    let dir = cli_dir();
    let d = dir.path();
    let o = xmoe(
        &[
            "run",
            "m.safetensors",
            "--headless",
            "--text",
            "t.txt",
            "--tokens",
            "128",
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--device",
            "cpu",
            "--compare",
            "t=0.9",
            "top-2",
            "--report",
            "ab.json",
        ],
        d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for needle in [
        "A/B comparison (differences are B − A)",
        "t=0.9",
        "top-2",
        "128 tokens in 4 batches",
        "KL(P_B ‖ P_A)",
        "mean Jaccard",
        "Jaccard distribution",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ab.json")).unwrap()).unwrap();
    let c = &r["snapshot"]["compare"];
    assert_eq!(c["b"]["label"], "top-2");
    assert_eq!(c["layers"].as_array().unwrap().len(), 2);
    assert_eq!(c["batches"], 4);
    // Top-2 takes exactly 2 experts per token in every layer.
    assert_eq!(c["b"]["mean_experts_per_token"], 2.0);
    // The JSON report reads back (validated) into the other formats.
    for f in ["ab.md", "ab.html"] {
        let o = xmoe(&["report", "ab.json", f], d);
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let md = std::fs::read_to_string(d.join("ab.md")).unwrap();
    assert!(
        md.contains("## A/B comparison") && md.contains("| L0 |"),
        "{md}"
    );
    let html = std::fs::read_to_string(d.join("ab.html")).unwrap();
    assert!(html.contains("fig-compare-heatmap") && html.contains("fig-compare-jaccard"));
    // A hand-edited report with a layer missing is refused, not rendered.
    let mut bad = r.clone();
    bad["snapshot"]["compare"]["layers"]
        .as_array_mut()
        .unwrap()
        .pop();
    std::fs::write(d.join("bad.json"), bad.to_string()).unwrap();
    let o = xmoe(&["report", "bad.json", "bad.md"], d);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("snapshot.compare.layers"),
        "{}",
        text(&o).1
    );
}

#[test]
fn bad_compare_arguments_are_usage_errors() {
    let dir = cli_dir();
    for (extra, msg) in [
        (&["--compare", "t=0.9", "top-99"][..], "k in 1..=16"),
        (&["--compare", "t=0.9", "sparse"][..], "expected t=T"),
        (
            &["--compare", "t=5:0.9", "dense"][..],
            "layer 5 is not a MoE layer",
        ),
        (
            &["--compare", "t=0.9", "dense", "--threshold", "0.5"][..],
            "drop --policy, --threshold and --k",
        ),
        (
            &["--compare", "t=0.9", "dense", "--workload", "generate"][..],
            "needs --workload eval",
        ),
    ] {
        let mut args = vec!["run", "m.safetensors", "--headless", "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = xmoe(&args, dir.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(msg), "{extra:?}: {err}");
    }
}
