//! Reports, sweeps and traces end to end: a real sweep on a small random model, its reports
//! validated against the schema and parsed back, write safety, and traces read back.

mod common;

use std::path::Path;

use common::fixtures::example_snapshot;
use xmoe_top::model::format::StoreDtype;
use xmoe_top::model::forward::{Model, RoutingConfig};
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::profiling::snapshot::WorkloadKind;
use xmoe_top::report::{
    ReportData, ReportFormat, TraceOptions, TraceReader, TraceWriter, export, write_report,
};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::session::sweep::{SweepSpec, run_sweep, text_batches};

const TEXT: &[u8] = b"Threshold routing lets each token take as many experts as it needs: \
the smallest set whose probabilities reach t. Easy tokens take one expert; hard ones take many. \
The quick brown fox jumps over the lazy dog, 0123456789 times, while the experts keep count.";

fn small_model(dir: &Path) -> Model {
    let cfg = common::small_config();
    let path = common::write_random(dir, "m.safetensors", &cfg, 11, false, StoreDtype::F32);
    Model::load(&path, &candle_core::Device::Cpu).unwrap()
}

fn sweep_report(dir: &Path) -> ReportData {
    let model = small_model(dir);
    let batches = text_batches(TEXT, 2, 24, 144).unwrap();
    let spec = SweepSpec {
        renormalize: None,
        reference: None,
        batch_bytes: None,
        thresholds: vec![0.3, 0.5, 0.7, 0.8, 0.95, 1.0],
        top_k: vec![1, 2, 4],
        top_k_baseline: None,
        capacity_factor: None,
        source: "test text".into(),
        source_size: TEXT.len(),
        device: "CPU".into(),
        repeats: 3,
    };
    let mut calls = 0;
    let run = run_sweep(&model, &batches, 2, &spec, &mut |_, _| calls += 1).unwrap();
    // Every pass of every point (the reference included) runs once per repeat.
    assert_eq!(calls, 3 * batches.len() * run.result.points.len());
    assert_eq!(run.result.repeats, 3);
    for p in &run.result.points {
        assert_eq!(p.tokens_per_second_repeats.len(), 3, "{}", p.label);
        let (lo, hi) = p.tokens_per_second_range();
        assert!(lo > 0.0 && lo <= p.tokens_per_second && p.tokens_per_second <= hi);
        let mut sorted = p.tokens_per_second_repeats.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(p.tokens_per_second, sorted[1], "{}: the median", p.label);
    }
    ReportData::new(run.snapshot, Some(run.result))
}

fn schema() -> serde_json::Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/report.schema.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_valid(json: &str) {
    let validator = jsonschema::validator_for(&schema()).expect("the schema compiles");
    let instance: serde_json::Value = serde_json::from_str(json).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "schema violations:\n{}",
        errors.join("\n")
    );
}

#[test]
fn sweep_is_monotone_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let data = sweep_report(dir.path());
    let sw = data.sweep.as_ref().unwrap();
    // 6 thresholds + default 0.9 + 3 top-k + dense.
    assert_eq!(sw.points.len(), 11);
    let thr: Vec<_> = sw
        .points
        .iter()
        .filter(|p| matches!(p.policy, RoutingPolicy::Threshold { .. }))
        .collect();
    assert_eq!(thr.len(), 7);
    for w in thr.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(
            b.mean_experts_per_token >= a.mean_experts_per_token,
            "{} -> {}",
            a.label,
            b.label
        );
        for (x, y) in a
            .layer_mean_experts_per_token
            .iter()
            .zip(&b.layer_mean_experts_per_token)
        {
            assert!(y >= x, "per layer {} -> {}", a.label, b.label);
        }
        assert!(b.moe_flops_fraction_of_all_experts >= a.moe_flops_fraction_of_all_experts);
    }
    // The default threshold (0.9) was added and marked, and its snapshot is the report's.
    let def = sw.default_point().unwrap();
    assert_eq!(def.policy, RoutingPolicy::threshold(0.9));
    assert_eq!(
        data.snapshot.policy.layers[0].policy,
        RoutingPolicy::threshold(0.9)
    );
    assert_eq!(
        data.snapshot.epoch.cumulative.mean_experts_per_token,
        def.mean_experts_per_token
    );
    // Top-k takes exactly k; Dense takes all and is its own reference.
    for p in &sw.points {
        match p.policy {
            RoutingPolicy::TopK { k, .. } => {
                assert!((p.mean_experts_per_token - k as f64).abs() < 1e-12)
            }
            RoutingPolicy::Dense => {
                assert!((p.mean_experts_per_token - 8.0).abs() < 1e-12);
                assert!((p.moe_flops_fraction_of_all_experts - 1.0).abs() < 1e-12);
                assert_eq!(p.delta_bits_per_byte_vs_reference, Some(0.0));
                assert!(p.is_reference);
            }
            RoutingPolicy::Threshold { .. } => {}
        }
        assert_eq!(p.tokens, sw.tokens_per_point);
        assert!(p.bits_per_byte.unwrap() > 0.0);
        assert!(p.delta_bits_per_byte_vs_reference.is_some());
        assert!(p.tokens_per_second > 0.0);
        assert!(p.token_latency_p99_us >= p.token_latency_p50_us);
    }
    // t = 1.0 computes the same experts as Dense, so same quality up to rounding.
    let t1 = thr.last().unwrap();
    assert!(t1.delta_bits_per_byte_vs_reference.unwrap().abs() < 1e-3);
    // Compute saved vs top-k is consistent with the FLOPs fraction.
    let k4 = sw
        .points
        .iter()
        .find(|p| p.label == "top-4")
        .expect("top-4 point");
    assert_eq!(sw.top_k_baseline, 4);
    assert!(k4.moe_saved_vs_top_k_pct.abs() < 1e-9);
}

#[test]
fn reports_validate_and_parse_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = sweep_report(dir.path());
    // JSON of a real sweep report and of example session snapshots, against the schema.
    let json = ReportFormat::Json.render(&data);
    assert_valid(&json);
    let back: ReportData = serde_json::from_str(&json).unwrap();
    assert_eq!(back.sweep, data.sweep);
    for (kind, gpu) in [(WorkloadKind::Eval, true), (WorkloadKind::Generate, false)] {
        let r = ReportData::new(example_snapshot(kind, 16, gpu), None);
        assert_valid(&ReportFormat::Json.render(&r));
    }
    // A report that breaks the schema is caught (the test can fail).
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["snapshot"]["epoch"]["cumulative"]["layers"][0]["extra"] = 1.into();
    let validator = jsonschema::validator_for(&schema()).unwrap();
    assert!(!validator.is_valid(&v));

    // CSV: parsed back with a CSV reader; rows match the snapshot.
    let csv_text = ReportFormat::Csv.render(&data);
    let mut rd = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, xmoe_top::report::csv::HEADER);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
    let count = |t: &str| rows.iter().filter(|r| &r[0] == t).count();
    let layers = &data.snapshot.epoch.cumulative.layers;
    let sw = data.sweep.as_ref().unwrap();
    assert_eq!(count("expert"), layers.len() * 8);
    assert_eq!(count("layer"), layers.len());
    assert_eq!(count("sweep"), sw.points.len());
    assert_eq!(count("sweep_layer"), sw.points.len() * layers.len());
    for r in rows.iter().filter(|r| &r[0] == "expert") {
        let slot: usize = r[col("moe_slot")].parse().unwrap();
        let e: usize = r[col("expert")].parse().unwrap();
        let share: f64 = r[col("token_share")].parse().unwrap();
        assert_eq!(share, layers[slot].expert_token_share[e]);
    }
    for (r, p) in rows.iter().filter(|r| &r[0] == "sweep").zip(&sw.points) {
        assert_eq!(&r[col("policy")], p.label);
        let m: f64 = r[col("mean_experts_per_token")].parse().unwrap();
        assert_eq!(m, p.mean_experts_per_token);
        assert_eq!(
            r[col("expert")].len(),
            0,
            "cells that do not apply are empty"
        );
    }

    // HTML: parsed as HTML; its SVG figures are there; nothing is fetched.
    let html = ReportFormat::Html.render(&data);
    let dom = tl::parse(&html, tl::ParserOptions::default()).unwrap();
    let parser = dom.parser();
    let svgs: Vec<(String, String)> = dom
        .query_selector("svg")
        .unwrap()
        .map(|h| {
            let tag = h.get(parser).unwrap().as_tag().unwrap();
            let class = tag
                .attributes()
                .get("class")
                .flatten()
                .map(|c| c.as_utf8_str().into_owned())
                .unwrap_or_default();
            (class, tag.inner_html(parser))
        })
        .collect();
    let of = |c: &str| svgs.iter().filter(|s| s.0 == c).collect::<Vec<_>>();
    let heat = of("heatmap");
    assert_eq!(heat.len(), 1);
    // One cell per (layer, expert) plus the colour legend.
    assert_eq!(heat[0].1.matches("<title>layer").count(), layers.len() * 8);
    assert_eq!(of("histogram").len(), 3);
    assert_eq!(of("ept").len(), layers.len());
    let sweep_svg = of("sweep");
    assert_eq!(sweep_svg.len(), 1);
    assert!(sweep_svg[0].1.contains("default-marker"));
    assert!(sweep_svg[0].1.contains("<polyline"));
    let table = dom
        .query_selector("table.sweep-table")
        .unwrap()
        .next()
        .expect("the sweep table")
        .get(parser)
        .unwrap()
        .inner_html(parser);
    assert_eq!(table.matches("<tr").count(), sw.points.len() + 1);
    for forbidden in ["<script", "<link", " src=", "href=", "url(", "@import"] {
        assert!(!html.contains(forbidden), "HTML contains {forbidden}");
    }

    // Markdown: the tables are there.
    let md = ReportFormat::Markdown.render(&data);
    assert!(md.contains("## Threshold sweep"));
    assert!(md.contains("| t=0.9 * |"));
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| top-")).count(),
        3,
        "one row per top-k point"
    );
}

#[test]
fn never_overwrite_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = ReportData::new(example_snapshot(WorkloadKind::Eval, 8, false), None);
    let path = dir.path().join("r.html");
    write_report(&data, &path, None, false).unwrap();
    let first = std::fs::read(&path).unwrap();
    std::fs::write(&path, b"user's own file").unwrap();
    let e = write_report(&data, &path, None, false).unwrap_err();
    assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    assert_eq!(std::fs::read(&path).unwrap(), b"user's own file");
    write_report(&data, &path, None, true).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), first);
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // Missing directory, a file where a directory should be, an unwritable place, unknown format.
    let e = write_report(&data, &dir.path().join("no/such/r.json"), None, false).unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    let e = write_report(&data, &path.join("r.json"), None, false).unwrap_err();
    assert!(format!("{e:#}").contains("is not a directory"), "{e:#}");
    if Path::new("/proc/self").exists() {
        let e = write_report(&data, Path::new("/proc/xmoe-report.json"), None, false).unwrap_err();
        assert!(format!("{e:#}").contains("cannot write"), "{e:#}");
    }
    let e = write_report(&data, &dir.path().join("r.txt"), None, false).unwrap_err();
    assert!(format!("{e:#}").contains("--format"), "{e:#}");
    write_report(
        &data,
        &dir.path().join("r.txt"),
        Some(ReportFormat::Markdown),
        false,
    )
    .unwrap();
}

#[test]
fn export_writes_timestamped_files() {
    let dir = tempfile::tempdir().unwrap();
    let snap = example_snapshot(WorkloadKind::Generate, 8, true);
    let paths = export(
        &snap,
        dir.path(),
        &[ReportFormat::Html, ReportFormat::Json],
        false,
    )
    .unwrap();
    assert_eq!(paths.len(), 2);
    for (p, ext) in paths.iter().zip(["html", "json"]) {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("xmoe-top-report-2"), "{name}");
        assert!(name.ends_with(ext));
        assert!(p.exists());
    }
    assert_valid(&std::fs::read_to_string(&paths[1]).unwrap());
    // Exporting again within the same second does not fail and does not overwrite.
    let data = ReportData::new(snap.clone(), None);
    let a = xmoe_top::report::export_data(&data, dir.path(), &[ReportFormat::Json], false).unwrap();
    let b = xmoe_top::report::export_data(&data, dir.path(), &[ReportFormat::Json], false).unwrap();
    assert_ne!(a, b);
    let stem = |p: &std::path::PathBuf| p.file_stem().unwrap().to_str().unwrap().to_string();
    // Same timestamp: the second name is the first's base with a counter.
    let base = format!(
        "xmoe-top-report-{}",
        xmoe_top::report::file_timestamp(data.created_unix_ms)
    );
    assert!(stem(&b[0]).starts_with(&format!("{base}-")), "{a:?} {b:?}");
    assert!(a[0].exists() && b[0].exists());
    let e = export(
        &snap,
        &dir.path().join("missing"),
        &[ReportFormat::Json],
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not an existing directory"));
}

#[test]
fn traces_stream_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let cfg = model.config().clone();
    let routing = RoutingConfig::new(
        &[RoutingPolicy::threshold(0.8); 2],
        Some(0.5),
        cfg.n_experts,
    )
    .unwrap();
    let path = dir.path().join("trace.jsonl");
    let mut w = TraceWriter::create(&path, &cfg, TraceOptions { probs: true }, false).unwrap();
    let mut trace = ForwardTrace::default();
    let mut passes = Vec::new();
    for b in text_batches(TEXT, 2, 16, 64).unwrap() {
        let tokens: Vec<u32> = b.chunks_exact(17).flat_map(|w| w[..16].to_vec()).collect();
        model
            .forward(&tokens, 2, &routing, None, &mut trace)
            .unwrap();
        w.write_pass(&tokens, &trace).unwrap();
        passes.push((tokens, trace.clone()));
    }
    assert!(!path.exists(), "the trace appears only when finished");
    assert_eq!(w.records(), 64);
    assert_eq!(w.finish().unwrap(), path);

    let reader = TraceReader::open(&path).unwrap();
    assert_eq!(reader.header().moe_layers, vec![0, 1]);
    assert!(reader.header().probs);
    let records: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(records.len(), 64);
    let mut dropped = 0;
    for r in &records {
        let (tokens, t) = &passes[r.pass as usize];
        let i = r.seq * 16 + r.pos;
        assert_eq!(r.token, tokens[i]);
        assert_eq!(r.byte, Some(tokens[i] as u8));
        for (l, m) in r.layers.iter().zip(&t.moe) {
            assert_eq!(l.layer, m.layer);
            let want: Vec<(u16, f32)> = m
                .routing
                .choices(i)
                .map(|(e, w, _)| (e as u16, w))
                .collect();
            let got: Vec<(u16, f32)> = l
                .experts
                .iter()
                .copied()
                .zip(l.weights.iter().copied())
                .collect();
            assert_eq!(got, want);
            let probs = l.probs.as_ref().unwrap();
            assert_eq!(probs.len(), 8);
            assert_eq!(probs[l.experts[0] as usize], l.weights[0]);
            dropped += l.dropped.len();
        }
    }
    let want_dropped: usize = passes
        .iter()
        .flat_map(|(_, t)| t.moe.iter().map(|m| m.routing.dropped_pairs))
        .sum();
    assert_eq!(dropped, want_dropped);
    assert!(dropped > 0, "capacity 0.5 drops pairs");

    // An existing trace is not replaced; a non-trace file is refused by the reader.
    let e = TraceWriter::create(&path, &cfg, TraceOptions::default(), false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("already exists"));
    let e = TraceReader::new(&b"{\"format\":\"other\"}\n"[..])
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("not a trace header")
            || e.to_string().contains("not an xmoe-top trace")
    );
}
