//! One test per way a model file can be wrong; each asserts on the message a user sees.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use common::{small_config, write_random};
use xmoe_top::model::config::METADATA_KEY;
use xmoe_top::model::format::{StoreDtype, write_model};
use xmoe_top::model::synth::random_weights;
use xmoe_top::model::{LoadError, Model};

fn load_err(path: &Path) -> String {
    match Model::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn good(dir: &Path) -> std::path::PathBuf {
    write_random(
        dir,
        "good.safetensors",
        &small_config(),
        1,
        false,
        StoreDtype::F32,
    )
}

/// Writes a file with the given tensors (name -> (dtype, shape, bytes)) and metadata.
fn raw_file(
    path: &Path,
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    meta: Option<HashMap<String, String>>,
) {
    struct V(safetensors::Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &V {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }
    let views: Vec<(String, V)> = tensors
        .into_iter()
        .map(|(n, d, s, b)| (n, V(d, s, b)))
        .collect();
    let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), meta).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn meta() -> Option<HashMap<String, String>> {
    Some(HashMap::from([(
        METADATA_KEY.to_string(),
        small_config().to_json(),
    )]))
}

/// The tensors of a valid small model as raw f32 bytes, for editing.
fn raw_tensors() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    random_weights(&small_config(), 1, false, 1.0)
        .into_iter()
        .map(|(n, s, v)| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, safetensors::Dtype::F32, s, b)
        })
        .collect()
}

#[test]
fn a_valid_file_loads_in_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for dt in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        let p = write_random(
            dir.path(),
            &format!("{dt:?}.safetensors"),
            &small_config(),
            1,
            false,
            dt,
        );
        let m = Model::load(&p, &Device::Cpu).unwrap();
        assert_eq!(m.moe_layers(), &[0, 1]);
        assert!(m.warnings().is_empty());
    }
}

#[test]
fn missing_file() {
    let e = load_err(Path::new("/nonexistent/model.safetensors"));
    assert!(
        e.contains("/nonexistent/model.safetensors") && e.contains("cannot open"),
        "{e}"
    );
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.safetensors");
    std::fs::write(&p, b"").unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("empty.safetensors") && e.contains("empty (0 bytes)"),
        "{e}"
    );
}

#[test]
fn directory_instead_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("is a directory"), "{e}");
}

#[test]
fn no_read_permission() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path());
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&p).is_err() {
        let e = load_err(&p);
        assert!(
            e.contains("cannot open") && e.contains("ermission denied"),
            "{e}"
        );
        return;
    }
    // Root reads anything (CI runs as root): load through the program as `nobody` instead, with
    // the directory open to it so that only the file's own permissions refuse.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .arg("inspect")
        .arg(&p)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("start xmoe-top as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot open") && stderr.contains("ermission denied"),
        "{stderr}"
    );
}

#[test]
fn shorter_than_the_header_length_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("truncated") && e.contains("at least 8 bytes"),
        "{e}"
    );
}

#[test]
fn header_length_pointing_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("past.safetensors");
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, b).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("header length field says 1000000 bytes but only 2 follow"),
        "{e}"
    );
}

#[test]
fn corrupt_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("corrupt.safetensors");
    let json = b"{this is not json";
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json);
    std::fs::write(&p, b).unwrap();
    let e = load_err(&p);
    assert!(e.contains("corrupt safetensors header"), "{e}");
}

#[test]
fn truncated_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&cut);
    assert!(
        e.contains("cut.safetensors")
            && e.contains("the file is truncated: tensor `")
            && e.contains("bytes of data follow the header"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let t: Vec<_> = raw_tensors()
        .into_iter()
        .filter(|t| t.0 != "layers.1.moe.experts.down_proj")
        .collect();
    raw_file(&p, t, meta());
    let e = load_err(&p);
    assert!(
        e.contains("missing tensor `layers.1.moe.experts.down_proj`") && e.contains("[8, 32, 16]"),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let t: Vec<_> = raw_tensors()
        .into_iter()
        .map(|mut t| {
            if t.0 == "layers.0.moe.router.weight" {
                t.2 = vec![4, 64];
            }
            t
        })
        .collect();
    raw_file(&p, t, meta());
    let e = load_err(&p);
    assert!(
        e.contains("`layers.0.moe.router.weight` has shape [4, 64], expected [8, 32]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let t: Vec<_> = raw_tensors()
        .into_iter()
        .map(|mut t| {
            if t.0 == "norm_f.weight" {
                t.1 = safetensors::Dtype::I32;
            }
            t
        })
        .collect();
    raw_file(&p, t, meta());
    let e = load_err(&p);
    assert!(
        e.contains("`norm_f.weight` has dtype I32, expected F32, F16 or BF16"),
        "{e}"
    );
}

#[test]
fn extra_tensors_are_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let mut t = raw_tensors();
    t.push((
        "optimizer.step".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    raw_file(&p, t, meta());
    let m = Model::load(&p, &Device::Cpu).unwrap();
    assert_eq!(m.warnings().len(), 1);
    assert!(m.warnings()[0].contains("ignoring tensor `optimizer.step`"));
}

#[test]
fn missing_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    raw_file(&p, raw_tensors(), None);
    let e = load_err(&p);
    assert!(
        e.contains("no model configuration") && e.contains("config.json"),
        "{e}"
    );
    // A config.json beside the file is the fallback.
    std::fs::write(dir.path().join("config.json"), small_config().to_json()).unwrap();
    Model::load(&p, &Device::Cpu).unwrap();
}

#[test]
fn inconsistent_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let mut cfg = small_config();
    cfg.n_heads = 5;
    let m = Some(HashMap::from([(METADATA_KEY.to_string(), {
        let mut v: serde_json::Value = serde_json::from_str(&small_config().to_json()).unwrap();
        v["n_heads"] = 5.into();
        v.to_string()
    })]));
    raw_file(&p, raw_tensors(), m);
    let e = load_err(&p);
    assert!(
        e.contains("`n_heads`") && e.contains("d_model 32 is not divisible by n_heads 5"),
        "{e}"
    );
    let m = Some(HashMap::from([(
        METADATA_KEY.to_string(),
        "{\"d_model\": 32}".to_string(),
    )]));
    raw_file(&p, raw_tensors(), m);
    let e = load_err(&p);
    assert!(
        e.contains("cannot parse the configuration") && e.contains("missing field"),
        "{e}"
    );
}

#[test]
fn non_finite_router_weights_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let mut w = random_weights(&small_config(), 1, false, 1.0);
    for t in &mut w {
        if t.0 == "layers.1.moe.router.weight" {
            t.2[17] = f32::NAN;
        }
    }
    write_model(&p, &small_config(), &w, StoreDtype::F32, true).unwrap();
    let e = Model::load(&p, &Device::Cpu).err().unwrap();
    assert!(matches!(e, LoadError::NonFinite { index: 17, .. }));
    assert!(
        e.to_string()
            .contains("`layers.1.moe.router.weight` has a non-finite value"),
        "{e}"
    );
}

#[test]
fn write_model_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path());
    let before = std::fs::read(&p).unwrap();
    let w = random_weights(&small_config(), 2, false, 1.0);
    let e = write_model(&p, &small_config(), &w, StoreDtype::F32, false).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    write_model(&p, &small_config(), &w, StoreDtype::F32, true).unwrap();
    assert_ne!(std::fs::read(&p).unwrap(), before);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
