//! A projection's rows split into heads, rotated on the way: `[batch, seq, heads, head_dim]`
//! rows in, `[batch, heads, seq, head_dim]` out, with rotary positions applied to each head as
//! it is copied.
//!
//! Through candle the same step is a transpose made contiguous (one pass over the tensor) and
//! candle-nn's rotary op (a second pass, and a second allocation): together about 0.9 ms of the
//! 6 ms an attention sublayer took at d 1024 on the Xeon of `docs/benchmarks.md`. The rotation
//! here is candle-nn's own arithmetic (`x1 cos - x2 sin`, `x1 sin + x2 cos`, half-split layout,
//! no fused multiply-adds), so the result is the same bits.

use rayon::prelude::*;

/// Cosines and sines of the pass's positions, `[seq, head_dim / 2]` each.
pub(crate) struct RotaryRows<'a> {
    /// `cos[t * head_dim / 2 + i]`.
    pub cos: &'a [f32],
    /// `sin[t * head_dim / 2 + i]`.
    pub sin: &'a [f32],
}

/// `out[b][h][t] = rotate(src[b][t][h])` for `batch` sequences of `seq` rows of `heads` heads of
/// `head_dim` values, rotated by `rotary`'s row `t` where given, copied otherwise. Spread over
/// the rayon pool by (sequence, head).
///
/// # Panics
/// When a slice does not match the shape, or `head_dim` is odd with rotary positions.
pub(crate) fn split_heads(
    src: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rotary: Option<&RotaryRows>,
    out: &mut [f32],
) {
    let n = batch * seq * heads * head_dim;
    assert_eq!(src.len(), n, "src");
    assert_eq!(out.len(), n, "out");
    if let Some(r) = rotary {
        assert!(
            head_dim.is_multiple_of(2),
            "odd head_dim {head_dim} with rotary positions"
        );
        assert!(r.cos.len() >= seq * head_dim / 2 && r.sin.len() >= seq * head_dim / 2);
    }
    if n == 0 {
        return;
    }
    let one = |bh: usize, dst: &mut [f32]| {
        let (b, h) = (bh / heads, bh % heads);
        for (t, d) in dst.chunks_exact_mut(head_dim).enumerate() {
            d.copy_from_slice(&src[((b * seq + t) * heads + h) * head_dim..][..head_dim]);
            if let Some(r) = rotary {
                let half = head_dim / 2;
                rotate_half(
                    d,
                    &r.cos[t * half..(t + 1) * half],
                    &r.sin[t * half..(t + 1) * half],
                );
            }
        }
    };
    // A task per (sequence, head) when there are a few rows to copy; a decode step's single row
    // stays on the calling thread.
    if seq * head_dim >= 1024 {
        out.par_chunks_exact_mut(seq * head_dim)
            .enumerate()
            .for_each(|(bh, dst)| one(bh, dst));
    } else {
        for (bh, dst) in out.chunks_exact_mut(seq * head_dim).enumerate() {
            one(bh, dst);
        }
    }
}

/// Rotates one head in place by one position's `cos` and `sin` (`[x.len() / 2]` each), pairing
/// `(i, i + n / 2)` as candle-nn's rope does: `x[i] cos - x[i + n/2] sin`, `x[i + n/2] cos + x[i]
/// sin`. The lean decoder rotates its heads with it too.
#[inline(always)]
pub(crate) fn rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a1, a2) = (x1[i], x2[i]);
        x1[i] = a1 * cos[i] - a2 * sin[i];
        x2[i] = a2 * cos[i] + a1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn split_and_rotation_equal_candles_transpose_and_rope_bit_for_bit() {
        let dev = Device::Cpu;
        for (batch, seq, heads, hd, start) in [(2, 5, 3, 8, 0), (1, 40, 2, 64, 7), (3, 1, 4, 4, 9)]
        {
            let n = batch * seq * heads * hd;
            let src: Vec<f32> = (0..n)
                .map(|i| (i * 7919 % 1009) as f32 / 504.0 - 1.0)
                .collect();
            let half = hd / 2;
            let positions = start + seq;
            let angle = |p: usize, i: usize| p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            let cos: Vec<f32> = (0..positions * half)
                .map(|j| angle(j / half, j % half).cos())
                .collect();
            let sin: Vec<f32> = (0..positions * half)
                .map(|j| angle(j / half, j % half).sin())
                .collect();
            let x = Tensor::from_vec(src.clone(), (batch, seq, heads, hd), &dev).unwrap();
            let split = x.transpose(1, 2).unwrap().contiguous().unwrap();
            let ct = Tensor::from_vec(cos.clone(), (positions, half), &dev).unwrap();
            let st = Tensor::from_vec(sin.clone(), (positions, half), &dev).unwrap();
            let want = candle_nn::rotary_emb::rope(
                &split,
                &ct.narrow(0, start, seq).unwrap(),
                &st.narrow(0, start, seq).unwrap(),
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let rows = RotaryRows {
                cos: &cos[start * half..],
                sin: &sin[start * half..],
            };
            let mut got = vec![f32::NAN; n];
            split_heads(&src, batch, seq, heads, hd, Some(&rows), &mut got);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rotated {batch}x{seq}x{heads}x{hd}"
            );
            let plain = split.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut copied = vec![f32::NAN; n];
            split_heads(&src, batch, seq, heads, hd, None, &mut copied);
            assert_eq!(copied, plain, "copied {batch}x{seq}x{heads}x{hd}");
        }
    }
}
