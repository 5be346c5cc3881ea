//! `xmoe-top route`: one token of a recorded trace, followed through every MoE layer.

#[path = "support/cli.rs"]
mod cli;
mod common;

use cli::{text, xmoe};
use xmoe_top::model::format::StoreDtype;

#[test]
fn route_shows_a_recorded_tokens_choices_and_what_other_thresholds_would_choose() {
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
    std::fs::write(
        d.join("t.txt"),
        b"the experts of a small model route words ".repeat(20),
    )
    .unwrap();
    let run = xmoe(
        &[
            "run",
            "m.safetensors",
            "--text",
            "t.txt",
            "--tokens",
            "64",
            "--batch",
            "1",
            "--seq-len",
            "32",
            "--trace",
            "p.jsonl",
            "--trace-probs",
        ],
        d,
    );
    assert!(run.status.success(), "{:?}", text(&run));
    let o = xmoe(&["route", "p.jsonl", "--pos", "5", "--width", "90"], d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Position 5 of "the experts…" is 'x', after "the e".
    assert!(
        out.contains("token at position 5 = id 120 \"x\" after \"the e\""),
        "{out}"
    );
    assert!(out.contains("  .5  .7  .8  .9 .95 .99"), "{out}");
    // Every MoE layer has its row and its running-sum detail, each starting at rank 1.
    let layers = common::small_config().n_layers;
    assert!(
        out.matches(": experts in the order the rule reads them")
            .count()
            >= 1,
        "{out}"
    );
    assert!(out.matches("\n  1 e").count() <= layers, "{out}");
    assert!(out.contains("chosen"), "{out}");

    // A trace without probabilities says what it cannot show.
    let run = xmoe(
        &[
            "run",
            "m.safetensors",
            "--text",
            "t.txt",
            "--tokens",
            "32",
            "--batch",
            "1",
            "--seq-len",
            "32",
            "--trace",
            "ids.jsonl",
        ],
        d,
    );
    assert!(run.status.success(), "{:?}", text(&run));
    let (out, _) = text(&xmoe(&["route", "ids.jsonl"], d));
    assert!(out.contains("record with --trace-probs"), "{out}");

    // Positions that are not there, and files that are not traces: one line, non-zero exit.
    let o = xmoe(&["route", "p.jsonl", "--pos", "999"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("has positions 0..=31, not 999"),
        "{:?}",
        text(&o)
    );
    let o = xmoe(&["route", "t.txt"], d);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("not a trace header"), "{:?}", text(&o));
}
