//! Reading a GGUF fixture's metadata and tensors, writing them back changed, and running the
//! binary on the result: the bad-input tests of every GGUF family.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};

/// The metadata and tensors of a fixture, to write back changed.
pub type Parts = (Vec<(String, Value)>, Vec<(String, QTensor)>);

/// Every metadata entry and tensor of `path`, sorted by name.
pub fn parts(path: &Path) -> Parts {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<_> = c.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<_> = c.tensor_infos.keys().cloned().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = c.tensor(&mut f, &n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    (meta, tensors)
}

/// Writes `meta` and `tensors` as the GGUF file `dir/name`.
pub fn write(
    dir: &Path,
    name: &str,
    meta: &[(String, Value)],
    tensors: &[(&str, &QTensor)],
) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, tensors).unwrap();
    p
}

/// `xmoe-top ARGS`: exit code and stderr.
pub fn xmoe(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
