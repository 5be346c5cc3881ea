//! The crate's import layering, enforced: each top-level module may use only the modules listed
//! for it below. Reading `crate::` paths from the source is crude but cheap, and it catches the
//! arrow that runs the wrong way the moment it is written (docs/architecture.md draws the layers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and the modules it may import. A module not listed here fails
/// the test: place a new module deliberately.
const ALLOWED: &[(&str, &[&str])] = &[
    // Ground floor: pure code that imports nothing of the crate (but file kinds).
    ("routing", &[]),
    ("units", &[]),
    ("atomic_file", &["input_file"]),
    ("signals", &[]),
    ("input_file", &[]),
    // The CPU expert kernel: numerics over routing's expert groups.
    ("kernel", &["routing"]),
    // The model: format, loading, blocks, forward, and the trace it fills.
    (
        "model",
        &["kernel", "routing", "atomic_file", "units", "input_file"],
    ),
    // Statistics and snapshots over traces.
    ("profiling", &["model", "routing", "units"]),
    ("gpu", &["profiling", "units"]),
    // Routing recorded by serving engines: readers and load figures, beside profiling.
    ("import", &["routing", "units", "input_file"]),
    ("workload", &["model", "profiling", "routing", "input_file"]),
    ("embedded", &["model", "workload"]),
    // The model thread, its controls, and batch drivers (the sweep).
    (
        "session",
        &["model", "routing", "profiling", "workload", "gpu", "units"],
    ),
    // Rendering only: snapshots and statistics in, files out.
    (
        "report",
        &[
            "profiling",
            "routing",
            "model",
            "units",
            "atomic_file",
            "input_file",
            "import",
        ],
    ),
    // Recordings of sessions (snapshots and the routing trace) and their reader.
    (
        "record",
        &[
            "profiling",
            "model",
            "report",
            "routing",
            "units",
            "atomic_file",
            "input_file",
        ],
    ),
    (
        "tui",
        &[
            "record",
            "session",
            "profiling",
            "routing",
            "model",
            "workload",
            "gpu",
            "units",
            "signals",
            "import",
        ],
    ),
    (
        "train",
        &[
            "model",
            "routing",
            "kernel",
            "profiling",
            "units",
            "atomic_file",
        ],
    ),
    // Dense to XMoE: reads a dense model, calibrates, trains routers (candle-nn), writes a model.
    ("moefy", &["model", "routing", "workload", "kernel"]),
    (
        "inspect",
        &["model", "routing", "profiling", "units", "embedded"],
    ),
    (
        "bench",
        &[
            "model",
            "kernel",
            "routing",
            "profiling",
            "session",
            "workload",
            "embedded",
            "units",
        ],
    ),
    // The command line assembles everything.
    (
        "cli",
        &[
            "record",
            "bench",
            "embedded",
            "inspect",
            "model",
            "moefy",
            "profiling",
            "report",
            "routing",
            "session",
            "train",
            "tui",
            "workload",
            "gpu",
            "kernel",
            "units",
            "atomic_file",
            "signals",
            "input_file",
            "import",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Names `X` of every `crate::X` path in `text`, with the line each appears on.
fn crate_imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            // `xmoe_top::crate::` cannot occur; `$crate::` in macros is not a module path.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut unlisted = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        // The crate root and the binaries sit above every module.
        if module == "lib" || module == "main" || module == "bin" {
            continue;
        }
        let Some(ok) = allowed.get(module.as_str()) else {
            unlisted.insert(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, dep) in crate_imports(&text) {
            if dep != module && !ok.contains(dep.as_str()) {
                violations.push(format!("{}:{line}: {module} imports {dep}", rel.display()));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "modules missing from the layering table in tests/layering.rs: {unlisted:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layering (tests/layering.rs, docs/architecture.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_imports_and_ignores_comments() {
    let text = "use crate::model::Model;\n// crate::tui in a comment\nlet x = crate::routing::route;\nmacro $crate::x";
    let found: Vec<String> = crate_imports(text).into_iter().map(|(_, m)| m).collect();
    assert_eq!(found, ["model", "routing"]);
}
