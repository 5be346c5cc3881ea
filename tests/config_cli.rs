//! The settings file as a user meets it: `xmoe-top config`, `--init`, defaults that the command
//! line overrides, and mistakes reported with the file and field.

use std::path::Path;
use std::process::{Command, Output};

/// Runs xmoe-top with its configuration directory inside `dir`, so no real user file is read.
fn xmoe(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(args)
        .current_dir(dir)
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env("HOME", dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn policy_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("policy "))
        .unwrap_or_else(|| panic!("no policy line in\n{out}"))
}

#[test]
fn settings_are_defaults_that_the_command_line_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("xdg/xmoe-top/config.toml");

    let o = xmoe(&["config"], d);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("no settings file"), "{out}");
    assert!(out.contains(&file.display().to_string()), "{out}");

    // --init writes the commented template, which changes nothing, and is never overwritten.
    let o = xmoe(&["config", "--init"], d);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("[defaults]")
    );
    let o = xmoe(&["config", "--init"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("already exists"), "{}", text(&o).1);

    let base = ["run", "--headless", "--tokens", "256"];
    let o = xmoe(&base, d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(policy_line(&out).contains("t=0.90"), "{out}");

    std::fs::write(
        &file,
        "[defaults]\nthreshold = \"0:0.6,3:0.95\"\ncapacity_factor = 2.0\n",
    )
    .unwrap();
    let o = xmoe(&base, d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("settings from"), "{err}");
    let line = policy_line(&out);
    assert!(line.contains("0.60") && line.contains("0.95"), "{line}");
    assert!(line.contains("capacity factor 2"), "{line}");

    // Any routing flag replaces all routing defaults (no capacity factor from the file).
    let mut args = base.to_vec();
    args.extend(["--threshold", "0.8"]);
    let (out, _) = text(&xmoe(&args, d));
    let line = policy_line(&out);
    assert!(line.contains("t=0.80 on all"), "{line}");
    assert!(line.contains("no capacity limit"), "{line}");

    // --no-config ignores the file; `config` shows which values come from it.
    let mut args = base.to_vec();
    args.push("--no-config");
    let (out, err) = text(&xmoe(&args, d));
    assert!(policy_line(&out).contains("t=0.90"), "{out}");
    assert!(!err.contains("settings from"), "{err}");
    let (out, _) = text(&xmoe(&["config"], d));
    assert!(
        out.lines().any(|l| l.starts_with("defaults.threshold")
            && l.contains("0:0.6,3:0.95")
            && l.contains("(settings file)")),
        "{out}"
    );
}

#[test]
fn a_bad_settings_file_names_itself_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (body, needle) in [
        (
            "[ui]\nfps = 900\n",
            "[ui] fps must be between 0.5 and 120, found 900",
        ),
        ("[ui]\ncolour = \"never\"\n", "unknown field `colour`"),
        (
            "[defaults]\npolicy = \"top2\"\n",
            "expected one of native, threshold, topk, dense",
        ),
        ("[defaults]\nthreshold = \"0:0.5,99:0.9\"\n", "99"),
        ("not toml at all", "bad.toml"),
    ] {
        std::fs::write(d.join("bad.toml"), body).unwrap();
        let o = xmoe(
            &[
                "run",
                "--headless",
                "--tokens",
                "64",
                "--config",
                "bad.toml",
            ],
            d,
        );
        let (_, err) = text(&o);
        assert!(
            matches!(o.status.code(), Some(2) | Some(3)),
            "{body}: {err}"
        );
        assert!(err.contains(needle), "{body}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = xmoe(&["run", "--headless", "--config", "missing.toml"], d);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o).1.contains("missing.toml"), "{}", text(&o).1);
}
