//! MXFP4 (OCP Microscaling, FP4 E2M1 elements with an E8M0 scale per 32), the format of the
//! expert weights in the published gpt-oss checkpoints: `{name}_blocks` `[..., rows, groups, 16]`
//! u8 (two 4-bit values per byte, the **low nibble first**) and `{name}_scales` `[..., rows,
//! groups]` u8 (the scale is `2^(s - 127)`). A row of `groups * 32` values is row `r` of the
//! `[out, in]` matrix, as transformers' `convert_moe_packed_tensors` (`integrations/mxfp4.py`)
//! reads it before transposing to its `x @ W` layout.
//!
//! On the CPU the experts run on this packed form ([`packed_experts`], multiplied by
//! [`crate::model::quant`], which decodes a tile of rows at a time): memory stays at the file's
//! 4.25 bits a weight. [`dequantize`] to bf16 on load remains the path for other devices and for
//! `--moe-dispatch candle`, and is the reference the packed product is tested against.

use std::cell::RefCell;
use std::collections::BTreeSet;

use candle_core::Tensor;
use half::bf16;

use super::HfCheckpoint;
use crate::model::format::LoadError;
use crate::model::quant::{GateUp, QuantExperts, QuantMatrix};

/// The 16 FP4 E2M1 values by code: bit 3 is the sign, bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Values per scale (bytes of a block times two).
pub const BLOCK: usize = 32;

/// `2^(scale - 127)` in f32 (`0` gives `2^-127`, a subnormal; `255`, which MX reserves for NaN,
/// gives infinity like transformers' `ldexp`).
pub fn scale_of(scale: u8) -> f32 {
    let e = i32::from(scale) - 127;
    // Two steps keep 2^-127 (below f32's normal range) exact.
    2f32.powi(e / 2) * 2f32.powi(e - e / 2)
}

/// Dequantises `blocks` (`n * 16` bytes) with `scales` (`n` bytes) into `n * 32` values, each
/// rounded to bf16 (exact unless the scaled value leaves bf16's range).
///
/// # Panics
/// When `blocks.len() != 16 * scales.len()`.
pub fn dequantize(blocks: &[u8], scales: &[u8]) -> Vec<bf16> {
    assert_eq!(
        blocks.len(),
        scales.len() * (BLOCK / 2),
        "16 bytes per scale"
    );
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (block, &s) in blocks.chunks_exact(BLOCK / 2).zip(scales) {
        let scale = scale_of(s);
        for &b in block {
            out.push(bf16::from_f32(FP4_VALUES[usize::from(b & 0x0f)] * scale));
            out.push(bf16::from_f32(FP4_VALUES[usize::from(b >> 4)] * scale));
        }
    }
    out
}

/// Reads a tensor by name, checked against a shape.
pub type TensorLoader<'a> = dyn Fn(&str, &[usize]) -> Result<Tensor, LoadError> + 'a;

/// The MXFP4 matrix `{name}_blocks` `[E, rows, cols / 32, 16]` + `{name}_scales`
/// `[E, rows, cols / 32]` as stored, `[E * rows, cols]`.
fn packed(
    ckpt: &HfCheckpoint,
    name: &str,
    experts: usize,
    rows: usize,
    cols: usize,
) -> Result<QuantMatrix, LoadError> {
    let bad = |detail: String| LoadError::Mxfp4 {
        path: ckpt.dir().to_path_buf(),
        tensor: format!("{name}_blocks"),
        detail,
    };
    if !cols.is_multiple_of(BLOCK) {
        return Err(bad(format!(
            "rows of {cols} values, expected a multiple of {BLOCK} (one scale per {BLOCK} values)"
        )));
    }
    let groups = cols / BLOCK;
    let blocks = ckpt.bytes_u8(
        &format!("{name}_blocks"),
        &[experts, rows, groups, BLOCK / 2],
    )?;
    let scales = ckpt.bytes_u8(&format!("{name}_scales"), &[experts, rows, groups])?;
    QuantMatrix::mxfp4(blocks, scales, experts * rows, cols).map_err(|e| bad(e.to_string()))
}

/// gpt-oss experts of the MoE block `m` (`{m}.experts.gate_up_proj_{blocks,scales}` with gate
/// and up rows interleaved, `{m}.experts.down_proj_{blocks,scales}`), kept packed; the caller adds
/// the biases (`QuantExperts::with_biases`). `used` records the packed tensors.
pub fn packed_experts(
    ckpt: &HfCheckpoint,
    m: &str,
    n: usize,
    inter: usize,
    h: usize,
    used: &RefCell<BTreeSet<String>>,
) -> Result<QuantExperts, LoadError> {
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let gate_up = format!("{m}.experts.gate_up_proj");
    let down = format!("{m}.experts.down_proj");
    for name in [&gate_up, &down] {
        for suffix in ["_blocks", "_scales"] {
            used.borrow_mut().insert(format!("{name}{suffix}"));
        }
    }
    let gu = packed(ckpt, &gate_up, n, 2 * inter, h)?;
    let dn = packed(ckpt, &down, n, h, inter)?;
    QuantExperts::new(n, inter, h, GateUp::Interleaved(gu), dn).map_err(de)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent decoder: E2M1 from its bits (sign, 2 exponent bits with bias 1, 1 mantissa
    /// bit; exponent 0 is subnormal), scaled by an exact power of two in f64.
    fn e2m1(code: u8, scale: u8) -> f64 {
        let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((code >> 1) & 3);
        let man = f64::from(code & 1);
        let mag = if exp == 0 {
            man * 0.5
        } else {
            (1.0 + man / 2.0) * 2f64.powi(exp - 1)
        };
        sign * mag * 2f64.powi(i32::from(scale) - 127)
    }

    #[test]
    fn the_table_is_e2m1() {
        for code in 0..16u8 {
            assert_eq!(
                f64::from(FP4_VALUES[usize::from(code)]),
                e2m1(code, 127),
                "{code}"
            );
        }
    }

    #[test]
    fn low_nibble_first_with_sign_and_extreme_scales() {
        // Block 0: byte 0x9A = high 9 (-0.5), low A (-1.0); byte 0x71 = high 7 (6), low 1 (0.5).
        let mut blocks = vec![0u8; 3 * 16];
        blocks[0] = 0x9a;
        blocks[1] = 0x71;
        blocks[15] = 0xf8; // low 8 (-0.0), high F (-6)
        blocks[16] = 0x21; // block 1: low 1 (0.5), high 2 (1)
        blocks[17] = 0xf7; // low 7 (6), high F (-6): beyond bf16 at this scale
        blocks[32] = 0x3d; // block 2: low D (-3), high 3 (1.5)
        let scales = [127u8, 254, 0];
        let got = dequantize(&blocks, &scales);
        assert_eq!(got.len(), 96);
        let f = |i: usize| got[i].to_f32();
        assert_eq!((f(0), f(1), f(2), f(3)), (-1.0, -0.5, 0.5, 6.0));
        assert_eq!((f(30), f(31)), (0.0, -6.0));
        assert!(f(30).is_sign_negative(), "-0 keeps its sign");
        // Scale 254: 2^127 (0.5 * 2^127 = 2^126, 1 * 2^127); 6 * 2^127 is past bf16's largest
        // value and becomes infinity with its sign, as transformers' bf16 `ldexp` gives.
        assert_eq!(f64::from(f(32)), e2m1(1, 254));
        assert_eq!(f64::from(f(33)), e2m1(2, 254));
        assert_eq!((f(34), f(35)), (f32::INFINITY, f32::NEG_INFINITY));
        // Scale 0: 2^-127; -3 * 2^-127 and 1.5 * 2^-127 are bf16 subnormals, still exact.
        assert_eq!(f64::from(f(64)), e2m1(0xd, 0));
        assert_eq!(f64::from(f(65)), e2m1(0x3, 0));
        assert!(f(64) < 0.0 && f(64) != 0.0);
        // Every code at every scale that stays in bf16's range agrees with the bit decoder.
        for s in [0u8, 1, 100, 126, 127, 128, 200, 252] {
            for code in 0..=255u8 {
                let v = dequantize(&[code; 16], &[s]);
                assert_eq!(
                    f64::from(v[0].to_f32()),
                    e2m1(code & 0xf, s),
                    "{code:#x} {s}"
                );
                assert_eq!(
                    f64::from(v[1].to_f32()),
                    e2m1(code >> 4, s),
                    "{code:#x} {s}"
                );
            }
        }
        assert_eq!(scale_of(255), f32::INFINITY);
    }
}
