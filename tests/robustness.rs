//! Bad input of every kind, as a hostile user would try it, against the real program: each case
//! must end with a clear message and the documented exit status (2 usage, 3 bad input file,
//! 1 runtime), never a panic, an abort or a hang. The table in `docs/robustness.md` is generated
//! from [`CASES`] (a test fails when they drift apart), so the doc lists exactly what is checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One bad input: where, what, the arguments (built in a scratch directory that is also the
/// working directory), and what the user must see.
struct Case {
    area: &'static str,
    input: &'static str,
    args: fn(&Path) -> Vec<String>,
    code: i32,
    says: &'static str,
}

fn repo(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn embedded() -> String {
    repo("assets/xmoe-kjv.safetensors")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// `inspect FILE`, the cheapest command that opens a model fully.
fn inspect(path: String) -> Vec<String> {
    vec!["inspect".into(), path]
}

/// `run --headless` on `model` for a few tokens.
fn run_on(model: String, extra: &[&str]) -> Vec<String> {
    let mut v = run_embedded(extra);
    v.push(model);
    v
}

/// `run --headless` on the embedded model for a few tokens (unless `extra` says otherwise).
fn run_embedded(extra: &[&str]) -> Vec<String> {
    let mut v = s(&["run", "--headless"]);
    for (flag, default) in [("--tokens", "64"), ("--threads", "1")] {
        if !extra.contains(&flag) {
            v.extend(s(&[flag, default]));
        }
    }
    v.extend(s(extra));
    v
}

/// The embedded model's bytes split into (header JSON, data).
fn embedded_parts() -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(embedded()).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// The name of the first tensor of a safetensors header whose name passes `pred`.
fn tensor_named(h: &serde_json::Value, pred: impl Fn(&str) -> bool) -> String {
    h.as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__" && pred(k))
        .unwrap()
        .clone()
}

fn first_tensor(h: &serde_json::Value) -> String {
    tensor_named(h, |_| true)
}

fn router_tensor(h: &serde_json::Value) -> String {
    tensor_named(h, |k| k.contains("router"))
}

/// The embedded model with `edit` applied to its header.
fn embedded_with(dir: &Path, edit: fn(&mut serde_json::Value)) -> String {
    let (mut h, data) = embedded_parts();
    edit(&mut h);
    write(dir, "m.safetensors", &safetensors(&h, &data))
}

/// The embedded model with `edit` applied to its configuration (metadata JSON).
fn embedded_config(dir: &Path, edit: fn(&mut serde_json::Value)) -> String {
    let (mut h, data) = embedded_parts();
    let meta = h["__metadata__"].as_object_mut().unwrap();
    let key = meta
        .keys()
        .find(|k| meta[*k].as_str().is_some_and(|v| v.starts_with('{')))
        .unwrap()
        .clone();
    let mut cfg: serde_json::Value = serde_json::from_str(meta[&key].as_str().unwrap()).unwrap();
    edit(&mut cfg);
    meta[&key] = serde_json::Value::String(cfg.to_string());
    write(dir, "m.safetensors", &safetensors(&h, &data))
}

/// A copy of the small OLMoE fixture checkpoint in `dir/ck`.
fn olmoe(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/olmoe/per_expert");
    let ck = dir.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    ck
}

/// The OLMoE fixture with `edit` applied to its config.json.
fn olmoe_config(dir: &Path, edit: fn(&mut serde_json::Value)) -> String {
    let ck = olmoe(dir);
    let p = ck.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    ck.to_string_lossy().into_owned()
}

/// The OLMoE fixture with `edit` applied to its safetensors header.
fn olmoe_header(dir: &Path, edit: fn(&mut serde_json::Value)) -> String {
    let ck = olmoe(dir);
    let p = ck.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    std::fs::write(&p, safetensors(&h, &bytes[8 + n..])).unwrap();
    ck.to_string_lossy().into_owned()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A saved report of a short headless run, in `dir/r.json`.
fn saved_report(dir: &Path) -> PathBuf {
    let p = dir.join("r.json");
    let o = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(["run", "--headless", "--tokens", "256", "--threads", "1"])
        .arg("--report")
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    p
}

const CASES: &[Case] = &[
    // --- model files (the project's own format)
    Case {
        area: "model file",
        input: "missing file",
        args: |_| inspect("no-such.safetensors".into()),
        code: 3,
        says: "no-such.safetensors: cannot open",
    },
    Case {
        area: "model file",
        input: "empty file",
        args: |d| inspect(write(d, "e.safetensors", b"")),
        code: 3,
        says: "is empty",
    },
    Case {
        area: "model file",
        input: "3 bytes (truncated before the header length)",
        args: |d| inspect(write(d, "t.safetensors", b"abc")),
        code: 3,
        says: "truncated: expected at least 8 bytes",
    },
    Case {
        area: "model file",
        input: "header length larger than the file",
        args: |d| {
            let mut b = (1u64 << 40).to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            inspect(write(d, "h.safetensors", &b))
        },
        code: 3,
        says: "truncated",
    },
    Case {
        area: "model file",
        input: "header that is not JSON",
        args: |d| {
            let mut b = 4u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{{{{");
            inspect(write(d, "j.safetensors", &b))
        },
        code: 3,
        says: "header",
    },
    Case {
        area: "model file",
        input: "tensor offsets beyond the data",
        args: |d| {
            inspect(embedded_with(d, |h| {
                let name = first_tensor(h);
                h[&name]["data_offsets"] = serde_json::json!([0, 1u64 << 40]);
            }))
        },
        code: 3,
        says: "m.safetensors",
    },
    Case {
        area: "model file",
        input: "a tensor with an unknown dtype",
        args: |d| {
            inspect(embedded_with(d, |h| {
                let name = first_tensor(h);
                h[&name]["dtype"] = serde_json::json!("Q9");
            }))
        },
        code: 3,
        says: "m.safetensors",
    },
    Case {
        area: "model file",
        input: "a required tensor missing",
        args: |d| {
            inspect(embedded_with(d, |h| {
                let name = router_tensor(h);
                let entry = h.as_object_mut().unwrap().remove(&name).unwrap();
                h[format!("{name}.renamed")] = entry;
            }))
        },
        code: 3,
        says: "router",
    },
    Case {
        area: "model file",
        input: "a tensor with the wrong shape (same byte count)",
        args: |d| {
            inspect(embedded_with(d, |h| {
                let name = router_tensor(h);
                let shape: Vec<u64> = serde_json::from_value(h[&name]["shape"].clone()).unwrap();
                h[&name]["shape"] = serde_json::json!([shape[0] * shape[1]]);
            }))
        },
        code: 3,
        says: "router",
    },
    Case {
        area: "model file",
        input: "a plain safetensors file with no configuration",
        args: |d| {
            inspect(write(
                d,
                "plain.safetensors",
                &safetensors(
                    &serde_json::json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
                    &[0; 4],
                ),
            ))
        },
        code: 3,
        says: "config",
    },
    Case {
        area: "model file",
        input: "configuration JSON that does not parse",
        args: |d| {
            let (mut h, data) = embedded_parts();
            let meta = h["__metadata__"].as_object_mut().unwrap();
            for v in meta.values_mut() {
                if v.as_str().is_some_and(|x| x.starts_with('{')) {
                    *v = serde_json::Value::String("{not json".into());
                }
            }
            inspect(write(d, "m.safetensors", &safetensors(&h, &data)))
        },
        code: 3,
        says: "m.safetensors",
    },
    Case {
        area: "model file",
        input: "configuration with 0 experts",
        args: |d| inspect(embedded_config(d, |c| c["n_experts"] = 0.into())),
        code: 3,
        says: "n_experts",
    },
    Case {
        area: "model file",
        input: "configuration with d_model = 10^12 (would allocate terabytes)",
        args: |d| {
            inspect(embedded_config(d, |c| {
                c["d_model"] = 1_000_000_000_000u64.into()
            }))
        },
        code: 3,
        says: "d_model",
    },
    Case {
        area: "model file",
        input: "configuration with 10^9 layers",
        args: |d| {
            inspect(embedded_config(d, |c| {
                c["n_layers"] = 1_000_000_000u64.into()
            }))
        },
        code: 3,
        says: "n_layers",
    },
    Case {
        area: "model file",
        input: "configuration with a negative rotary base",
        args: |d| {
            inspect(embedded_config(d, |c| {
                c["positions"] = "rope".into();
                c["rope_theta"] = (-1.0).into();
            }))
        },
        code: 3,
        says: "rope",
    },
    Case {
        area: "model file",
        input: "a directory named like a model",
        args: |d| {
            std::fs::create_dir(d.join("dir.safetensors")).unwrap();
            inspect("dir.safetensors".into())
        },
        code: 3,
        says: "dir.safetensors",
    },
    Case {
        area: "model file",
        input: "a FIFO named like a model (would block)",
        args: |d| {
            mkfifo(&d.join("f.safetensors"));
            inspect("f.safetensors".into())
        },
        code: 3,
        says: "is a FIFO (named pipe), not a .safetensors file",
    },
    Case {
        area: "model file",
        input: "/dev/zero as a model",
        args: |_| inspect("/dev/zero".into()),
        code: 3,
        says: "is a character device",
    },
    Case {
        area: "model file",
        input: "a NaN in the weights",
        args: |d| {
            let (h, mut data) = embedded_parts();
            let nan = f32::NAN.to_le_bytes();
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&nan);
            }
            run_on(write(d, "nan.safetensors", &safetensors(&h, &data)), &[])
        },
        code: 3,
        says: "has a non-finite value (NaN) at flat index",
    },
    Case {
        area: "model file",
        input: "weights so large that activations overflow to NaN",
        args: |d| {
            let (h, mut data) = embedded_parts();
            let big = 1e30f32.to_le_bytes();
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&big);
            }
            run_on(
                write(d, "big.safetensors", &safetensors(&h, &data)),
                &["--text", "big.safetensors"],
            )
        },
        code: 1,
        says: "is not finite (NaN)",
    },
    // --- Hugging Face checkpoints
    Case {
        area: "HF checkpoint",
        input: "config.json that is not JSON",
        args: |d| {
            let ck = olmoe(d);
            std::fs::write(ck.join("config.json"), b"{\"model_type\": ").unwrap();
            inspect(ck.to_string_lossy().into_owned())
        },
        code: 3,
        says: "config.json",
    },
    Case {
        area: "HF checkpoint",
        input: "an unsupported model_type",
        args: |d| {
            inspect(olmoe_config(d, |c| {
                c["model_type"] = "bert".into();
                c["architectures"] = serde_json::json!(["BertModel"]);
            }))
        },
        code: 3,
        says: "bert",
    },
    Case {
        area: "HF checkpoint",
        input: "a required config field missing (hidden_size)",
        args: |d| {
            inspect(olmoe_config(d, |c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            }))
        },
        code: 3,
        says: "hidden_size",
    },
    Case {
        area: "HF checkpoint",
        input: "num_experts_per_tok larger than num_experts",
        args: |d| inspect(olmoe_config(d, |c| c["num_experts_per_tok"] = 9.into())),
        code: 3,
        says: "num_experts_per_tok",
    },
    Case {
        area: "HF checkpoint",
        input: "num_hidden_layers = 10^9",
        args: |d| {
            inspect(olmoe_config(d, |c| {
                c["num_hidden_layers"] = 1_000_000_000u64.into()
            }))
        },
        code: 3,
        says: "num_hidden_layers",
    },
    Case {
        area: "HF checkpoint",
        input: "vocab_size = 10^12",
        args: |d| {
            inspect(olmoe_config(d, |c| {
                c["vocab_size"] = 1_000_000_000_000u64.into()
            }))
        },
        code: 3,
        says: "vocab_size",
    },
    Case {
        area: "HF checkpoint",
        input: "hidden_size not divisible by the heads",
        args: |d| inspect(olmoe_config(d, |c| c["num_attention_heads"] = 5.into())),
        code: 3,
        says: "num_attention_heads",
    },
    Case {
        area: "HF checkpoint",
        input: "a string where a number belongs",
        args: |d| inspect(olmoe_config(d, |c| c["num_experts"] = "eight".into())),
        code: 3,
        says: "num_experts",
    },
    Case {
        area: "HF checkpoint",
        input: "an index naming a shard that does not exist",
        args: |d| {
            let ck = olmoe(d);
            std::fs::rename(ck.join("model.safetensors"), ck.join("a.safetensors")).unwrap();
            std::fs::write(
                ck.join("model.safetensors.index.json"),
                br#"{"weight_map": {"model.embed_tokens.weight": "missing-00001.safetensors"}}"#,
            )
            .unwrap();
            inspect(ck.to_string_lossy().into_owned())
        },
        code: 3,
        says: "missing-00001.safetensors",
    },
    Case {
        area: "HF checkpoint",
        input: "an index whose weight_map is not an object",
        args: |d| {
            let ck = olmoe(d);
            std::fs::write(
                ck.join("model.safetensors.index.json"),
                br#"{"weight_map": 7}"#,
            )
            .unwrap();
            inspect(ck.to_string_lossy().into_owned())
        },
        code: 3,
        says: "weight_map",
    },
    Case {
        area: "HF checkpoint",
        input: "a shard cut in half",
        args: |d| {
            let ck = olmoe(d);
            let p = ck.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            inspect(ck.to_string_lossy().into_owned())
        },
        code: 3,
        says: "model.safetensors",
    },
    Case {
        area: "HF checkpoint",
        input: "a tensor with the wrong shape",
        args: |d| {
            run_on(
                olmoe_header(d, |h| {
                    h["model.layers.0.mlp.gate.weight"]["shape"] = serde_json::json!([16, 16]);
                }),
                &[],
            )
        },
        code: 3,
        says: "model.layers.0.mlp.gate.weight",
    },
    Case {
        area: "HF checkpoint",
        input: "a tensor missing",
        args: |d| {
            run_on(
                olmoe_header(d, |h| {
                    let e = h
                        .as_object_mut()
                        .unwrap()
                        .remove("model.layers.1.mlp.gate.weight")
                        .unwrap();
                    h["model.layers.1.mlp.router.weight"] = e;
                }),
                &[],
            )
        },
        code: 3,
        says: "model.layers.1.mlp.gate.weight",
    },
    Case {
        area: "HF checkpoint",
        input: "tokenizer.json that is not a tokenizer",
        args: |d| {
            let ck = olmoe(d);
            std::fs::write(ck.join("tokenizer.json"), b"{\"model\": 1}").unwrap();
            run_on(ck.to_string_lossy().into_owned(), &[])
        },
        code: 3,
        says: "tokenizer.json",
    },
    Case {
        area: "HF checkpoint",
        input: "config.json that is a FIFO",
        args: |d| {
            let ck = olmoe(d);
            std::fs::remove_file(ck.join("config.json")).unwrap();
            mkfifo(&ck.join("config.json"));
            inspect(ck.to_string_lossy().into_owned())
        },
        code: 3,
        says: "ck",
    },
    // --- texts and prompts
    Case {
        area: "text / prompts",
        input: "--text naming a missing file",
        args: |_| run_embedded(&["--text", "no-such.txt"]),
        code: 3,
        says: "no-such.txt",
    },
    Case {
        area: "text / prompts",
        input: "--text naming an empty file",
        args: |d| {
            write(d, "empty.txt", b"");
            run_embedded(&["--text", "empty.txt"])
        },
        code: 3,
        says: "empty.txt",
    },
    Case {
        area: "text / prompts",
        input: "--text naming a FIFO (would block)",
        args: |d| {
            mkfifo(&d.join("t.txt"));
            run_embedded(&["--text", "t.txt"])
        },
        code: 3,
        says: "t.txt: it is a FIFO",
    },
    Case {
        area: "text / prompts",
        input: "--text naming a directory",
        args: |_| run_embedded(&["--text", "."]),
        code: 3,
        says: "it is a directory",
    },
    Case {
        area: "text / prompts",
        input: "--prompts naming a missing file",
        args: |_| run_embedded(&["--workload", "generate", "--prompts", "no.txt"]),
        code: 3,
        says: "no.txt",
    },
    Case {
        area: "text / prompts",
        input: "--prompts file with only blank lines",
        args: |d| {
            write(d, "p.txt", b"\n  \n\r\n");
            run_embedded(&["--workload", "generate", "--prompts", "p.txt"])
        },
        code: 3,
        says: "p.txt has no prompts: every line is blank",
    },
    // --- command line
    Case {
        area: "command line",
        input: "an unknown option",
        args: |_| s(&["run", "--no-such-option"]),
        code: 2,
        says: "unexpected argument '--no-such-option'",
    },
    Case {
        area: "command line",
        input: "--threshold 0",
        args: |_| run_embedded(&["--threshold", "0"]),
        code: 2,
        says: "(0, 1]",
    },
    Case {
        area: "command line",
        input: "--threshold 1.5",
        args: |_| run_embedded(&["--threshold", "1.5"]),
        code: 2,
        says: "(0, 1]",
    },
    Case {
        area: "command line",
        input: "--threshold NaN",
        args: |_| run_embedded(&["--threshold", "NaN"]),
        code: 2,
        says: "NaN",
    },
    Case {
        area: "command line",
        input: "--threshold for a block that has no MoE layer",
        args: |_| run_embedded(&["--threshold", "99:0.5"]),
        code: 2,
        says: "layer 99 is not a MoE layer",
    },
    Case {
        area: "command line",
        input: "--policy topk --k 0",
        args: |_| run_embedded(&["--policy", "topk", "--k", "0"]),
        code: 2,
        says: "--k",
    },
    Case {
        area: "command line",
        input: "--policy topk --k 10^11",
        args: |_| run_embedded(&["--policy", "topk", "--k", "100000000000"]),
        code: 2,
        says: "k must be in 1..=16",
    },
    Case {
        area: "command line",
        input: "--k without --policy topk",
        args: |_| run_embedded(&["--k", "2"]),
        code: 2,
        says: "--k goes with --policy topk",
    },
    Case {
        area: "command line",
        input: "--capacity-factor NaN",
        args: |_| run_embedded(&["--capacity-factor", "NaN"]),
        code: 2,
        says: "is not in (0, 1000000]",
    },
    Case {
        area: "command line",
        input: "--capacity-factor inf",
        args: |_| run_embedded(&["--capacity-factor", "inf"]),
        code: 2,
        says: "is not in (0, 1000000]",
    },
    Case {
        area: "command line",
        input: "--batch 0",
        args: |_| run_embedded(&["--batch", "0"]),
        code: 2,
        says: "0 is not in 1..=4096",
    },
    Case {
        area: "command line",
        input: "--batch 10^9 (would allocate the text a billion times)",
        args: |_| run_embedded(&["--batch", "1000000000"]),
        code: 2,
        says: "is not in 1..=4096",
    },
    Case {
        area: "command line",
        input: "--seq-len beyond the model's context",
        args: |_| run_embedded(&["--seq-len", "100000"]),
        code: 2,
        says: "--seq-len must be in 1..=256",
    },
    Case {
        area: "command line",
        input: "--tokens 0",
        args: |_| run_embedded(&["--tokens", "0"]),
        code: 2,
        says: "0 is not in 1..=1000000000000",
    },
    Case {
        area: "command line",
        input: "--seconds 1e300",
        args: |_| run_embedded(&["--seconds", "1e300"]),
        code: 2,
        says: "--seconds must be in (0, 1e7]",
    },
    Case {
        area: "command line",
        input: "--seconds NaN",
        args: |_| run_embedded(&["--seconds", "NaN"]),
        code: 2,
        says: "--seconds must be in (0, 1e7]",
    },
    Case {
        area: "command line",
        input: "--threads 100000 (thread creation would fail)",
        args: |_| run_embedded(&["--threads", "100000"]),
        code: 2,
        says: "100000 is not in 1..=1024",
    },
    Case {
        area: "command line",
        input: "--temperature NaN",
        args: |_| run_embedded(&["--workload", "generate", "--temperature", "NaN"]),
        code: 2,
        says: "is not in [0, 100]",
    },
    Case {
        area: "command line",
        input: "--fps 0",
        args: |_| run_embedded(&["--fps", "0"]),
        code: 2,
        says: "--fps must be between 0.5 and 120",
    },
    Case {
        area: "command line",
        input: "--reference with an unknown policy",
        args: |_| run_embedded(&["--reference", "best"]),
        code: 2,
        says: "--reference: expected native, dense, topk:K or threshold:T",
    },
    Case {
        area: "command line",
        input: "--reference topk:abc",
        args: |_| run_embedded(&["--reference", "topk:abc"]),
        code: 2,
        says: "is not a number",
    },
    Case {
        area: "command line",
        input: "--text with --workload generate",
        args: |d| {
            write(d, "x.txt", b"some text");
            run_embedded(&["--workload", "generate", "--text", "x.txt"])
        },
        code: 2,
        says: "--text goes with --workload eval",
    },
    Case {
        area: "command line",
        input: "--device cuda in a build without CUDA",
        args: |_| run_embedded(&["--device", "cuda"]),
        code: 2,
        says: "CUDA",
    },
    Case {
        area: "command line",
        input: "sweep --thresholds with a value above 1",
        args: |_| s(&["sweep", "--tokens", "256", "--thresholds", "0.5,2"]),
        code: 2,
        says: "--thresholds",
    },
    Case {
        area: "command line",
        input: "sweep --thresholds that is not a list",
        args: |_| s(&["sweep", "--tokens", "256", "--thresholds", "abc"]),
        code: 2,
        says: "--thresholds",
    },
    Case {
        area: "command line",
        input: "sweep --top-k-baseline 99",
        args: |_| s(&["sweep", "--tokens", "256", "--top-k-baseline", "99"]),
        code: 2,
        says: "--top-k-baseline needs k in 1..=16",
    },
    Case {
        area: "command line",
        input: "sweep --tokens 10^10",
        args: |_| s(&["sweep", "--tokens", "10000000000"]),
        code: 2,
        says: "is not in 1..=1000000000",
    },
    Case {
        area: "command line",
        input: "parity --tol NaN",
        args: |_| s(&["parity", "--tol", "NaN"]),
        code: 2,
        says: "NaN is not in (0, 1]",
    },
    Case {
        area: "command line",
        input: "synth --d-model 10^12",
        args: |_| s(&["synth", "--d-model", "1000000000000", "x.safetensors"]),
        code: 2,
        says: "at most 65536 supported",
    },
    Case {
        area: "command line",
        input: "synth --hf --shard-gb 0",
        args: |_| s(&["synth", "--hf", "olmoe-tiny", "--shard-gb", "0", "ck"]),
        code: 2,
        says: "is not in [0.001, 1000]",
    },
    Case {
        area: "command line",
        input: "train --warmup beyond --steps",
        args: |_| s(&["train", "--steps", "10", "--warmup", "20"]),
        code: 2,
        says: "--warmup must be in [0, 10]",
    },
    Case {
        area: "command line",
        input: "a model of one's own with no --text to evaluate",
        args: |d| {
            let m = d.join("own.safetensors");
            std::fs::copy(embedded(), &m).unwrap();
            run_on(m.to_string_lossy().into_owned(), &[])
        },
        code: 2,
        says: "--text FILE is needed",
    },
    // --- output paths (all checked before the run starts)
    Case {
        area: "output",
        input: "--report over an existing file without --force",
        args: |d| {
            write(d, "r.json", b"keep me");
            run_embedded(&["--report", "r.json"])
        },
        code: 2,
        says: "r.json already exists (use --force to overwrite)",
    },
    Case {
        area: "output",
        input: "--report /dev/null --force (would replace the device)",
        args: |_| run_embedded(&["--report", "/dev/null", "--force", "--format", "json"]),
        code: 2,
        says: "/dev/null is a character device, not a regular file",
    },
    Case {
        area: "output",
        input: "--report over a symlink with --force",
        args: |d| {
            write(d, "target.json", b"keep me");
            std::os::unix::fs::symlink(d.join("target.json"), d.join("link.json")).unwrap();
            run_embedded(&["--report", "link.json", "--force"])
        },
        code: 2,
        says: "link.json is a symbolic link, not a regular file",
    },
    Case {
        area: "output",
        input: "--report over a directory with --force",
        args: |d| {
            std::fs::create_dir(d.join("out.json")).unwrap();
            run_embedded(&["--report", "out.json", "--force"])
        },
        code: 2,
        says: "out.json is a directory",
    },
    Case {
        area: "output",
        input: "--report in a missing directory",
        args: |_| run_embedded(&["--report", "no-dir/r.json"]),
        code: 2,
        says: "the directory no-dir does not exist",
    },
    Case {
        area: "output",
        input: "--report with an unknown extension",
        args: |_| run_embedded(&["--report", "r.xml"]),
        code: 2,
        says: "--format",
    },
    Case {
        area: "output",
        input: "--trace over an existing file without --force",
        args: |d| {
            write(d, "t.jsonl", b"keep me");
            run_embedded(&["--trace", "t.jsonl"])
        },
        code: 2,
        says: "t.jsonl already exists",
    },
    Case {
        area: "output",
        input: "--report and --trace naming the same file",
        args: |_| run_embedded(&["--report", "x.json", "--trace", "./x.json"]),
        code: 2,
        says: "--report and --trace name the same file",
    },
    // --- the report converter
    Case {
        area: "report converter",
        input: "input that is not JSON",
        args: |d| {
            write(d, "in.json", b"not json");
            s(&["report", "in.json", "out.html"])
        },
        code: 3,
        says: "in.json is not JSON",
    },
    Case {
        area: "report converter",
        input: "JSON that is not a report",
        args: |d| {
            write(d, "in.json", b"{\"a\": 1}");
            s(&["report", "in.json", "out.html"])
        },
        code: 3,
        says: "is not an xmoe-top JSON report",
    },
    Case {
        area: "report converter",
        input: "a report of another schema version",
        args: |d| {
            write(
                d,
                "in.json",
                br#"{"generator": {"report_schema_version": 999}}"#,
            );
            s(&["report", "in.json", "out.html"])
        },
        code: 3,
        says: "version 999",
    },
    Case {
        area: "report converter",
        input: "a report cut in half",
        args: |d| {
            let b = std::fs::read(saved_report(d)).unwrap();
            write(d, "half.json", &b[..b.len() / 2]);
            s(&["report", "half.json", "out.html"])
        },
        code: 3,
        says: "half.json is not JSON",
    },
    Case {
        area: "report converter",
        input: "a FIFO as input",
        args: |d| {
            mkfifo(&d.join("in.json"));
            s(&["report", "in.json", "out.html"])
        },
        code: 3,
        says: "FIFO",
    },
    Case {
        area: "report converter",
        input: "an existing output without --force",
        args: |d| {
            saved_report(d);
            write(d, "out.html", b"keep me");
            s(&["report", "r.json", "out.html"])
        },
        code: 2,
        says: "out.html already exists",
    },
];

fn run_case(c: &Case) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let args = (c.args)(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(&args)
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{}: {}: hangs ({args:?})", c.area, c.input);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn bad_inputs_end_with_a_clear_message_and_their_exit_status() {
    let mut failures = Vec::new();
    for c in CASES {
        let (code, err) = run_case(c);
        let ok = code == c.code
            && err.contains(c.says)
            && !err.contains("panicked")
            && !err.contains("stack backtrace");
        if !ok {
            failures.push(format!(
                "{} / {}: expected exit {} and `{}`, got exit {code}:\n{err}",
                c.area, c.input, c.code, c.says
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

/// The doc's table of the cases above, as markdown rows.
fn doc_rows() -> String {
    let mut out = String::new();
    for c in CASES {
        let says = if c.says.is_empty() {
            "(no error)".to_string()
        } else {
            format!("`{}`", c.says.replace('|', "\\|"))
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | `robustness::bad_inputs…` |\n",
            c.area,
            c.input.replace('|', "\\|"),
            says,
            c.code
        ));
    }
    out
}

#[test]
fn docs_list_every_case() {
    let doc = std::fs::read_to_string(repo("docs/robustness.md")).unwrap();
    let rows = doc_rows();
    assert!(
        doc.contains(&rows),
        "docs/robustness.md's generated rows differ from tests/robustness.rs; paste:\n\n{rows}"
    );
}

/// Waits for `child` with a deadline; its stdout and stderr.
fn finish(child: std::process::Child, secs: u64) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the run did not end after the signal")
        .unwrap()
}

#[test]
fn a_headless_run_stopped_by_a_signal_writes_its_summary_report_and_trace() {
    for (signal, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
            .args([
                "run",
                "--headless",
                "--tokens",
                "1000000000",
                "--threads",
                "1",
            ])
            .args(["--trace", "t.jsonl", "--report", "r.json"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it load and write some of the trace.
        let start = Instant::now();
        while std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .all(|e| e.metadata().map_or(0, |m| m.len()) < 100_000)
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name}: no trace"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill has no memory effects; the pid is our own child's.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = finish(child, 60);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(128 + signal), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("stopped by {name} after")),
            "{stderr}"
        );
        assert!(stdout.contains("tokens in"), "{name}: no summary: {stdout}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("r.json")).unwrap()).unwrap();
        assert!(report.get("snapshot").is_some(), "{name}: report");
        let trace = std::fs::read_to_string(dir.path().join("t.jsonl")).unwrap();
        let lines = trace.lines().count();
        assert!(lines > 1, "{name}: trace has {lines} lines");
        for (i, l) in trace.lines().enumerate() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("{name}: trace line {i}: {e}"));
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["r.json", "t.jsonl"], "{name}: temporaries left");
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    for args in [
        s(&["inspect"]),
        s(&["run", "--headless", "--tokens", "256", "--threads", "1"]),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is printed (`xmoe-top ... | head -0`).
        drop(child.stdout.take());
        let out = finish(child, 60);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn untrusted_names_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = embedded_config(dir.path(), |c| {
        c["name"] = "evil\u{1b}]0;owned\u{7}\u{1b}[2J".into();
    });
    for args in [
        vec!["inspect".to_string(), path.clone()],
        run_on(path.clone(), &["--text", &repo("assets/kjv-heldout.txt")]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("evil"), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{args:?}: raw escape in {text:?}"
        );
    }
}

/// GET `path` from `addr`; the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn the_metrics_endpoint_serves_prometheus_text_and_survives_bad_clients() {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(["run", "--headless", "--seconds", "30", "--threads", "1"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("no metrics address printed").unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    // Hostile clients first: one that never sends a request, one that sends 100 KB of header.
    let idle = std::net::TcpStream::connect(&addr).unwrap();
    let mut flood = std::net::TcpStream::connect(&addr).unwrap();
    let _ = flood.write_all(&vec![b'a'; 100_000]);
    // A scrape once the first snapshots are in.
    let start = Instant::now();
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if body.contains("xmoe_bits_per_byte") {
            break body;
        }
        assert!(start.elapsed() < Duration::from_secs(25), "{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(idle);
    let lines: Vec<Result<String, std::io::Error>> =
        body.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: unexpected type"),
        }
    };
    assert!(value("xmoe_tokens_total", None) > 0.0);
    assert!(value("xmoe_tokens_per_second", None) > 0.0);
    for layer in ["0", "1", "2", "3"] {
        let e = value("xmoe_experts_per_token", Some(("layer", layer)));
        assert!((1.0..=16.0).contains(&e), "layer {layer}: {e}");
        assert_eq!(value("xmoe_threshold", Some(("layer", layer))), 0.9);
    }
    let saved = value(
        "xmoe_moe_flops_saved_ratio",
        Some(("baseline", "all_experts")),
    );
    assert!((0.0..1.0).contains(&saved), "{saved}");
    let bpb = value("xmoe_bits_per_byte", None);
    assert!((1.0..8.0).contains(&bpb), "{bpb}");
    assert_eq!(http_get(&addr, "/nope").0, "HTTP/1.1 404 Not Found");
    // SAFETY: kill has no memory effects; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
}

#[test]
fn a_sweep_stopped_by_a_signal_says_so_and_writes_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args([
            "sweep",
            "--tokens",
            "200000",
            "--threads",
            "1",
            "--report",
            "s.json",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sweep ended too soon"
    );
    // SAFETY: kill has no memory effects; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = finish(child, 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("sweep stopped by SIGINT after"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
