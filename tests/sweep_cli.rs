//! `xmoe-top sweep` and `xmoe-top report` as a user runs them: output, files, exit codes, messages.

#[path = "support/cli.rs"]
mod cli;
mod common;

use cli::{text, xmoe};
use xmoe_top::model::format::StoreDtype;

#[test]
fn sweep_prints_a_table_and_writes_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write_random(
        d,
        "m.safetensors",
        &common::small_config(),
        5,
        false,
        StoreDtype::F16,
    );
    let corpus: Vec<u8> = b"In the beginning the experts were many and small. ".repeat(20);
    std::fs::write(d.join("t.txt"), &corpus).unwrap();
    let base = [
        "sweep",
        "m.safetensors",
        "--text",
        "t.txt",
        "--tokens",
        "96",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--thresholds",
        "0.5:1.0:0.25",
        "--with-topk",
        "1,2",
        "--device",
        "cpu",
    ];
    let mut args = base.to_vec();
    args.extend(["--report", "s.json"]);
    let o = xmoe(&args, d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // 0.5, 0.75, 1.0, the default 0.9, top-1, top-2, dense.
    for label in [
        "t=0.5 ", "t=0.75 ", "t=0.9 *", "t=1 ", "top-1 ", "top-2 ", "dense ",
    ] {
        assert!(out.contains(label), "{label} missing in\n{out}");
    }
    assert!(err.contains("wrote s.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
    assert_eq!(json["sweep"]["points"].as_array().unwrap().len(), 7);
    assert_eq!(json["command_line"][1], "sweep");
    // Timings are medians of 3 repeats by default, and the table says so with the spread.
    assert_eq!(json["sweep"]["repeats"], 3);
    assert!(out.contains("timings: median of 3 repeats"), "{out}");
    assert!(out.contains("tok/s (min-max)"), "{out}");
    for p in json["sweep"]["points"].as_array().unwrap() {
        assert_eq!(p["tokens_per_second_repeats"].as_array().unwrap().len(), 3);
    }

    // The same report as HTML and CSV through `report`, and --format with an odd extension.
    for (out_name, extra) in [("s.html", None), ("s.csv", None), ("s.txt", Some("md"))] {
        let mut a = vec!["report", "s.json", out_name];
        if let Some(f) = extra {
            a.extend(["--format", f]);
        }
        let o = xmoe(&a, d);
        assert!(o.status.success(), "{}", text(&o).1);
    }
    assert!(
        std::fs::read_to_string(d.join("s.html"))
            .unwrap()
            .contains("<svg class=\"sweep\"")
    );
    assert!(
        std::fs::read_to_string(d.join("s.html"))
            .unwrap()
            .contains("<svg class=\"sweep-throughput\"")
    );
    assert!(
        std::fs::read_to_string(d.join("s.txt"))
            .unwrap()
            .contains("## Threshold sweep")
    );

    // An existing report is refused before the sweep runs, and kept.
    let before = std::fs::read(d.join("s.json")).unwrap();
    let o = xmoe(&args, d);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("already exists (use --force"),
        "{}",
        text(&o).1
    );
    assert!(text(&o).0.is_empty(), "nothing ran");
    assert_eq!(std::fs::read(d.join("s.json")).unwrap(), before);
    args.push("--force");
    assert!(xmoe(&args, d).status.success());

    // Clear usage errors with exit code 2.
    for (extra, needle) in [
        (vec!["--thresholds", "0:1:0.1"], "outside (0, 1]"),
        (vec!["--with-topk", "9"], "1..=8"),
        (vec!["--report", "missing-dir/r.html"], "does not exist"),
        (vec!["--report", "r.xml"], "--format"),
        (vec!["--seq-len", "65"], "--seq-len"),
    ] {
        let mut a = base.to_vec();
        replace_flag(&mut a, &extra);
        let o = xmoe(&a, d);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

/// Sets `flag value` in `args`, replacing an existing value of the same flag.
fn replace_flag<'a>(args: &mut Vec<&'a str>, flag_value: &[&'a str]) {
    let (flag, value) = (flag_value[0], flag_value[1]);
    match args.iter().position(|a| *a == flag) {
        Some(i) => args[i + 1] = value,
        None => args.extend([flag, value]),
    }
}

#[test]
fn report_refuses_an_inconsistent_json_report_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut data = xmoe_top::report::ReportData::new(
        common::fixtures::example_snapshot(
            xmoe_top::profiling::snapshot::WorkloadKind::Eval,
            8,
            false,
        ),
        None,
    );
    // The panic this guards against: buckets with counts but no edges.
    data.snapshot
        .epoch
        .histograms
        .token_latency_us
        .edges
        .clear();
    std::fs::write(d.join("bad.json"), xmoe_top::report::json::render(&data)).unwrap();
    let o = xmoe(&["report", "bad.json", "out.html"], d);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.json")
            && err.contains("snapshot.epoch.histograms.token_latency_us.edges: 0 edges"),
        "{err}"
    );
    assert!(!d.join("out.html").exists());
}

#[test]
fn numeric_options_out_of_range_are_usage_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    for (args, range) in [
        (
            &["sweep", "--batch", "100000000", "--tokens", "10"][..],
            "1..=4096",
        ),
        (&["sweep", "--tokens", "0"][..], "1..=1000000000"),
        (&["sweep", "--repeats", "0"][..], "1..=100"),
        (&["sweep", "--repeats", "101"][..], "1..=100"),
        (
            &["run", "--headless", "--tokens", "0"][..],
            "1..=1000000000000",
        ),
    ] {
        let out = xmoe(args, dir.path());
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(range), "{args:?}: {err}");
    }
    let out = xmoe(&["run", "--headless", "--seconds", "1e300"], dir.path());
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--seconds must be in (0, 1e7], found 1e300"),
        "{err}"
    );
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("sweep.html");
    let out = xmoe(
        &[
            "sweep",
            "--tokens",
            "100000",
            "--report",
            missing.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (table, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // Refused up front: no sweep ran, so no table was printed.
    assert!(table.is_empty(), "{table}");
    let out = xmoe(
        &[
            "run",
            "--headless",
            "--report",
            "/dev/null",
            "--format",
            "json",
            "--force",
        ],
        dir.path(),
    );
    let (_, err) = text(&out);
    assert!(
        err.contains("/dev/null is a character device, not a regular file"),
        "{err}"
    );
}
