//! Weights kept in their stored, quantised form and multiplied without dequantising the matrix:
//! llama.cpp's ggml blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) as candle-core reads them,
//! and MXFP4 (gpt-oss). A GGUF or MXFP4 model then takes about its file size in memory instead of
//! 4 bytes per weight.
//!
//! ggml blocks run along a row, so the rows `r0..r0 + n` of a `[rows, cols]` matrix (expert `e`
//! of a stacked `[E, I, H]` tensor is rows `e * I .. (e + 1) * I`) are one contiguous run of
//! blocks: an expert is multiplied in place, without a copy. The product is candle-core's
//! `k_quants::matmul`, llama.cpp's CPU algorithm: the activations are first quantised to the
//! weight type's dot-product partner (Q8_0 for Q4_0, Q5_0, Q8_0; Q8_1 for Q4_1, Q5_1; Q8_K for
//! the K-quants), then integer dot products are scaled. That quantisation of the activations is
//! the only arithmetic difference from multiplying the dequantised f32 matrix (docs/gguf.md
//! measures it). candle's own `QMatMul` is not used for this CPU form on purpose: on x86 it caches
//! a repacked copy of Q4_K, Q6_K and Q8_0 weights next to the original, which would double the
//! memory.
//!
//! **The device form** ([`QuantMatrix::on_device`]) is what a GPU runs (and the CPU, when the
//! device-generic path is asked for with `--moe-dispatch candle`): ggml blocks become candle `QMatMul`s on
//! the device, one per expert of a stacked tensor (an expert is then a whole matrix, which is what
//! candle's CUDA kernels multiply: mmvq for up to 8 rows, the mmq/dequantise + cuBLAS path above);
//! MXFP4 is dequantised to bf16 (exact, 16 bits a weight instead of 4.25); float matrices move as
//! they are. Nothing in the device form's product reads data back to the host.

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K,
    BlockQ6K, BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};
use rayon::prelude::*;

use super::hf::mxfp4;
use super::moe::{ExpertBiases, per_expert_groups};
use crate::kernel::{Activation, ClampedSwiglu};
use crate::routing::ExpertGroups;

/// How a [`QuantMatrix`] holds its values.
enum Kind {
    /// ggml blocks, in candle's CPU storage (a `Vec` of the block type, so aligned for it).
    Ggml(Arc<QTensor>),
    /// A float matrix `[rows, cols]` in its stored dtype (f32, f16, bf16), widened per product.
    Float(Tensor),
    /// MXFP4: per row, `cols / 32` groups of 16 bytes (two E2M1 codes a byte, low nibble first)
    /// and one E8M0 scale byte per group.
    Mxfp4 { blocks: Vec<u8>, scales: Vec<u8> },
    /// The device form: ggml blocks as candle `QMatMul`s on any device, in `parts.len()` equal
    /// runs of `part_rows` rows (one per expert of a stacked tensor, or one for a whole matrix).
    Parts {
        parts: Vec<QMatMul>,
        part_rows: usize,
        dtype: GgmlDType,
        bytes: usize,
    },
}

/// The ggml types candle-core 0.11 multiplies on CUDA (`quantized/cuda.rs`: `mul_mat_vec_*`,
/// `mul_mat_q*`, `dequantize_block_*`); Q8_1 and Q8_K have no CUDA matmul there.
pub const CUDA_GGML_TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A `[rows, cols]` weight matrix kept as stored, multiplied as `x @ W[r0..r0 + n]^T`.
pub struct QuantMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
}

/// A ggml type the quantised product supports, else an error naming it.
fn check_ggml(dtype: GgmlDType, cols: usize) -> candle_core::Result<()> {
    if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        candle_core::bail!("{dtype:?} is not a quantised type")
    }
    if !cols.is_multiple_of(dtype.block_size()) {
        candle_core::bail!(
            "{dtype:?} rows of {cols} values are not a whole number of {}-value blocks",
            dtype.block_size()
        )
    }
    Ok(())
}

impl QuantMatrix {
    /// A quantised ggml tensor, its outer dimensions flattened into rows (`[E, I, H]` becomes
    /// `[E * I, H]`). F32, F16 and BF16 tensors are refused: see [`QuantMatrix::float`].
    pub fn ggml(q: Arc<QTensor>) -> candle_core::Result<Self> {
        let dims = q.shape().dims();
        let Some((&cols, outer)) = dims.split_last() else {
            candle_core::bail!("a scalar is not a matrix")
        };
        check_ggml(q.dtype(), cols)?;
        let rows = outer.iter().product();
        let bytes = rows * cols / q.dtype().block_size() * q.dtype().type_size();
        if q.storage_size_in_bytes() != bytes || !q.device().is_cpu() {
            candle_core::bail!(
                "{:?} {dims:?}: expected {bytes} bytes on the CPU, found {} on {:?}",
                q.dtype(),
                q.storage_size_in_bytes(),
                q.device()
            )
        }
        Ok(Self {
            kind: Kind::Ggml(q),
            rows,
            cols,
        })
    }

    /// A float matrix (any shape, flattened to rows of its last dimension) kept in its dtype.
    pub fn float(t: Tensor) -> candle_core::Result<Self> {
        let dims = t.dims().to_vec();
        let Some((&cols, outer)) = dims.split_last() else {
            candle_core::bail!("a scalar is not a matrix")
        };
        let rows = outer.iter().product();
        Ok(Self {
            kind: Kind::Float(t.reshape((rows, cols))?),
            rows,
            cols,
        })
    }

    /// MXFP4 rows of `cols` values (a multiple of 32): `blocks` holds `rows * cols / 2` bytes,
    /// `scales` `rows * cols / 32`.
    pub fn mxfp4(
        blocks: Vec<u8>,
        scales: Vec<u8>,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<Self> {
        if !cols.is_multiple_of(mxfp4::BLOCK)
            || blocks.len() != rows * cols / 2
            || scales.len() != rows * cols / mxfp4::BLOCK
        {
            candle_core::bail!(
                "MXFP4 [{rows}, {cols}]: expected rows of a multiple of 32 values, {} bytes of blocks and {} of scales, found {} and {}",
                rows * cols / 2,
                rows * cols / mxfp4::BLOCK,
                blocks.len(),
                scales.len()
            )
        }
        Ok(Self {
            kind: Kind::Mxfp4 { blocks, scales },
            rows,
            cols,
        })
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix as a `[rows, cols]` tensor in its stored float dtype, when it is kept as one
    /// (an F32 GGUF tensor, or one widened at load): code that multiplies on plain slices (the
    /// lean decode path, `model::decode`) reads it in place. `None` for quantised blocks.
    pub fn float_rows(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Float(t) => Some(t),
            _ => None,
        }
    }

    /// The stored type, as a name for messages and `inspect`.
    pub fn type_name(&self) -> String {
        match &self.kind {
            Kind::Ggml(q) => format!("{:?}", q.dtype()),
            Kind::Float(t) => format!("{:?}", t.dtype()),
            Kind::Mxfp4 { .. } => "MXFP4".into(),
            Kind::Parts { dtype, .. } => format!("{dtype:?}"),
        }
    }

    /// Bytes the matrix takes in memory.
    pub fn storage_bytes(&self) -> usize {
        match &self.kind {
            Kind::Ggml(q) => q.storage_size_in_bytes(),
            Kind::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Kind::Mxfp4 { blocks, scales } => blocks.len() + scales.len(),
            Kind::Parts { bytes, .. } => *bytes,
        }
    }

    /// The device form of this matrix on `device`, split into `parts` equal runs of rows (the
    /// experts of a stacked tensor; 1 for a whole matrix): ggml blocks as `QMatMul`s (their bytes
    /// copied once, per part), MXFP4 dequantised to bf16 (exact), float matrices moved as they are.
    /// A ggml type candle cannot multiply on `device` is an error naming it.
    pub fn on_device(&self, device: &Device, parts: usize) -> candle_core::Result<Self> {
        if parts == 0 || !self.rows.is_multiple_of(parts) {
            candle_core::bail!("{} rows do not split into {parts} equal parts", self.rows)
        }
        let part_rows = self.rows / parts;
        match &self.kind {
            Kind::Ggml(q) => {
                let dtype = q.dtype();
                if device.is_cuda() && !CUDA_GGML_TYPES.contains(&dtype) {
                    candle_core::bail!(
                        "{dtype:?} blocks have no matrix product on CUDA in candle-core 0.11 \
                         (it multiplies {CUDA_GGML_TYPES:?}); run this file with --device cpu"
                    )
                }
                let data = q.data()?;
                let part_bytes = data.len() / parts;
                let mut out = Vec::with_capacity(parts);
                for chunk in data.chunks_exact(part_bytes) {
                    // One storage per part: an expert is a whole `[I, H]` matrix for candle's
                    // kernels, so no row offset into a stacked tensor is needed.
                    let storage =
                        QStorage::from_data(std::borrow::Cow::Borrowed(chunk), device, dtype)?;
                    let t = QTensor::new(storage, (part_rows, self.cols))?;
                    out.push(QMatMul::from_arc(Arc::new(t))?);
                }
                Ok(Self {
                    kind: Kind::Parts {
                        parts: out,
                        part_rows,
                        dtype,
                        bytes: data.len(),
                    },
                    rows: self.rows,
                    cols: self.cols,
                })
            }
            Kind::Float(t) => Self::float(t.to_device(device)?),
            Kind::Mxfp4 { blocks, scales } => {
                let values = mxfp4::dequantize(blocks, scales);
                Self::float(Tensor::from_vec(values, (self.rows, self.cols), device)?)
            }
            Kind::Parts { .. } => candle_core::bail!("the matrix is already in its device form"),
        }
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]` of this
    /// one (the llama q/k un-permutation). Copies the matrix once.
    pub fn permute_rows(&self, order: &[usize]) -> candle_core::Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            candle_core::bail!("a row order of {} rows for {} rows", order.len(), self.rows)
        }
        match &self.kind {
            Kind::Ggml(q) => {
                let data = q.data()?;
                let row_bytes = data.len() / self.rows;
                let mut out = Vec::with_capacity(data.len());
                for &r in order {
                    out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(out),
                    &Device::Cpu,
                    q.dtype(),
                )?;
                Self::ggml(Arc::new(QTensor::new(storage, (self.rows, self.cols))?))
            }
            Kind::Float(t) => {
                let idx: Vec<u32> = order.iter().map(|&r| r as u32).collect();
                let idx = Tensor::from_vec(idx, order.len(), t.device())?;
                Self::float(t.index_select(&idx, 0)?)
            }
            Kind::Mxfp4 { blocks, scales } => {
                let (rb, rs) = (self.cols / 2, self.cols / mxfp4::BLOCK);
                let pick = |v: &[u8], w: usize| -> Vec<u8> {
                    order
                        .iter()
                        .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                        .collect()
                };
                Self::mxfp4(pick(blocks, rb), pick(scales, rs), self.rows, self.cols)
            }
            Kind::Parts { .. } => {
                candle_core::bail!("rows are reordered before the matrix moves to its device form")
            }
        }
    }

    /// Rows `r0..r0 + n` dequantised to f32, `[n, cols]` row-major (the reference the tests
    /// compare the quantised product with).
    pub fn dequantize_rows(&self, r0: usize, n: usize) -> candle_core::Result<Vec<f32>> {
        self.check_rows(r0, n)?;
        match &self.kind {
            Kind::Ggml(q) => {
                let t = q.dequantize(&Device::Cpu)?;
                let t = t.reshape((self.rows, self.cols))?.narrow(0, r0, n)?;
                t.flatten_all()?.to_vec1()
            }
            Kind::Float(t) => t
                .narrow(0, r0, n)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1(),
            Kind::Mxfp4 { blocks, scales } => {
                let (rb, rs) = (self.cols / 2, self.cols / mxfp4::BLOCK);
                let mut out = vec![0f32; n * self.cols];
                for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
                    let r = r0 + i;
                    decode_mxfp4_row(
                        &blocks[r * rb..(r + 1) * rb],
                        &scales[r * rs..(r + 1) * rs],
                        row,
                    );
                }
                Ok(out)
            }
            Kind::Parts {
                parts, part_rows, ..
            } => {
                let mut out = Vec::with_capacity(n * self.cols);
                for r in r0..r0 + n {
                    let w = match &parts[r / part_rows] {
                        QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
                        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_device(&Device::Cpu)?,
                    };
                    let row = w.narrow(0, r % part_rows, 1)?.to_dtype(DType::F32)?;
                    out.extend(row.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            }
        }
    }

    fn check_rows(&self, r0: usize, n: usize) -> candle_core::Result<()> {
        if r0.checked_add(n).is_none_or(|end| end > self.rows) {
            candle_core::bail!("rows {r0}..{r0}+{n} of a {}-row matrix", self.rows)
        }
        Ok(())
    }

    /// `x @ W[r0..r0 + n]^T` for `x` = `[m, cols]` f32 on the CPU: `[m, n]` f32.
    pub fn forward_rows(&self, x: &Tensor, r0: usize, n: usize) -> candle_core::Result<Tensor> {
        self.check_rows(r0, n)?;
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!(
                "an input of {k} values for a {}x{} matrix",
                self.rows,
                self.cols
            )
        }
        if let Kind::Float(w) = &self.kind {
            return x.matmul(&w.narrow(0, r0, n)?.to_dtype(x.dtype())?.t()?);
        }
        if let Kind::Parts {
            parts, part_rows, ..
        } = &self.kind
        {
            // The device form multiplies whole parts (experts): a row range inside one is not
            // something the model asks for.
            if !r0.is_multiple_of(*part_rows) || n != *part_rows {
                candle_core::bail!(
                    "rows {r0}..{r0}+{n} of a matrix kept as parts of {part_rows} rows"
                )
            }
            return parts[r0 / part_rows].forward(&x.contiguous()?);
        }
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!(
                "quantised weights multiply f32 inputs on the CPU, found {:?} on {:?}",
                x.dtype(),
                x.device()
            )
        }
        let x = x.contiguous()?;
        let mut out = vec![0f32; m * n];
        if m > 0 && n > 0 {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("quantised weights need the input on the CPU")
            };
            let start = layout.start_offset();
            let xs = &cpu.as_slice::<f32>()?[start..start + m * k];
            match &self.kind {
                Kind::Ggml(q) => ggml_matmul(q, xs, m, self.cols, r0, n, &mut out)?,
                Kind::Mxfp4 { blocks, scales } => {
                    mxfp4_matmul(blocks, scales, xs, m, self.cols, r0, n, &mut out)
                }
                Kind::Float(_) | Kind::Parts { .. } => unreachable!("handled above"),
            }
        }
        Tensor::from_vec(out, (m, n), x.device())
    }

    /// `x @ W^T` over every row.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_rows(x, 0, self.rows)
    }

    /// Rows `ids` (token ids) dequantised to f32: `[ids, cols]` (an embedding lookup that widens
    /// only the rows a pass uses).
    pub fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.kind {
            Kind::Ggml(q) => {
                let ids = ids.flatten_all()?;
                if let Some(&bad) = ids
                    .to_dtype(DType::U32)?
                    .to_vec1::<u32>()?
                    .iter()
                    .find(|&&i| i as usize >= self.rows)
                {
                    candle_core::bail!("token id {bad} is out of range for {} rows", self.rows)
                }
                q.embedding(&ids)?.reshape((ids.elem_count(), self.cols))
            }
            Kind::Float(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
            Kind::Mxfp4 { .. } => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = Vec::with_capacity(ids.len() * self.cols);
                for &i in &ids {
                    out.extend(self.dequantize_rows(i as usize, 1)?);
                }
                Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
            }
            // No range check here: it would read the ids back from the device, and
            // `Model::forward` checks every id against the vocabulary on the host before upload.
            Kind::Parts { parts, .. } => match parts.as_slice() {
                [table] => table
                    .embedding(&ids.flatten_all()?)?
                    .to_dtype(DType::F32)?
                    .reshape((ids.elem_count(), self.cols)),
                _ => candle_core::bail!("an embedding table kept in {} parts", parts.len()),
            },
        }
    }
}

/// Views candle's CPU block storage (bytes of a `Vec<T>`) as the blocks it holds.
fn blocks_of<T: GgmlType>(bytes: &[u8]) -> candle_core::Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        candle_core::bail!(
            "{:?} storage of {} bytes is not a whole, aligned run of {size}-byte blocks",
            T::DTYPE,
            bytes.len()
        )
    }
    // SAFETY: the length and alignment were checked above; the block types are `#[repr(C)]`
    // structs of f16/f32 and integer fields, valid for any bit pattern; the slice borrows `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

fn ggml_typed<T: GgmlType>(
    bytes: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    r0: usize,
    n: usize,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let blocks = blocks_of::<T>(bytes)?;
    let per_row = k / T::BLCK_SIZE;
    let rows = blocks
        .get(r0 * per_row..(r0 + n) * per_row)
        .ok_or_else(|| candle_core::Error::Msg("rows past the end of the blocks".into()))?;
    k_quants::matmul::<T>((m, k, n), x, rows, out)
}

fn ggml_matmul(
    q: &QTensor,
    x: &[f32],
    m: usize,
    k: usize,
    r0: usize,
    n: usize,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let data = q.data()?;
    let b: &[u8] = &data;
    match q.dtype() {
        GgmlDType::Q4_0 => ggml_typed::<BlockQ4_0>(b, x, m, k, r0, n, out),
        GgmlDType::Q4_1 => ggml_typed::<BlockQ4_1>(b, x, m, k, r0, n, out),
        GgmlDType::Q5_0 => ggml_typed::<BlockQ5_0>(b, x, m, k, r0, n, out),
        GgmlDType::Q5_1 => ggml_typed::<BlockQ5_1>(b, x, m, k, r0, n, out),
        GgmlDType::Q8_0 => ggml_typed::<BlockQ8_0>(b, x, m, k, r0, n, out),
        GgmlDType::Q8_1 => ggml_typed::<BlockQ8_1>(b, x, m, k, r0, n, out),
        GgmlDType::Q2K => ggml_typed::<BlockQ2K>(b, x, m, k, r0, n, out),
        GgmlDType::Q3K => ggml_typed::<BlockQ3K>(b, x, m, k, r0, n, out),
        GgmlDType::Q4K => ggml_typed::<BlockQ4K>(b, x, m, k, r0, n, out),
        GgmlDType::Q5K => ggml_typed::<BlockQ5K>(b, x, m, k, r0, n, out),
        GgmlDType::Q6K => ggml_typed::<BlockQ6K>(b, x, m, k, r0, n, out),
        GgmlDType::Q8K => ggml_typed::<BlockQ8K>(b, x, m, k, r0, n, out),
        other @ (GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
            candle_core::bail!("{other:?} is not a quantised type")
        }
    }
}

/// One MXFP4 row into f32: exact (an E2M1 value times a power of two).
fn decode_mxfp4_row(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((block, &s), dst) in blocks
        .chunks_exact(mxfp4::BLOCK / 2)
        .zip(scales)
        .zip(out.chunks_exact_mut(mxfp4::BLOCK))
    {
        let scale = mxfp4::scale_of(s);
        for (&b, pair) in block.iter().zip(dst.chunks_exact_mut(2)) {
            pair[0] = mxfp4::FP4_VALUES[usize::from(b & 0x0f)] * scale;
            pair[1] = mxfp4::FP4_VALUES[usize::from(b >> 4)] * scale;
        }
    }
}

/// Weight rows decoded per tile: a tile of f32 rows stays in L2 while every input row meets it.
const MXFP4_TILE: usize = 16;

/// `x @ W[r0..r0 + n]^T` on MXFP4 rows, decoding a tile of rows at a time (never the matrix),
/// tiles spread over the rayon pool.
#[allow(clippy::too_many_arguments)]
fn mxfp4_matmul(
    blocks: &[u8],
    scales: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    r0: usize,
    n: usize,
    out: &mut [f32],
) {
    let (rb, rs) = (k / 2, k / mxfp4::BLOCK);
    // out^T, so that each tile writes a contiguous run.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(MXFP4_TILE * m)
        .enumerate()
        .for_each(|(tile, dst)| {
            let first = r0 + tile * MXFP4_TILE;
            let count = dst.len() / m;
            let mut w = vec![0f32; count * k];
            for (i, row) in w.chunks_exact_mut(k).enumerate() {
                let r = first + i;
                decode_mxfp4_row(
                    &blocks[r * rb..(r + 1) * rb],
                    &scales[r * rs..(r + 1) * rs],
                    row,
                );
            }
            for (i, row) in w.chunks_exact(k).enumerate() {
                for (t, xt) in x.chunks_exact(k).enumerate() {
                    dst[i * m + t] = dot(row, xt);
                }
            }
        });
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            out[t * n + j] = v;
        }
    }
}

/// A dot product in 8 independent lanes, so that the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// How the gate and up projections of quantised experts are laid out.
pub enum GateUp {
    /// Two stacked matrices `[E * I, H]` (GGUF `ffn_gate_exps`, `ffn_up_exps`).
    Separate {
        /// Gate projections.
        gate: QuantMatrix,
        /// Up projections.
        up: QuantMatrix,
    },
    /// One stacked `[E * 2I, H]` matrix whose rows alternate gate, up (gpt-oss's MXFP4
    /// `gate_up_proj`).
    Interleaved(QuantMatrix),
}

/// The experts of one MoE layer kept quantised: only the rows of the selected experts are
/// multiplied, each expert in place in the stacked tensor.
pub struct QuantExperts {
    n_experts: usize,
    inter: usize,
    hidden: usize,
    gate_up: GateUp,
    /// `[E * H, I]`.
    down: QuantMatrix,
    biases: Option<ExpertBiases>,
    clamped: Option<ClampedSwiglu>,
}

impl QuantExperts {
    /// Gated experts of `n_experts` with `inter` hidden units over a model width `hidden`;
    /// checks every matrix's shape.
    pub fn new(
        n_experts: usize,
        inter: usize,
        hidden: usize,
        gate_up: GateUp,
        down: QuantMatrix,
    ) -> candle_core::Result<Self> {
        let shape = |name: &str, m: &QuantMatrix, rows: usize, cols: usize| {
            if (m.rows(), m.cols()) == (rows, cols) {
                Ok(())
            } else {
                Err(candle_core::Error::Msg(format!(
                    "{name}: expected [{rows}, {cols}], found [{}, {}]",
                    m.rows(),
                    m.cols()
                )))
            }
        };
        match &gate_up {
            GateUp::Separate { gate, up } => {
                shape("gate", gate, n_experts * inter, hidden)?;
                shape("up", up, n_experts * inter, hidden)?;
            }
            GateUp::Interleaved(gu) => shape("gate_up", gu, n_experts * 2 * inter, hidden)?,
        }
        shape("down", &down, n_experts * hidden, inter)?;
        Ok(Self {
            n_experts,
            inter,
            hidden,
            gate_up,
            down,
            biases: None,
            clamped: None,
        })
    }

    /// Adds gpt-oss's per-expert biases and clamped SwiGLU.
    pub fn with_biases(mut self, biases: ExpertBiases, clamped: ClampedSwiglu) -> Self {
        self.biases = Some(biases);
        self.clamped = Some(clamped);
        self
    }

    /// Experts.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// The same experts in their device form on `device` ([`QuantMatrix::on_device`], one part
    /// per expert), biases moved with them.
    pub fn on_device(&self, device: &Device) -> candle_core::Result<Self> {
        let n = self.n_experts;
        let gate_up = match &self.gate_up {
            GateUp::Separate { gate, up } => GateUp::Separate {
                gate: gate.on_device(device, n)?,
                up: up.on_device(device, n)?,
            },
            GateUp::Interleaved(gu) => GateUp::Interleaved(gu.on_device(device, n)?),
        };
        let moved = |ts: &[Tensor]| -> candle_core::Result<Vec<Tensor>> {
            ts.iter().map(|t| t.to_device(device)).collect()
        };
        let biases = match &self.biases {
            Some(b) => Some(ExpertBiases {
                gate: moved(&b.gate)?,
                up: moved(&b.up)?,
                down: moved(&b.down)?,
            }),
            None => None,
        };
        Ok(Self {
            n_experts: n,
            inter: self.inter,
            hidden: self.hidden,
            gate_up,
            down: self.down.on_device(device, n)?,
            biases,
            clamped: self.clamped,
        })
    }

    /// Bytes the weights take in memory.
    pub fn storage_bytes(&self) -> usize {
        let gu = match &self.gate_up {
            GateUp::Separate { gate, up } => gate.storage_bytes() + up.storage_bytes(),
            GateUp::Interleaved(gu) => gu.storage_bytes(),
        };
        gu + self.down.storage_bytes()
    }

    /// `sum over kept pairs (t, e, w) of w * expert_e(x[t])` for `x` = [T, d].
    pub fn forward(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        let (i, h) = (self.inter, self.hidden);
        let b = self.biases.as_ref();
        let bias = |t: Tensor, b: Option<&Tensor>| -> candle_core::Result<Tensor> {
            match b {
                Some(b) => t.broadcast_add(&b.to_dtype(t.dtype())?),
                None => Ok(t),
            }
        };
        per_expert_groups(x, groups, |e, xs| {
            let (gate, up) = match &self.gate_up {
                GateUp::Separate { gate, up } => (
                    gate.forward_rows(xs, e * i, i)?,
                    up.forward_rows(xs, e * i, i)?,
                ),
                GateUp::Interleaved(gu) => {
                    let both = gu.forward_rows(xs, e * 2 * i, 2 * i)?;
                    let both = both.reshape((both.dim(0)?, i, 2))?;
                    let half = |j: usize| both.narrow(2, j, 1)?.squeeze(2)?.contiguous();
                    (half(0)?, half(1)?)
                }
            };
            let gate = bias(gate, b.map(|b| &b.gate[e]))?;
            let up = bias(up, b.map(|b| &b.up[e]))?;
            let hidden = match self.clamped {
                Some(c) => super::moe::clamped_swiglu(&gate, &up, c)?,
                None => (super::blocks::ffn::activate(&gate, activation)? * up)?,
            };
            let out = self.down.forward_rows(&hidden.contiguous()?, e * h, h)?;
            bias(out, b.map(|b| &b.down[e]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 211) as f32 / 211.0 - 0.5) * scale)
            .collect()
    }

    /// Every ggml type against its own dequantised matrix: the product differs only by the
    /// quantisation of the activations, and the row range picks the right rows.
    #[test]
    fn ggml_products_match_the_dequantised_matrix_on_any_row_range() {
        let (rows, cols, m) = (24, 256, 5);
        let w = Tensor::from_vec(ramp(rows * cols, 0.4), (rows, cols), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(ramp(m * cols, 2.0), (m, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let qm = QuantMatrix::ggml(q).unwrap();
            for (r0, n) in [(0, rows), (8, 8), (23, 1), (3, 0)] {
                let got = qm.forward_rows(&x, r0, n).unwrap();
                let deq = qm.dequantize_rows(r0, n).unwrap();
                let want = x
                    .matmul(
                        &Tensor::from_vec(deq, (n, cols), &Device::Cpu)
                            .unwrap()
                            .t()
                            .unwrap(),
                    )
                    .unwrap();
                let (g, wv) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let scale = wv.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
                let err = g
                    .iter()
                    .zip(&wv)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                // 8-bit activations: about 1% of the largest output.
                assert!(
                    err <= 0.02 * scale,
                    "{dtype:?} rows {r0}+{n}: {err} of {scale}"
                );
                assert_eq!(got.dims(), &[m, n]);
            }
        }
    }

    #[test]
    fn mxfp4_products_are_the_exact_dequantised_products() {
        let (rows, cols, m) = (37, 64, 3);
        let blocks: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..rows * cols / 32).map(|i| 120 + (i % 9) as u8).collect();
        let qm = QuantMatrix::mxfp4(blocks.clone(), scales.clone(), rows, cols).unwrap();
        // The project's bf16 decoder is exact for these scales: the same values.
        let bf: Vec<f32> = mxfp4::dequantize(&blocks, &scales)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(qm.dequantize_rows(0, rows).unwrap(), bf);
        let x = Tensor::from_vec(ramp(m * cols, 3.0), (m, cols), &Device::Cpu).unwrap();
        for (r0, n) in [(0, rows), (5, 17), (36, 1)] {
            let got = qm
                .forward_rows(&x, r0, n)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let w = &bf[r0 * cols..(r0 + n) * cols];
            let xs = x.to_vec2::<f32>().unwrap();
            for t in 0..m {
                for j in 0..n {
                    let want: f64 = (0..cols)
                        .map(|c| f64::from(xs[t][c]) * f64::from(w[j * cols + c]))
                        .sum();
                    let g = f64::from(got[t][j]);
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{t},{j}: {g} vs {want}"
                    );
                }
            }
        }
        // Permuting rows moves whole rows.
        let p = qm
            .permute_rows(&(0..rows).rev().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            p.dequantize_rows(0, 1).unwrap(),
            qm.dequantize_rows(rows - 1, 1).unwrap()
        );
    }

    /// The device form (here on the CPU, where candle's `QMatMul` runs the same ggml algorithm):
    /// each expert's part multiplies like the expert's rows of the stacked CPU form, a whole
    /// matrix looks rows up like the CPU form, MXFP4 becomes its exact bf16 values, and a row
    /// range inside a part is refused.
    #[test]
    fn the_device_form_multiplies_like_the_cpu_form() {
        let (experts, rows, cols, m) = (3, 8, 64, 4);
        let w = Tensor::from_vec(
            ramp(experts * rows * cols, 0.4),
            (experts * rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        let x = Tensor::from_vec(ramp(m * cols, 2.0), (m, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let cpu = QuantMatrix::ggml(q).unwrap();
            let dev = cpu.on_device(&Device::Cpu, experts).unwrap();
            assert_eq!(dev.storage_bytes(), cpu.storage_bytes());
            assert_eq!(dev.type_name(), format!("{dtype:?}"));
            for e in 0..experts {
                let a = dev.forward_rows(&x, e * rows, rows).unwrap();
                let b = cpu.forward_rows(&x, e * rows, rows).unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-4,
                    "{dtype:?} expert {e}"
                );
                assert_eq!(
                    dev.dequantize_rows(e * rows + 1, 2).unwrap(),
                    cpu.dequantize_rows(e * rows + 1, 2).unwrap()
                );
            }
            assert!(
                dev.forward_rows(&x, 1, rows).is_err(),
                "row range inside a part"
            );
            assert!(dev.permute_rows(&[0; 24]).is_err());
            let whole = cpu.on_device(&Device::Cpu, 1).unwrap();
            let ids = Tensor::new(&[5u32, 0, 23], &Device::Cpu).unwrap();
            assert_eq!(
                whole.lookup(&ids).unwrap().to_vec2::<f32>().unwrap(),
                cpu.lookup(&ids).unwrap().to_vec2::<f32>().unwrap()
            );
        }
        assert!(
            QuantMatrix::ggml(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()))
                .unwrap()
                .on_device(&Device::Cpu, 5)
                .is_err(),
            "24 rows in 5 parts"
        );
        let blocks: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 29 % 256) as u8).collect();
        let scales: Vec<u8> = (0..rows * cols / 32).map(|i| 122 + (i % 7) as u8).collect();
        let mx = QuantMatrix::mxfp4(blocks, scales, rows, cols).unwrap();
        let dev = mx.on_device(&Device::Cpu, 1).unwrap();
        assert_eq!(dev.type_name(), "BF16");
        assert_eq!(dev.storage_bytes(), rows * cols * 2);
        assert_eq!(
            dev.dequantize_rows(0, rows).unwrap(),
            mx.dequantize_rows(0, rows).unwrap()
        );
    }

    #[test]
    fn bad_shapes_and_types_are_errors_not_panics() {
        let w = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let qm = QuantMatrix::ggml(q).unwrap();
        let x = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(qm.forward_rows(&x, 0, 4).is_err(), "wrong input width");
        let x = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
        assert!(qm.forward_rows(&x, 2, 3).is_err(), "rows past the end");
        let f = Arc::new(QTensor::quantize(&w, GgmlDType::F16).unwrap());
        let e = QuantMatrix::ggml(f).err().unwrap().to_string();
        assert!(e.contains("F16"), "{e}");
        assert!(QuantMatrix::mxfp4(vec![0; 10], vec![0; 1], 1, 32).is_err());
        let ids = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        assert!(qm.lookup(&ids).is_err(), "id past the table");
    }
}
