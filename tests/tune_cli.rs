//! `xmoe-top tune` as a user runs it: the thresholds it prints, the invariants of its search, its
//! report, and its usage errors.

#[path = "support/cli.rs"]
mod cli;
mod common;

use cli::{text, xmoe};
use xmoe_top::model::format::StoreDtype;

#[test]
fn tune_finds_per_layer_thresholds_within_the_budget_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write_random(
        d,
        "m.safetensors",
        &common::small_config(),
        7,
        false,
        StoreDtype::F32,
    );
    let corpus: Vec<u8> = (0..6000u32)
        .map(|i| b"the experts of a small model route words "[(i * 7 % 41) as usize])
        .collect();
    std::fs::write(d.join("t.txt"), &corpus).unwrap();
    let args = [
        "tune",
        "m.safetensors",
        "--text",
        "t.txt",
        "--budget",
        "0.02",
        "--tokens",
        "256",
        "--verify-tokens",
        "128",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--grid",
        "0.3:1.0:0.1",
        "--device",
        "cpu",
        "--report",
        "t.json",
    ];
    let o = xmoe(&args, d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("tuned per-layer   --threshold "), "{out}");
    assert!(err.contains("wrote t.json"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("t.json")).unwrap()).unwrap();
    let limit = 0.02;
    let best = &r["best_uniform"];
    let path = r["path"].as_array().unwrap();
    // The search starts at the best single threshold and only ever lowers FLOPs within budget.
    assert_eq!(&path[0], best);
    let mut last = f64::INFINITY;
    for step in path {
        let f = step["moe_flops_fraction"].as_f64().unwrap();
        assert!(
            f <= last + 1e-12,
            "FLOPs rose along the path: {f} after {last}"
        );
        last = f;
        assert!(step["delta_bits_per_byte"].as_f64().unwrap() <= limit + 1e-12);
        assert!(
            step["mean_kl_bits"].is_null(),
            "KL is only measured for --kl"
        );
    }
    assert_eq!(&r["tuned"], path.last().unwrap());
    // No uniform threshold with fewer FLOPs than the best one is within budget.
    for u in r["uniform"].as_array().unwrap() {
        if u["moe_flops_fraction"].as_f64() < best["moe_flops_fraction"].as_f64() {
            assert!(u["delta_bits_per_byte"].as_f64().unwrap() > limit, "{u}");
        }
    }
    assert_eq!(r["search_tokens"], 256);
    assert_eq!(r["verify_tokens"], 128);
    // A KL budget measures the KL everywhere; a Markdown report renders the frontier.
    let mut kl = args.to_vec();
    kl.splice(4..6, ["--kl", "0.05"]);
    *kl.last_mut().unwrap() = "t.md";
    let o = xmoe(&kl, d);
    assert!(o.status.success(), "{}", text(&o).1);
    let md = std::fs::read_to_string(d.join("t.md")).unwrap();
    assert!(md.contains("## Frontier (search tokens)"), "{md}");
    assert!(md.contains("mean KL to the reference at most 0.05"), "{md}");
}

/// Lazy and exhaustive descents on the embedded model (4 MoE layers): the first round is the same
/// by construction (the lazy search has no stale scores yet); the lazy one never needs more passes;
/// both keep every step within the budget.
#[test]
fn lazy_and_exhaustive_descents_agree_on_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut reports = Vec::new();
    for mode in ["lazy", "exhaustive"] {
        let name = format!("{mode}.json");
        let args = [
            "tune",
            "--budget",
            "1%",
            "--tokens",
            "512",
            "--verify-tokens",
            "512",
            "--search",
            mode,
            "--report",
            &name,
        ];
        let o = xmoe(&args, d);
        assert!(o.status.success(), "{}", text(&o).1);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(&name)).unwrap()).unwrap();
        assert_eq!(r["search"], mode);
        let limit = 0.01 * r["reference_bits_per_byte_search"].as_f64().unwrap();
        let path = r["path"].as_array().unwrap();
        assert!(path.len() >= 2, "{mode}: the search took no step");
        for step in path {
            assert!(step["delta_bits_per_byte"].as_f64().unwrap() <= limit + 1e-12);
        }
        reports.push(r);
    }
    let (lazy, exhaustive) = (&reports[0], &reports[1]);
    assert_eq!(lazy["best_uniform"], exhaustive["best_uniform"]);
    assert_eq!(lazy["path"][1]["label"], exhaustive["path"][1]["label"]);
    assert!(
        lazy["evaluations"].as_u64() <= exhaustive["evaluations"].as_u64(),
        "lazy {} passes, exhaustive {}",
        lazy["evaluations"],
        exhaustive["evaluations"]
    );
}

#[test]
fn tune_usage_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("short.txt"), b"too short for two sets of tokens").unwrap();
    for (args, needle) in [
        (&["tune", "--budget", "x"][..], "--budget `x`"),
        (&["tune", "--budget=-1%"][..], "non-negative"),
        (&["tune"][..], "--budget"),
        (
            &["tune", "--kl", "0.1", "--budget", "1%"][..],
            "cannot be used with",
        ),
        (
            &["tune", "--budget", "1%", "--grid", "0.5:2:0.5"][..],
            "outside (0, 1]",
        ),
        (
            &["tune", "--budget", "1%", "--report", "r.html"][..],
            "use .json or .md",
        ),
        (
            &["tune", "--budget", "1%", "--text", "short.txt"][..],
            "distinct tokens",
        ),
    ] {
        let o = xmoe(args, d);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
