//! `xmoe-top import`: every engine format reads to the counts its generator wrote
//! (scripts/import-fixtures/generate.py; the small case is worked by hand below), the load figures
//! are the hand-computed ones, and bad input is one clear line with exit status 3, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use xmoe_top::import::analysis::{PlacementChoice, summarize};
use xmoe_top::import::{Dump, Format, Hints, parse};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn read(name: &str, hints: Hints) -> Dump {
    let bytes = std::fs::read(fixture(name)).unwrap();
    parse(&bytes, None, hints).unwrap_or_else(|e| panic!("{name}: {e}"))
}

const ROUTED_HINTS: Hints = Hints {
    layers: Some(2),
    top_k: Some(2),
    experts: None,
};

// The generator's two passes choose these physical experts (layer 0, layer 1):
//   pass 0: [0,1] [4,2] [0,3] | [0,3] [2,5] [1,0]     pass 1: [5,2] [3,4] | [4,1] [0,5]
// Physical load per layer: L0 = [2,1,2,2,2,1], L1 = [3,2,1,1,1,2].
// physical_to_logical_map L0 = [0,1,2,3,0,1], L1 = [0,2,0,1,0,3], so the logical load is
// L0 = [2+2, 1+1, 2, 2] = [4,2,2,2], L1 = [3+1+1, 1, 2, 2] = [5,1,2,2].
const LOGICAL: [[u64; 4]; 2] = [[4, 2, 2, 2], [5, 1, 2, 2]];
const PHYSICAL: [[u64; 6]; 2] = [[2, 1, 2, 2, 2, 1], [3, 2, 1, 1, 1, 2]];

fn assert_logical(d: &Dump) {
    assert_eq!((d.n_layers, d.n_experts), (2, 4), "{:?}", d.format);
    assert_eq!(
        d.load,
        LOGICAL.map(|r| r.to_vec()).to_vec(),
        "{:?}",
        d.format
    );
}

#[test]
fn every_format_reads_to_the_generated_counts() {
    let d = read("sglang-routed.json", ROUTED_HINTS);
    assert_eq!(d.format, Format::SglangRouted);
    assert_logical(&d);
    assert_eq!(
        (d.records, d.tokens, d.top_k),
        ((2, "responses"), Some(5), Some(2))
    );

    let d = read("sglang-stat.pt", Hints::default());
    assert_eq!(d.format, Format::SglangStat);
    assert_logical(&d);
    assert_eq!(d.records, (4, "steps"));
    assert!(d.notes[0].contains("2 with any load"), "{:?}", d.notes);

    for (name, format, tokens) in [
        ("sglang-per-pass.pt", Format::SglangPerPass, None),
        ("sglang-per-token.pt", Format::SglangPerToken, Some(5)),
    ] {
        let d = read(name, Hints::default());
        assert_eq!(d.format, format);
        assert_logical(&d);
        assert_eq!((d.records, d.tokens), ((2, "passes"), tokens));
        let p = d.physical.as_ref().unwrap();
        assert_eq!(p.load, PHYSICAL.map(|r| r.to_vec()).to_vec());
        assert_eq!(p.to_logical[1], vec![0, 2, 0, 1, 0, 3]);
    }

    let d = read("vllm-eplb.pt", Hints::default());
    assert_eq!(d.format, Format::VllmEplb);
    assert_logical(&d);
    assert_eq!(d.records, (3, "window steps"));
    assert_eq!(
        d.physical.unwrap().load,
        PHYSICAL.map(|r| r.to_vec()).to_vec()
    );
}

fn close(a: Option<f64>, b: f64) {
    let a = a.expect("a ratio");
    assert!((a - b).abs() < 1e-12, "{a} != {b}");
}

#[test]
fn imbalance_and_gpu_load_match_the_hand_computation() {
    let d = read("sglang-per-pass.pt", Hints::default());
    // Per layer max/mean: L0 4 / 2.5 = 1.6, L1 5 / 2.5 = 2.0; overall (4+5)/(2.5+2.5) = 1.8.
    let s = summarize(&d, "f", &PlacementChoice::None, None).unwrap();
    close(s.layers[0].imbalance, 1.6);
    close(s.layers[1].imbalance, 2.0);
    close(s.overall_imbalance, 1.8);
    assert_eq!((s.layers[1].max, s.layers[1].max_expert), (5, 0));
    assert!(s.gpu.is_none());
    assert!(s.gpu_unavailable.unwrap().contains("--gpus N"));

    // 3 GPUs over 6 physical experts, 2 each: L0 [2+1, 2+2, 2+1] = [3,4,3], L1 [5,2,3].
    // max/mean: 4/(10/3) = 1.2, 5/(10/3) = 1.5; overall (4+5)/(20/3) = 1.35.
    let s = summarize(&d, "f", &PlacementChoice::Gpus(3), None).unwrap();
    let g = s.gpu.unwrap();
    assert_eq!(g.per_layer, vec![vec![3.0, 4.0, 3.0], vec![5.0, 2.0, 3.0]]);
    close(g.layer_imbalance[0], 1.2);
    close(g.layer_imbalance[1], 1.5);
    close(g.overall, 1.35);
    assert_eq!(g.total_per_gpu, vec![8.0, 6.0, 6.0]);

    // Logical counts only (stat): 2 GPUs of 2 experts: L0 [6,4], L1 [6,4]: 1.2 each.
    let d = read("sglang-stat.pt", Hints::default());
    let s = summarize(&d, "f", &PlacementChoice::Gpus(2), None).unwrap();
    let g = s.gpu.unwrap();
    assert_eq!(g.per_layer, vec![vec![6.0, 4.0], vec![6.0, 4.0]]);
    close(g.overall, 1.2);

    // A replicated expert's load splits evenly: expert 0 on GPUs 0 and 2.
    // L0: [4/2, 2+2, 2+4/2] = [2,4,4]; L1: [5/2, 1+2, 2+5/2] = [2.5,3,4.5].
    let s = summarize(&d, "f", &PlacementChoice::Spec("0;1,2;3,0".into()), None).unwrap();
    assert_eq!(
        s.gpu.unwrap().per_layer,
        vec![vec![2.0, 4.0, 4.0], vec![2.5, 3.0, 4.5]]
    );

    // Placements that do not fit the dump are errors that say why.
    let e = summarize(&d, "f", &PlacementChoice::Gpus(3), None).unwrap_err();
    assert!(e.contains("do not split evenly"), "{e}");
    let e = summarize(&d, "f", &PlacementChoice::Spec("0-2".into()), None).unwrap_err();
    assert!(e.contains("expert 3 is on no GPU"), "{e}");
    let e = summarize(&d, "f", &PlacementChoice::Spec("0-4".into()), None).unwrap_err();
    assert!(e.contains("inside 0..4"), "{e}");
}

#[test]
fn what_if_says_what_cannot_be_computed() {
    for (name, hints, words) in [
        (
            "sglang-routed.json",
            ROUTED_HINTS,
            "not their router probabilities",
        ),
        (
            "sglang-stat.pt",
            Hints::default(),
            "only how many tokens each expert took",
        ),
    ] {
        let d = read(name, hints);
        let s = summarize(&d, "f", &PlacementChoice::None, Some(0.9)).unwrap();
        let text = xmoe_top::report::import::text(&s);
        assert!(text.contains("What-if t=0.9: cannot be computed"), "{text}");
        assert!(text.contains(words), "{text}");
    }
}

#[test]
fn routed_experts_needs_its_shape_and_checks_it() {
    let bytes = std::fs::read(fixture("sglang-routed.json")).unwrap();
    let e = parse(&bytes, None, Hints::default()).unwrap_err();
    assert!(e.contains("--layers N --top-k K"), "{e}");
    // 5 tokens × 2 × 2 ids do not divide into 3 layers × 2.
    let hints = Hints {
        layers: Some(3),
        ..ROUTED_HINTS
    };
    let e = parse(&bytes, None, hints).unwrap_err();
    assert!(e.contains("not a whole number of tokens"), "{e}");
    let hints = Hints {
        experts: Some(3),
        ..ROUTED_HINTS
    };
    let e = parse(&bytes, None, hints).unwrap_err();
    assert!(e.contains("expert id 3"), "{e}");
    // JSON Lines: one response per line reads the same.
    let v: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    let lines: Vec<String> = v.iter().map(|r| r.to_string()).collect();
    let d = parse(lines.join("\n").as_bytes(), None, ROUTED_HINTS).unwrap();
    assert_logical(&d);
    let e = parse(b"{\"text\": \"hi\"}", None, ROUTED_HINTS).unwrap_err();
    assert!(e.contains("return_routed_experts"), "{e}");
}

fn xmoe_top(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mixtral() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf/mixtral/per_expert")
        .display()
        .to_string()
}

#[test]
fn cli_prints_the_summary_and_writes_reports() {
    let f = fixture("sglang-per-token.pt");
    let (code, out, err) = xmoe_top(&["import", f.to_str().unwrap(), "--gpus", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(sglang-per-token)"), "{out}");
    assert!(
        out.contains("overall imbalance (Σ max / Σ mean over layers): 1.80"),
        "{out}"
    );
    assert!(out.contains("overall GPU imbalance"), "{out}");
    assert!(out.contains("1.35"), "{out}");

    // routed_experts takes its shape from --model (Mixtral fixture: 2 layers, 8 experts, top-2).
    let dir = tempfile::tempdir().unwrap();
    let f = fixture("sglang-routed.json");
    for ext in ["json", "md", "html"] {
        let report = dir.path().join(format!("r.{ext}"));
        let (code, out, err) = xmoe_top(&[
            "import",
            f.to_str().unwrap(),
            "--model",
            &mixtral(),
            "--gpus",
            "2",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("2 layers × 8 experts"), "{out}");
        let text = std::fs::read_to_string(&report).unwrap();
        assert!(text.contains("sglang-routed"), "{ext}: {text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(json["summary"]["load"][1][0], 5);
    assert_eq!(json["summary"]["gpu"]["gpus"], 2);
}

/// One line on stderr, naming the file, exit status 3 (bad input), no panic.
fn assert_bad_input(args: &[&str], words: &str) {
    let (code, out, err) = xmoe_top(args);
    assert_eq!(code, 3, "{args:?}: {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("xmoe-top: error: "), "{err}");
    assert!(err.contains(words), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let f = |n: &str| fixture(n).display().to_string();
    assert_bad_input(
        &["import", &f("bad-truncated.pt")],
        "bad-truncated.pt: not a torch.save archive",
    );
    assert_bad_input(
        &["import", &f("bad-foreign.pt")],
        "none of the engine dumps read here (keys logical_count, records, expert_load_window)",
    );
    assert_bad_input(
        &["import", &f("bad-global.pt")],
        "names the global `posix.system`",
    );
    assert_bad_input(
        &["import", &f("sglang-stat.pt"), "--model", &mixtral()],
        "the sglang-stat dump has 2 layers × 4 experts, but the model",
    );
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    assert_bad_input(
        &["import", readme.to_str().unwrap()],
        "neither JSON (SGLang responses) nor a torch.save archive",
    );
    assert_bad_input(
        &["import", &f("sglang-routed.json"), "--format", "vllm-eplb"],
        "vllm-eplb dumps are torch.save archives",
    );
    // A usage error is status 2, not 3.
    let (code, _, err) = xmoe_top(&["import", &f("sglang-stat.pt"), "--gpus", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("do not split evenly over 3 GPUs") || err.contains("split evenly into 3"),
        "{err}"
    );
}

#[test]
fn committed_pickles_decode_or_are_refused_without_panic() {
    use std::rc::Rc;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/torch_pickle");
    let storage = Rc::new((0u8..=255).collect::<Vec<u8>>());
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let mut lookup = |_: &str| Ok(storage.clone());
        let r = xmoe_top::import::torch_file::decode_pickle(&data, &mut lookup);
        if name.starts_with("ok-") {
            r.unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            let e = r.unwrap_err();
            assert!(!e.is_empty(), "{name}");
        }
        n += 1;
    }
    assert!(n >= 6, "{n} inputs");
}

#[test]
fn hostile_pickles_are_refused_before_they_grow() {
    use xmoe_top::import::torch_file::prescan;
    // A list holding itself twice, 40 times over, through the memo: 2^40 values if copied.
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for i in 0..40u8 {
        p.extend([b']', b'h', i, b'h', i, 0x86, b'a', b'q', i + 1]);
    }
    p.push(b'.');
    let e = prescan(&p).unwrap_err();
    assert!(e.contains("more than"), "{e}");
    // Nesting 100 one-tuples deep.
    let mut p = vec![0x80, 2, b'N'];
    p.extend(std::iter::repeat_n(0x85, 100));
    p.push(b'.');
    let e = prescan(&p).unwrap_err();
    assert!(e.contains("nest more than 64"), "{e}");
    // A string longer than the pickle, and an integer of 255 bytes.
    let e = prescan(&[0x80, 2, b'X', 255, 255, 255, 255, b'.']).unwrap_err();
    assert!(e.contains("ends inside a value"), "{e}");
    let e = prescan(&[0x80, 2, 0x8a, 255, b'.']).unwrap_err();
    assert!(e.contains("255 bytes"), "{e}");
    // REDUCE of builtins.eval.
    let mut p = b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.".to_vec();
    let e = prescan(&p).unwrap_err();
    assert!(e.contains("`builtins.eval`"), "{e}");
    p.truncate(5);
    assert!(prescan(&p).is_err());
}
