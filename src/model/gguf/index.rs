//! The GGUF header: candle-core's reader parses the metadata, this module the tensor index.
//!
//! candle-core 0.11's `Content::read` refuses a file as soon as one tensor has a ggml type its
//! `GgmlDType` does not know, and gpt-oss files store their experts as MXFP4 (ggml type 39). So
//! candle reads the file through [`HideTensorCount`], which shows it a tensor count of 0: it
//! parses (and bounds) every metadata entry and stops where the tensor index begins. The index
//! itself (name, dimensions, type, offset per tensor) is read here from that position, with every
//! length bounded by the file's size, and the data offset follows from `general.alignment` as in
//! llama.cpp's `gguf.cpp`. Tensors of candle's types are then read by candle (`TensorInfo::read`);
//! MXFP4 tensors are read here ([`read_mxfp4`]).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;

use crate::model::hf::mxfp4;

/// GGML_MAX_DIMS (ggml.h): a tensor has at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// llama.cpp's `GGML_TYPE_MXFP4`.
pub const GGML_TYPE_MXFP4: u32 = 39;
/// Bytes of one `block_mxfp4` (ggml-common.h): an E8M0 scale byte, then 16 bytes of codes.
pub const MXFP4_BLOCK_BYTES: usize = 1 + mxfp4::BLOCK / 2;
/// llama.cpp's default `general.alignment`.
const DEFAULT_ALIGNMENT: u64 = 32;

/// How a tensor is stored: a ggml type candle-core reads, or MXFP4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    /// A type candle-core 0.11 reads (F32, F16, BF16, Q4_0 ... Q8_K).
    Ggml(GgmlDType),
    /// `GGML_TYPE_MXFP4` (39): 32 FP4 E2M1 values and one E8M0 scale in 17 bytes.
    Mxfp4,
}

impl TensorType {
    /// F32.
    pub const F32: TensorType = TensorType::Ggml(GgmlDType::F32);

    /// The type of ggml id `id`, or its name (or "unknown") when it is not supported.
    pub fn from_u32(id: u32) -> Result<Self, String> {
        if id == GGML_TYPE_MXFP4 {
            return Ok(TensorType::Mxfp4);
        }
        // candle-core's `GgmlDType::from_u32` (crate-private), ggml.h's ids.
        Ok(TensorType::Ggml(match id {
            0 => GgmlDType::F32,
            1 => GgmlDType::F16,
            2 => GgmlDType::Q4_0,
            3 => GgmlDType::Q4_1,
            6 => GgmlDType::Q5_0,
            7 => GgmlDType::Q5_1,
            8 => GgmlDType::Q8_0,
            9 => GgmlDType::Q8_1,
            10 => GgmlDType::Q2K,
            11 => GgmlDType::Q3K,
            12 => GgmlDType::Q4K,
            13 => GgmlDType::Q5K,
            14 => GgmlDType::Q6K,
            15 => GgmlDType::Q8K,
            30 => GgmlDType::BF16,
            _ => return Err(super::ggml_type_name(id).unwrap_or("unknown").to_string()),
        }))
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            TensorType::Ggml(d) => d.block_size(),
            TensorType::Mxfp4 => mxfp4::BLOCK,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            TensorType::Ggml(d) => d.type_size(),
            TensorType::Mxfp4 => MXFP4_BLOCK_BYTES,
        }
    }

    /// True for block types (every type but F32, F16 and BF16).
    pub fn is_block(self) -> bool {
        !matches!(
            self,
            TensorType::Ggml(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        )
    }

    /// The name messages and `inspect` show (candle's `Debug` name for its types).
    pub fn name(self) -> String {
        match self {
            TensorType::Ggml(d) => format!("{d:?}"),
            TensorType::Mxfp4 => "MXFP4".into(),
        }
    }
}

/// One entry of the tensor index.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Stored type.
    pub dtype: TensorType,
    /// Dimensions, outermost first (GGUF stores them innermost first).
    pub dims: Vec<usize>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// A reader that shows candle's `Content::read` a tensor count of 0 (the bytes at
/// `count_at..count_at + count_len` read as zeros), so that it parses the metadata and stops at
/// the tensor index. It keeps its own position, because candle asks for it before every string
/// and array (a `stream_position` through to the file would be a system call each time).
pub struct HideTensorCount<R> {
    inner: R,
    pos: u64,
    count_at: u64,
    count_len: u64,
}

impl<R: Read + Seek> HideTensorCount<R> {
    /// Wraps `inner`, positioned at the start of the file.
    pub fn new(inner: R, count_at: u64, count_len: u64) -> Self {
        Self {
            inner,
            pos: 0,
            count_at,
            count_len,
        }
    }

    /// The position (where candle stopped reading, once it has).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The wrapped reader, at [`HideTensorCount::position`].
    pub fn inner(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: Read> Read for HideTensorCount<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let (start, end) = (self.pos, self.pos + n as u64);
        let (h0, h1) = (self.count_at, self.count_at + self.count_len);
        for p in start.max(h0)..end.min(h1) {
            buf[(p - start) as usize] = 0;
        }
        self.pos = end;
        Ok(n)
    }
}

impl<R: Seek> Seek for HideTensorCount<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

/// The tensor count of a GGUF header (`head`: the file's first 16 bytes, or fewer) and where it
/// lies, `(count, at, len)`; `None` when the magic or version is not one candle reads (candle
/// then reports it).
pub fn tensor_count(head: &[u8]) -> Option<(u64, u64, u64)> {
    if head.len() < 16 || (&head[..4] != b"GGUF" && &head[..4] != b"FUGG") {
        return None;
    }
    let version = u32::from_le_bytes(head[4..8].try_into().ok()?);
    match version {
        1 => Some((
            u64::from(u32::from_le_bytes(head[8..12].try_into().ok()?)),
            8,
            4,
        )),
        2 | 3 => Some((u64::from_le_bytes(head[8..16].try_into().ok()?), 8, 8)),
        _ => None,
    }
}

/// Reads `count` tensor-index entries from `r` (at `pos`, in a file of `file_len` bytes, GGUF
/// `version`), returning them by name and the offset of the data section.
pub fn read_index<R: Read>(
    r: &mut R,
    mut pos: u64,
    file_len: u64,
    version: u32,
    count: u64,
    metadata: &HashMap<String, Value>,
) -> Result<(HashMap<String, Entry>, u64), String> {
    // Each entry is at least a name length, a dimension count, a type and an offset.
    let len_size: u64 = if version == 1 { 4 } else { 8 };
    let min_entry = len_size + 4 + 4 + 8;
    let remaining = file_len.saturating_sub(pos);
    if count.saturating_mul(min_entry) > remaining {
        return Err(format!(
            "the header declares {count} tensors, which need at least {} bytes of tensor index, but only {remaining} bytes remain in the {file_len}-byte file",
            count.saturating_mul(min_entry)
        ));
    }
    let mut read =
        |n: usize, pos: &mut u64, what: &dyn Fn() -> String| -> Result<Vec<u8>, String> {
            let mut b = vec![0u8; n];
            r.read_exact(&mut b).map_err(|_| {
            format!(
                "the tensor index is truncated: {} runs past the end of the {file_len}-byte file",
                what()
            )
        })?;
            *pos += n as u64;
            Ok(b)
        };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let length = |b: &[u8]| {
        if version == 1 {
            u64::from(u32_at(b))
        } else {
            u64_at(b)
        }
    };
    let mut entries = HashMap::with_capacity(count.min(1 << 16) as usize);
    for i in 0..count {
        let at = |i: u64| move || format!("tensor {i} of {count}");
        let name_len = length(&read(len_size as usize, &mut pos, &at(i))?);
        let left = file_len.saturating_sub(pos);
        if name_len > left {
            return Err(format!(
                "tensor {i} of {count}: its name is {name_len} bytes long, more than the {left} bytes left in the {file_len}-byte file"
            ));
        }
        let name = read(name_len as usize, &mut pos, &at(i))?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let named = || format!("tensor `{name}`");
        let n_dims = u32_at(&read(4, &mut pos, &named)?);
        if n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions, at most {MAX_DIMS} are allowed"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = if version == 1 {
                u64::from(u32_at(&read(4, &mut pos, &named)?))
            } else {
                u64_at(&read(8, &mut pos, &named)?)
            };
            dims.push(d);
        }
        let type_id = u32_at(&read(4, &mut pos, &named)?);
        let offset = u64_at(&read(8, &mut pos, &named)?);
        let dtype = TensorType::from_u32(type_id).map_err(|type_name| {
            format!(
                "tensor `{name}` has ggml type {type_id} ({type_name}), which cannot be read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, MXFP4)"
            )
        })?;
        // GGUF lists dimensions innermost first; the innermost is the row, which holds whole
        // blocks. Messages list them outermost first, as everywhere else.
        let shown: Vec<u64> = dims.iter().rev().copied().collect();
        let too_big = || {
            format!(
                "tensor `{name}` has shape {shown:?}, more values than the {file_len}-byte file can hold"
            )
        };
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}` ({} {shown:?}) has rows of {row} values, not a whole number of {block}-value blocks",
                dtype.name()
            ));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .filter(|&b| b <= file_len)
            .ok_or_else(too_big)?;
        let dims: Vec<usize> = dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).map_err(|_| too_big()))
            .collect::<Result<_, _>>()?;
        let entry = Entry {
            dtype,
            dims,
            offset,
            bytes,
        };
        if entries.insert(name.clone(), entry).is_some() {
            return Err(format!("tensor `{name}` appears twice in the tensor index"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U8(v)) => u64::from(*v),
        Some(Value::U16(v)) => u64::from(*v),
        Some(Value::U32(v)) => u64::from(*v),
        Some(Value::U64(v)) => *v,
        Some(Value::I8(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Value::I16(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Value::I32(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Value::I64(v)) => u64::try_from(*v).unwrap_or(0),
        Some(other) => {
            return Err(format!(
                "metadata `general.alignment` is {}, expected a power of two",
                super::config::describe(other)
            ));
        }
    };
    if !alignment.is_power_of_two() {
        return Err(format!(
            "metadata `general.alignment` is {alignment}, expected a power of two"
        ));
    }
    Ok((entries, pos.div_ceil(alignment) * alignment))
}

/// Rewrites one `block_mxfp4` (scale byte, then 16 bytes whose low nibbles are values 0-15 and
/// high nibbles values 16-31) into the project's MXFP4 layout: 16 bytes holding values 2k (low
/// nibble) and 2k + 1 (high) at byte k, and the scale. The scale byte means the same in both
/// (llama.cpp doubles the E2M1 table and halves the scale: `kvalues_mxfp4[c] * 2^(e - 128)` =
/// `E2M1(c) * 2^(e - 127)` for every e below 255), so only nibbles move.
pub fn repack_mxfp4_block(block: &[u8], codes: &mut [u8]) -> u8 {
    let qs = &block[1..MXFP4_BLOCK_BYTES];
    let code = |v: usize| {
        if v < 16 {
            qs[v] & 0x0f
        } else {
            qs[v - 16] >> 4
        }
    };
    for (k, c) in codes.iter_mut().enumerate().take(mxfp4::BLOCK / 2) {
        *c = code(2 * k) | (code(2 * k + 1) << 4);
    }
    block[0]
}

/// Reads `blocks` MXFP4 blocks from `r` (at the tensor's data) into the project's layout:
/// `(codes, scales)`, 16 bytes and 1 byte per block. Reads in chunks, so that the file's bytes are
/// never held twice.
pub fn read_mxfp4<R: Read>(r: &mut R, blocks: usize) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    const CHUNK: usize = 1 << 15;
    let mut codes = vec![0u8; blocks * (mxfp4::BLOCK / 2)];
    let mut scales = vec![0u8; blocks];
    let mut buf = vec![0u8; CHUNK.min(blocks) * MXFP4_BLOCK_BYTES];
    let mut done = 0;
    while done < blocks {
        let n = CHUNK.min(blocks - done);
        let raw = &mut buf[..n * MXFP4_BLOCK_BYTES];
        r.read_exact(raw)?;
        for (i, block) in raw.chunks_exact(MXFP4_BLOCK_BYTES).enumerate() {
            let b = done + i;
            let dst = &mut codes[b * 16..(b + 1) * 16];
            scales[b] = repack_mxfp4_block(block, dst);
        }
        done += n;
    }
    Ok((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `dequantize_row_mxfp4` (ggml-quants.c) transcribed: `kvalues_mxfp4` (the
    /// E2M1 values doubled) times `GGML_E8M0_TO_FP32_HALF(e)` = 2^(e - 128), value j from the low
    /// nibble of `qs[j]`, value j + 16 from its high nibble.
    fn ggml_dequantize(block: &[u8]) -> Vec<f64> {
        const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
        let d = 2f64.powi(i32::from(block[0]) - 128);
        let mut y = vec![0f64; 32];
        for j in 0..16 {
            y[j] = f64::from(KVALUES[usize::from(block[1 + j] & 0x0f)]) * d;
            y[j + 16] = f64::from(KVALUES[usize::from(block[1 + j] >> 4)]) * d;
        }
        y
    }

    /// The values the model multiplies with: the project's MXFP4 matrix decoded to f32.
    fn project_values(codes: &[u8], scale: u8) -> Vec<f64> {
        crate::model::quant::QuantMatrix::mxfp4(codes.to_vec(), vec![scale], 1, 32)
            .unwrap()
            .dequantize_rows(0, 1)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    #[test]
    fn a_hand_computed_block_dequantises_as_llama_cpp_does() {
        // Scale 128: 2^(128 - 128) x kvalues = 2 x E2M1. qs[0] = 0x9A: value 0 from the low
        // nibble A (-1 -> kvalue -2 -> -2.0), value 16 from the high nibble 9 (-0.5 -> -1.0).
        // qs[1] = 0x71: value 1 = code 1 (0.5 -> 1.0), value 17 = code 7 (6 -> 12.0).
        // qs[15] = 0xF8: value 15 = code 8 (-0), value 31 = code F (-6 -> -12.0).
        let mut block = [0u8; 17];
        block[0] = 128;
        block[1] = 0x9a;
        block[2] = 0x71;
        block[16] = 0xf8;
        let want = ggml_dequantize(&block);
        assert_eq!(
            (want[0], want[16], want[1], want[17], want[31]),
            (-2.0, -1.0, 1.0, 12.0, -12.0)
        );
        let mut codes = [0u8; 16];
        let scale = repack_mxfp4_block(&block, &mut codes);
        assert_eq!(scale, 128);
        // The project's layout: byte k holds values 2k (low) and 2k + 1 (high).
        assert_eq!(codes[0], 0x1a, "values 0 (A) and 1 (1)");
        assert_eq!(codes[8], 0x79, "values 16 (9) and 17 (7)");
        assert_eq!(codes[15], 0xf0, "values 30 (0) and 31 (F)");
        let got = project_values(&codes, scale);
        // (Code 8 is -0 in the project's table and +0 in llama.cpp's integer one: equal.)
        assert_eq!(got, want);
    }

    #[test]
    fn every_code_at_every_finite_scale_matches_llama_cpp() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for e in 0..=254u8 {
            let mut block = [0u8; 17];
            block[0] = e;
            for b in &mut block[1..] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = (state >> 24) as u8;
            }
            let mut codes = [0u8; 16];
            let scale = repack_mxfp4_block(&block, &mut codes);
            let want = ggml_dequantize(&block);
            let got = project_values(&codes, scale);
            // f32 holds E2M1 x 2^k exactly unless it overflows (4 and 6 x 2^127 at e = 254).
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                if w.abs() <= f64::from(f32::MAX) {
                    assert_eq!(g, w, "e {e} value {j}");
                } else {
                    assert!(
                        g.is_infinite() && g.signum() == w.signum(),
                        "e {e} value {j}"
                    );
                }
            }
        }
        // All 16 codes in every position.
        let mut block = [0u8; 17];
        block[0] = 127;
        for j in 0..16 {
            block[1 + j] = (j as u8) | (((15 - j) as u8) << 4);
        }
        let mut codes = [0u8; 16];
        let s = repack_mxfp4_block(&block, &mut codes);
        assert_eq!(project_values(&codes, s), ggml_dequantize(&block));
    }

    #[test]
    fn chunked_reads_repack_every_block() {
        let blocks = (1 << 15) + 3;
        let raw: Vec<u8> = (0..blocks * MXFP4_BLOCK_BYTES)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let (codes, scales) = read_mxfp4(&mut raw.as_slice(), blocks).unwrap();
        for b in [0, 1, 1 << 15, blocks - 1] {
            let block = &raw[b * 17..(b + 1) * 17];
            let mut want = [0u8; 16];
            assert_eq!(scales[b], repack_mxfp4_block(block, &mut want));
            assert_eq!(&codes[b * 16..(b + 1) * 16], &want);
        }
        assert!(read_mxfp4(&mut &raw[..100], blocks).is_err(), "short data");
    }

    /// One v3 index entry: name, dimensions (innermost first), type, offset.
    fn entry(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut b = (name.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b
    }

    #[test]
    fn the_index_is_read_and_checked() {
        let mut idx = entry("a", &[64, 3], GGML_TYPE_MXFP4, 0);
        idx.extend(entry("b", &[5], 0, 256));
        let start = 100u64;
        let end = start + idx.len() as u64;
        let meta = |align: Option<Value>| -> HashMap<String, Value> {
            align
                .map(|v| ("general.alignment".to_string(), v))
                .into_iter()
                .collect()
        };
        let (t, data) = read_index(&mut idx.as_slice(), start, 10_000, 3, 2, &meta(None)).unwrap();
        assert_eq!(data, end.div_ceil(32) * 32);
        assert_eq!(t["a"].dims, [3, 64], "outermost first");
        assert_eq!(
            (t["a"].dtype, t["a"].bytes),
            (TensorType::Mxfp4, 3 * 2 * 17)
        );
        assert_eq!((t["b"].bytes, t["b"].offset), (20, 256));
        let (_, data) = read_index(
            &mut idx.as_slice(),
            start,
            10_000,
            3,
            2,
            &meta(Some(Value::U32(64))),
        )
        .unwrap();
        assert_eq!(data, end.div_ceil(64) * 64);
        let err = |bytes: &[u8], count: u64, m: HashMap<String, Value>| {
            read_index(&mut &bytes[..], start, 10_000, 3, count, &m).unwrap_err()
        };
        let e = err(&idx, 2, meta(Some(Value::U32(24))));
        assert!(e.contains("`general.alignment` is 24"), "{e}");
        let mut twice = idx.clone();
        twice.extend(entry("a", &[32], 0, 512));
        let e = err(&twice, 3, meta(None));
        assert!(e.contains("`a` appears twice"), "{e}");
        let e = err(&entry("c", &[48], 8, 0), 1, meta(None));
        assert!(
            e.contains("rows of 48 values") && e.contains("32-value blocks"),
            "{e}"
        );
        let e = err(&idx[..idx.len() - 3], 2, meta(None));
        assert!(e.contains("truncated") && e.contains("`b`"), "{e}");
    }

    #[test]
    fn the_hidden_count_reads_as_zero_only_there() {
        let data: Vec<u8> = (0..40u8).collect();
        let mut r = HideTensorCount::new(std::io::Cursor::new(data), 8, 8);
        let mut a = [0u8; 10];
        r.read_exact(&mut a).unwrap();
        assert_eq!(a, [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]);
        let mut b = [0u8; 10];
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 16, 17, 18, 19]);
        assert_eq!(r.stream_position().unwrap(), 20);
        r.seek(SeekFrom::Start(12)).unwrap();
        let mut c = [0u8; 6];
        r.read_exact(&mut c).unwrap();
        assert_eq!(c, [0, 0, 0, 0, 16, 17]);
    }
}
