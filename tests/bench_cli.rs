//! `xmoe-top bench --model`: one checkpoint timed per policy, the xmoe-top side of
//! scripts/peers/run.sh (issue 15, section 3).

#[path = "support/cli.rs"]
mod cli;

use std::path::Path;

use cli::{text, xmoe};

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf/olmoe/per_expert")
        .display()
        .to_string()
}

#[test]
fn bench_model_times_each_policy_on_the_same_tokens_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture();
    let o = xmoe(
        &[
            "bench",
            "--threads",
            "1",
            "--model",
            &model,
            "--device",
            "cpu",
            "--policies",
            "native,t=0.5,dense",
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--passes",
            "2",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "5",
            "--json",
            "b.json",
        ],
        dir.path(),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("| native | 2.00 |"), "{out}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("b.json")).unwrap()).unwrap();
    let rows = doc["results"].as_array().unwrap();
    let policies: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["native", "t=0.5", "dense"]);
    // The fixture's native rule is top-2 of 8 experts; dense takes all 8; a threshold of 0.5
    // takes at least one and at most all.
    let experts: Vec<f64> = rows
        .iter()
        .map(|r| r["experts_per_token_eval"].as_f64().unwrap())
        .collect();
    assert_eq!(experts[0], 2.0);
    assert!((1.0..=8.0).contains(&experts[1]), "{experts:?}");
    assert_eq!(experts[2], 8.0);
    for r in rows {
        assert_eq!(r["eval_tokens"], 2 * 2 * 16);
        assert!(r["eval_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["eval_gflops"].as_f64().unwrap() > 0.0);
        assert!(r["eval_share_of_matmul_rate"].as_f64().unwrap() > 0.0);
        assert!(r["decode_ms_per_token"].as_f64().unwrap() > 0.0);
        // Each step's bound (its FLOPs at the measured matmul rate: the fixture fits the cache)
        // grows with the experts it routes to, so dense is held to more than native top-2.
        assert!(r["decode_bound_ms_per_token"].as_f64().unwrap() > 0.0);
        // The token after the prompt, then one per step.
        assert_eq!(r["decode_tokens"].as_array().unwrap().len(), 6);
        assert!(
            r["decode_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t.as_u64().unwrap() < 512)
        );
    }
    let bound = |i: usize| rows[i]["decode_bound_ms_per_token"].as_f64().unwrap();
    assert!(bound(2) > bound(0), "{} vs {}", bound(2), bound(0));
    // The decode loop goes through `Model::decode`, as a session does: this fixture takes the
    // lean path.
    assert!(
        doc["decode_path"].as_str().unwrap().starts_with("lean"),
        "{}",
        doc["decode_path"]
    );
    assert_eq!(doc["setup"]["new_tokens"], 5);
    assert!(doc["text_tokens"].as_u64().unwrap() >= 3 * 2 * 16);
}

#[test]
fn bench_model_rejects_a_bad_policy_before_timing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture();
    let o = xmoe(
        &["bench", "--model", &model, "--policies", "native,bogus"],
        dir.path(),
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(err.contains("--policies: `bogus`"), "{err}");
    // Nothing was timed: not even the table's header was printed.
    assert!(!out.contains("| policy |"), "{out}");
}

#[test]
fn bench_text_needs_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let o = xmoe(&["bench", "--text", "t.txt"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--model"), "{:?}", text(&o));
}
