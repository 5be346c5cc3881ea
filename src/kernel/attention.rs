//! Causal self-attention of a whole pass (eval, prefill) on plain slices: the scores, their
//! softmax and the weighted sum of the values in one kernel, per key/value head for every query
//! head it serves.
//!
//! Through candle the same step is a dozen tensor operations per layer: repeat the key/value
//! heads for grouped queries, transpose the keys, a batched matmul of per-head sizes, scale, add
//! the mask, softmax, a second batched matmul, transpose back. Each allocates and passes over a
//! `[batch, heads, seq, keys]` or `[batch, heads, seq, head_dim]` tensor; together they were
//! about 30% of an eval pass's CPU samples at d 1024 under `amx`, more than the experts
//! (`docs/benchmarks.md`, "Fused attention, LM heads in place, decode projections"). Here the
//! scores of a few query rows live in a small buffer, the mask is the loops' bounds, and the
//! output is written where the output projection reads it.
//!
//! Every row's scores are dot products computed as `q[0] k[0] + q[1] k[1] + ...` (one FMA chain
//! per score, in `head_dim` order) and its outputs as two FMA chains per value column (even and
//! odd keys, each in key order), so the result does not depend on the thread count or on where a
//! row falls in a block. The decode kernel ([`attend_one`]) shares the softmax and the weighted
//! sum.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Portable, Simd};
use super::split;
use super::{KernelVariant, SharedOut};

/// Query rows whose scores are computed together: each key vector loaded feeds this many rows.
const ROWS: usize = 4;

/// The shape of one attention pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Query rows per sequence (this pass's tokens).
    pub seq: usize,
    /// Key positions per sequence: the cached ones, then this pass's (`>= seq`).
    pub keys: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; each serves `n_heads / n_kv_heads` consecutive query heads.
    pub n_kv_heads: usize,
    /// Width of a query or key head.
    pub head_dim: usize,
    /// Width of a value head (and of the output's heads): `head_dim` but in latent attention.
    pub v_dim: usize,
    /// A query sees itself and the `window - 1` positions before it, not further back.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Keys query row `i` sees: `lo..hi`. Row `i` is at position `keys - seq + i`.
    fn visible(&self, i: usize) -> (usize, usize) {
        let pos = self.keys - self.seq + i;
        let lo = match self.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        (lo, pos + 1)
    }

    fn check(&self, q: usize, k: usize, v: usize, out: usize, sinks: Option<usize>) {
        let s = self;
        assert!(s.keys >= s.seq, "{} keys for {} query rows", s.keys, s.seq);
        assert!(
            s.n_kv_heads > 0 && s.n_heads.is_multiple_of(s.n_kv_heads),
            "{} query heads over {} key/value heads",
            s.n_heads,
            s.n_kv_heads
        );
        assert!(s.window != Some(0), "a window of 0 positions sees nothing");
        assert_eq!(q, s.batch * s.n_heads * s.seq * s.head_dim, "q");
        assert_eq!(k, s.batch * s.n_kv_heads * s.keys * s.head_dim, "k");
        assert_eq!(v, s.batch * s.n_kv_heads * s.keys * s.v_dim, "v");
        assert_eq!(out, s.batch * s.seq * s.n_heads * s.v_dim, "out");
        if let Some(n) = sinks {
            assert_eq!(n, s.n_heads, "sinks");
        }
    }
}

/// `out = softmax(q k^T * scale + causal mask) v` for every sequence and head.
///
/// Layouts: `q` `[batch, n_heads, seq, head_dim]`; `k` `[batch, n_kv_heads, keys, head_dim]`;
/// `v` `[batch, n_kv_heads, keys, v_dim]`; `out` `[batch, seq, n_heads, v_dim]` (the rows the
/// output projection takes).
/// With `sinks` (`[n_heads]`), head `h`'s logit `sinks[h]` joins every softmax denominator as a
/// key without a value (gpt-oss). The exact variants run as they are; the rounding ones
/// (`Avx512Bf16`, `Amx`) and `Gemm` run `Avx512`, and `Auto` the best this CPU has: attention
/// stays in f32. Work is spread over the rayon pool.
///
/// # Panics
/// When the slices do not match `shape`, `n_heads` is not a multiple of `n_kv_heads`, or
/// `variant` cannot run on this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention(
    variant: KernelVariant,
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
) {
    shape.check(
        q.len(),
        k.len(),
        v.len(),
        out.len(),
        sinks.map(<[f32]>::len),
    );
    let isa = Isa::of(variant);
    if shape.seq == 0 || shape.v_dim == 0 || shape.batch == 0 || shape.n_heads == 0 {
        return;
    }
    let tasks = tasks(shape, rayon::current_num_threads());
    let job = Job {
        shape: *shape,
        q,
        k,
        v,
        sinks,
        scale,
        out: SharedOut(out.as_mut_ptr()),
    };
    let job = &job;
    if tasks.len() == 1 {
        return job.run(isa, tasks[0]);
    }
    rayon::in_place_scope(|s| {
        for &t in &tasks[1..] {
            s.spawn(move |_| job.run(isa, t));
        }
        job.run(isa, tasks[0]);
    });
}

/// One task: sequence `b`, key/value head `g` (with its query heads), query rows `r0..r1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Task {
    b: usize,
    g: usize,
    r0: usize,
    r1: usize,
}

/// Every (sequence, key/value head), each whole when there are at least as many as threads;
/// otherwise each one's rows cut into spans of about equal work (a causal row's work grows with
/// its position), so that a single sequence with one key/value head still uses every thread.
fn tasks(s: &AttentionShape, threads: usize) -> Vec<Task> {
    let units = s.batch * s.n_kv_heads;
    let parts = if units >= threads {
        1
    } else {
        threads.div_ceil(units).min(s.seq.div_ceil(ROWS)).max(1)
    };
    let cost = |i: usize| {
        let (lo, hi) = s.visible(i);
        (hi - lo) as u64 + 1
    };
    let total: u64 = (0..s.seq).map(cost).sum();
    let mut bounds = vec![0];
    let mut acc = 0u64;
    for i in 0..s.seq {
        acc += cost(i);
        let next = bounds.len() as u64;
        // Cut after row `i` once the rows so far hold `next / parts` of the work, on a block
        // boundary so that every span but the last fills whole blocks of `ROWS`.
        if next < parts as u64 && acc * parts as u64 >= total * next && (i + 1) % ROWS == 0 {
            bounds.push(i + 1);
        }
    }
    bounds.push(s.seq);
    let mut out = Vec::with_capacity(units * parts);
    for b in 0..s.batch {
        for g in 0..s.n_kv_heads {
            for w in bounds.windows(2).filter(|w| w[0] < w[1]) {
                out.push(Task {
                    b,
                    g,
                    r0: w[0],
                    r1: w[1],
                });
            }
        }
    }
    out
}

struct Job<'a> {
    shape: AttentionShape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    sinks: Option<&'a [f32]>,
    scale: f32,
    /// Each task writes only its own rows and heads.
    out: SharedOut,
}

impl Job<'_> {
    fn run(&self, isa: Isa, t: Task) {
        // SAFETY: `Isa::of` checked the CPU feature of the variant; `check` the slice lengths;
        // `tasks` gives every task its own rows and heads of `out`.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => task_avx2(self, t),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => task_avx512(self, t),
                _ => task::<Portable>(self, t),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2(job: &Job, t: Task) {
    // SAFETY: this function enables what `Avx2` uses; the caller checked the CPU.
    unsafe { task::<Avx2>(job, t) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn task_avx512(job: &Job, t: Task) {
    // SAFETY: this function enables what `Avx512` uses; the caller checked the CPU.
    unsafe { task::<Avx512>(job, t) }
}

/// One task: the keys it needs transposed once (`kt`, `[head_dim, columns]`, columns padded to a
/// whole register with zeros), then for each query head and each block of [`ROWS`] rows: scores
/// into `sc`, softmax in place, and the weighted sum of values into `out`.
///
/// # Safety
/// The CPU has what `S` needs; the slices match the shape; no other task writes this task's
/// part of `out`.
#[inline(always)]
unsafe fn task<S: Simd>(job: &Job, t: Task) {
    let s = &job.shape;
    let (hd, vd, w) = (s.head_dim, s.v_dim, S::W);
    let group = s.n_heads / s.n_kv_heads;
    // Columns start at a whole register of absolute key positions, so that a row's sums see the
    // same lanes whichever task it falls in (the same bits for every thread count).
    let jlo = s.visible(t.r0).0 / w * w;
    let (_, jhi) = s.visible(t.r1 - 1);
    let nk = jhi - jlo;
    let cols = nk.next_multiple_of(w);
    let k0 = ((t.b * s.n_kv_heads + t.g) * s.keys + jlo) * hd;
    let v0 = ((t.b * s.n_kv_heads + t.g) * s.keys + jlo) * vd;
    let (kh, vh) = (&job.k[k0..k0 + nk * hd], &job.v[v0..v0 + nk * vd]);
    let mut kt = vec![0f32; hd * cols];
    for (j, row) in kh.chunks(hd.max(1)).take(nk).enumerate() {
        for (d, &x) in row.iter().enumerate() {
            kt[d * cols + j] = x;
        }
    }
    let mut sc = vec![0f32; ROWS * cols];
    for h in t.g * group..(t.g + 1) * group {
        let q0 = (t.b * s.n_heads + h) * s.seq * hd;
        let qh = &job.q[q0..q0 + s.seq * hd];
        let sink = job.sinks.map(|sk| sk[h]);
        let mut i0 = t.r0;
        while i0 < t.r1 {
            let m = (t.r1 - i0).min(ROWS);
            let (blo, _) = s.visible(i0);
            let (_, bhi) = s.visible(i0 + m - 1);
            // Score columns `c_lo..c_hi` (relative to `jlo`, whole registers) cover every key
            // one of the block's rows sees.
            let c_lo = (blo - jlo) / w * w;
            let c_hi = (bhi - jlo).next_multiple_of(w);
            let rows: [*const f32; ROWS] =
                std::array::from_fn(|r| qh.as_ptr().wrapping_add((i0 + r.min(m - 1)) * hd));
            // SAFETY: the columns stay inside `kt`'s and `sc`'s `cols`; each row pointer has `hd`
            // values.
            unsafe { scores::<S>(&rows, &kt, cols, hd, c_lo, c_hi, &mut sc) };
            let mut inv = [0f32; ROWS];
            for (r, inv) in inv.iter_mut().enumerate().take(m) {
                let (lo, hi) = s.visible(i0 + r);
                let row = &mut sc[r * cols..(r + 1) * cols];
                // SAFETY: `c_lo..c_hi` are whole registers inside the row.
                *inv =
                    unsafe { softmax::<S>(row, c_lo, c_hi, lo - jlo, hi - jlo, job.scale, sink) };
            }
            for r in 0..m {
                let o = ((t.b * s.seq + i0 + r) * s.n_heads + h) * vd;
                // SAFETY: element `o..o + vd` of `out` belongs to this task (its sequence, row
                // and head), and `out` has them (`check`).
                let dst = unsafe { std::slice::from_raw_parts_mut(job.out.at(o), vd) };
                let (lo, hi) = s.visible(i0 + r);
                let p = &sc[r * cols + (lo - jlo)..r * cols + (hi - jlo)];
                let v = &vh[(lo - jlo) * vd..(hi - jlo) * vd];
                // SAFETY: `p` and `v` hold the same keys; `dst` has `vd` values.
                unsafe { weighted_sum::<S>(p, v, vd, vd, inv[r], dst) };
            }
            i0 += m;
        }
    }
}

/// `sc[r][c] = q_r . k_c` for the block's rows and columns `c_lo..c_hi` (multiples of `S::W`):
/// two registers of keys against [`ROWS`] rows per step of `d`.
///
/// # Safety
/// The CPU has what `S` needs; `c_hi <= cols`; `kt` is `[hd, cols]`, `sc` `[ROWS, cols]`, and
/// each row pointer has `hd` values.
#[inline(always)]
unsafe fn scores<S: Simd>(
    rows: &[*const f32; ROWS],
    kt: &[f32],
    cols: usize,
    hd: usize,
    c_lo: usize,
    c_hi: usize,
    sc: &mut [f32],
) {
    let w = S::W;
    let mut c = c_lo;
    // SAFETY: every load reads `kt[d * cols + c ..][..n * w]` with `c + n * w <= c_hi <= cols`,
    // every store `sc[r * cols + c ..][..n * w]`; rows have `hd` values.
    unsafe {
        while c + 2 * w <= c_hi {
            let mut acc = [[S::zero(); 2]; ROWS];
            for d in 0..hd {
                let kp = kt.as_ptr().add(d * cols + c);
                let kv = [S::load(kp), S::load(kp.add(w))];
                for (r, a) in acc.iter_mut().enumerate() {
                    let qb = S::splat(*rows[r].add(d));
                    a[0] = S::fma(qb, kv[0], a[0]);
                    a[1] = S::fma(qb, kv[1], a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let sp = sc.as_mut_ptr().add(r * cols + c);
                S::store(sp, a[0]);
                S::store(sp.add(w), a[1]);
            }
            c += 2 * w;
        }
        while c < c_hi {
            let mut acc = [S::zero(); ROWS];
            for d in 0..hd {
                let kv = S::load(kt.as_ptr().add(d * cols + c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(S::splat(*rows[r].add(d)), kv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                S::store(sc.as_mut_ptr().add(r * cols + c), *a);
            }
            c += w;
        }
    }
}

/// One row's softmax in place over the visible columns `a..z` (inside `c_lo..c_hi`, which are
/// whole registers): `exp(x * scale - max)`, every other column of `c_lo..c_hi` zero. Returns
/// `1 / sum`, the sink's term included.
///
/// # Safety
/// The CPU has what `S` needs; `c_lo <= a < z <= c_hi <= row.len()`, `c_lo` and `c_hi`
/// multiples of `S::W`.
#[inline(always)]
unsafe fn softmax<S: Simd>(
    row: &mut [f32],
    c_lo: usize,
    c_hi: usize,
    a: usize,
    z: usize,
    scale: f32,
    sink: Option<f32>,
) -> f32 {
    let w = S::W;
    // Columns no query of this row sees take no part in the maximum.
    row[c_lo..a].fill(f32::NEG_INFINITY);
    row[z..c_hi].fill(f32::NEG_INFINITY);
    // SAFETY: every access is a whole register inside `c_lo..c_hi`.
    unsafe {
        let p = row.as_mut_ptr();
        let mut mv = S::splat(f32::NEG_INFINITY);
        let mut c = c_lo;
        while c < c_hi {
            mv = S::max(mv, S::load(p.add(c)));
            c += w;
        }
        let mut lanes = [f32::NEG_INFINITY; 16];
        S::store(lanes.as_mut_ptr(), mv);
        let max_score = lanes[..w].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // `scale > 0`, so the largest score is the largest scaled one.
        let mut max = max_score * scale;
        if let Some(sk) = sink {
            max = max.max(sk);
        }
        let (sv, mx) = (S::splat(scale), S::splat(-max));
        let mut c = c_lo;
        while c < c_hi {
            let x = S::fma(S::load(p.add(c)), sv, mx);
            S::store(p.add(c), S::exp(x));
            c += w;
        }
        row[c_lo..a].fill(0.0);
        row[z..c_hi].fill(0.0);
        let p = row.as_ptr();
        let mut sum = S::zero();
        let mut c = c_lo;
        while c < c_hi {
            sum = S::add(sum, S::load(p.add(c)));
            c += w;
        }
        let mut total = S::hsum(sum);
        if let Some(sk) = sink {
            total += (sk - max).exp();
        }
        1.0 / total
    }
}

/// `dst = inv * sum over j of p[j] * v_j`, with value row `j` at `v[j * stride..][..width]`:
/// up to four registers of columns at a time, each with one accumulator for even and one for odd
/// keys (two independent FMA chains even for a head of one or two registers, as the embedded
/// model's 32), then the columns left one by one.
///
/// # Safety
/// The CPU has what `S` needs; `v` holds `(p.len() - 1) * stride + width` values (none read when
/// `p` is empty); `dst.len() == width`.
#[inline(always)]
unsafe fn weighted_sum<S: Simd>(
    p: &[f32],
    v: &[f32],
    stride: usize,
    width: usize,
    inv: f32,
    dst: &mut [f32],
) {
    let w = S::W;
    let mut x = 0;
    // SAFETY: each chunk reads and writes `regs * w` columns at `x + regs * w <= width`.
    unsafe {
        while x + w <= width {
            let regs = ((width - x) / w).min(4);
            // A constant register count keeps the accumulators in registers.
            match regs {
                4 => weighted_chunk::<S, 4>(p, v, stride, x, inv, dst),
                3 => weighted_chunk::<S, 3>(p, v, stride, x, inv, dst),
                2 => weighted_chunk::<S, 2>(p, v, stride, x, inv, dst),
                _ => weighted_chunk::<S, 1>(p, v, stride, x, inv, dst),
            }
            x += regs * w;
        }
    }
    for (xi, o) in dst.iter_mut().enumerate().skip(x) {
        let mut acc = 0f32;
        for (j, &pj) in p.iter().enumerate() {
            acc += pj * v[j * stride + xi];
        }
        *o = acc * inv;
    }
}

/// Columns `x..x + R * S::W` of [`weighted_sum`].
///
/// # Safety
/// As [`weighted_sum`], and `x + R * S::W <= width`.
#[inline(always)]
unsafe fn weighted_chunk<S: Simd, const R: usize>(
    p: &[f32],
    v: &[f32],
    stride: usize,
    x: usize,
    inv: f32,
    dst: &mut [f32],
) {
    let w = S::W;
    // SAFETY: every load reads `v[j * stride + x ..][..R * w]`, every store `dst[x..][..R * w]`,
    // inside the slices by the contract.
    unsafe {
        let mut even = [S::zero(); R];
        let mut odd = [S::zero(); R];
        let mut j = 0;
        while j + 2 <= p.len() {
            let (pe, po) = (S::splat(p[j]), S::splat(p[j + 1]));
            let ve = v.as_ptr().add(j * stride + x);
            let vo = ve.add(stride);
            for r in 0..R {
                even[r] = S::fma(pe, S::load(ve.add(r * w)), even[r]);
                odd[r] = S::fma(po, S::load(vo.add(r * w)), odd[r]);
            }
            j += 2;
        }
        if j < p.len() {
            let (pe, ve) = (S::splat(p[j]), v.as_ptr().add(j * stride + x));
            for (r, e) in even.iter_mut().enumerate() {
                *e = S::fma(pe, S::load(ve.add(r * w)), *e);
            }
        }
        let iv = S::splat(inv);
        for (r, (e, o)) in even.iter().zip(&odd).enumerate() {
            S::store(dst.as_mut_ptr().add(x + r * w), S::mul(S::add(*e, *o), iv));
        }
    }
}

/// The shape of one decode step's attention: one query row per head against the cached
/// positions `first..keys`, stored position-major as the lean decoder keeps them: position `j`'s
/// keys (and values) for every key/value head in one row of `n_kv_heads * head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; each serves `n_heads / n_kv_heads` consecutive query heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// First position the query sees (a sliding window's start, else 0).
    pub first: usize,
    /// Cached positions, the query's own last.
    pub keys: usize,
}

/// `out[h] = softmax(q[h] . k[j] * scale for j in first..keys) . v` for every head `h`, split over
/// the rayon pool by heads when the step is long enough. `q` and `out` are `[n_heads *
/// head_dim]`; `k` and `v` `[keys, n_kv_heads * head_dim]` (more rows are ignored); `scores` is
/// scratch of at least [`scores_len`]`(keys - first)` floats (a split allocates unless it holds
/// that many per thread).
/// With `sinks` (`[n_heads]`), head `h`'s logit joins the softmax denominator. A step at a long
/// context spends its time here: 1500 cached positions took 14 of 18 ms of an olmoe-d1024 step
/// in scalar code.
///
/// # Panics
/// When the slices are shorter than the shape says, `first >= keys`, the heads do not group, or
/// `variant` cannot run on this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_one(
    variant: KernelVariant,
    s: &DecodeShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (nh, hd) = (s.n_heads, s.head_dim);
    let row = s.n_kv_heads * hd;
    assert!(s.first < s.keys, "no position to attend to");
    assert!(
        s.n_kv_heads > 0 && nh.is_multiple_of(s.n_kv_heads),
        "{nh} query heads over {} key/value heads",
        s.n_kv_heads
    );
    assert!(q.len() >= nh * hd && out.len() >= nh * hd, "q / out");
    assert!(k.len() >= s.keys * row && v.len() >= s.keys * row, "k / v");
    assert!(scores.len() >= scores_len(s.keys - s.first), "scores");
    if let Some(sk) = sinks {
        assert!(sk.len() >= nh, "sinks");
    }
    let isa = Isa::of(variant);
    let job = OneJob {
        s,
        q,
        k,
        v,
        sinks,
        scale,
    };
    // A long context is worth the other threads: the heads are cut into one contiguous range
    // per thread, each with its own run of scores (from `scores` when it holds one per thread).
    let threads = split::parts().min(nh);
    let macs = (s.keys - s.first) * nh * hd;
    if threads < 2 || macs < split::split_from(ONE_SPLIT_MIN_MACS, ONE_POOL_SPLIT_MIN_MACS) {
        return job.run(isa, 0..nh, scores, &mut out[..nh * hd]);
    }
    let per = nh.div_ceil(threads);
    let len = scores_len(s.keys - s.first);
    let mut own: Vec<f32> = Vec::new();
    let scratch: &mut [f32] = if scores.len() >= threads * len {
        scores
    } else {
        own.resize(threads * len, 0.0);
        &mut own
    };
    let work: Vec<_> = out[..nh * hd]
        .chunks_mut(per * hd)
        .zip(scratch.chunks_mut(len))
        .enumerate()
        .collect();
    let job = &job;
    split::each(work, |(p, (dst, sc))| {
        let h0 = p * per;
        job.run(isa, h0..h0 + dst.len() / hd, sc, dst);
    });
}

/// Multiply-adds of a decode step's attention from which [`attend_one`] splits the heads over
/// the rayon pool when called from outside it: about 1000 cached positions of 16 heads of 64.
const ONE_SPLIT_MIN_MACS: usize = 1 << 20;
/// The same from a pool thread (the lean decoder's), whose split costs about 1 us: a few
/// microseconds of work (128 positions of 16 heads of 64). The embedded model's steps (at most
/// 256 positions of 4 heads of 32) stay whole.
const ONE_POOL_SPLIT_MIN_MACS: usize = 1 << 17;

/// The inputs of [`attend_one`], shared by the threads.
#[derive(Clone, Copy)]
struct OneJob<'a> {
    s: &'a DecodeShape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    sinks: Option<&'a [f32]>,
    scale: f32,
}

impl OneJob<'_> {
    /// Heads `heads` into `out` (their rows only).
    fn run(&self, isa: Isa, heads: std::ops::Range<usize>, scores: &mut [f32], out: &mut [f32]) {
        // SAFETY: `attend_one` checked the lengths and `Isa::of` the CPU.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => one_avx2(self, heads, scores, out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => one_avx512(self, heads, scores, out),
                _ => one_body::<Portable>(self, heads, scores, out),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_avx2(
    job: &OneJob,
    heads: std::ops::Range<usize>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY: this function enables what `Avx2` uses; the caller checked CPU and lengths.
    unsafe { one_body::<Avx2>(job, heads, scores, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn one_avx512(
    job: &OneJob,
    heads: std::ops::Range<usize>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY: this function enables what `Avx512` uses; the caller checked CPU and lengths.
    unsafe { one_body::<Avx512>(job, heads, scores, out) }
}

/// Heads `heads` into `out` (which starts at the first of them). Per head: scores four keys at a
/// time (four independent FMA chains, one tree-shaped sum each), then the pass kernel's softmax
/// and weighted sum of the values.
///
/// # Safety
/// The CPU has what `S` needs; the slices are as [`attend_one`] checked.
#[inline(always)]
unsafe fn one_body<S: Simd>(
    job: &OneJob,
    heads: std::ops::Range<usize>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let OneJob {
        s,
        q,
        k,
        v,
        sinks,
        scale,
    } = *job;
    const KEYS: usize = 4;
    let (hd, w) = (s.head_dim, S::W);
    let row = s.n_kv_heads * hd;
    let group = s.n_heads / s.n_kv_heads;
    let n = s.keys - s.first;
    let cols = n.next_multiple_of(w);
    let full = hd / w * w;
    let sc = &mut scores[..cols];
    let h0 = heads.start;
    for h in heads {
        let off = (h / group) * hd;
        let qh = &q[h * hd..(h + 1) * hd];
        let key = |j: usize| &k[(s.first + j) * row + off..][..hd];
        // SAFETY: every load reads `w` values at `d + w <= full <= hd` of a head's row.
        unsafe {
            let mut j = 0;
            while j < n {
                let m = (n - j).min(KEYS);
                let mut acc = [S::zero(); KEYS];
                let rows: [*const f32; KEYS] =
                    std::array::from_fn(|t| key(j + t.min(m - 1)).as_ptr());
                let mut d = 0;
                while d < full {
                    let qv = S::load(qh.as_ptr().add(d));
                    for (a, r) in acc.iter_mut().zip(&rows) {
                        *a = S::fma(qv, S::load(r.add(d)), *a);
                    }
                    d += w;
                }
                for (t, a) in acc.iter().enumerate().take(m) {
                    let kr = key(j + t);
                    let mut dot = S::hsum(*a);
                    for x in full..hd {
                        dot += qh[x] * kr[x];
                    }
                    sc[j + t] = dot;
                }
                j += m;
            }
        }
        let sink = sinks.map(|sk| sk[h]);
        // SAFETY: `0..cols` are whole registers of `sc`, and `0 < n <= cols`.
        let inv = unsafe { softmax::<S>(sc, 0, cols, 0, n, scale, sink) };
        let dst = &mut out[(h - h0) * hd..(h - h0 + 1) * hd];
        // SAFETY: value row `j` is `v[(first + j) * row + off..][..hd]`, inside `v` for `j < n`
        // (`off + hd <= row`, `first + n == keys`); `dst` has `hd` values.
        unsafe {
            weighted_sum::<S>(&sc[..n], &v[s.first * row + off..], row, hd, inv, dst);
        }
    }
}

/// Scratch floats [`attend_one`] needs for `positions` cached positions: whole registers of the
/// widest SIMD level, so that the softmax of the pass kernel runs on them as it is.
pub(crate) fn scores_len(positions: usize) -> usize {
    positions.next_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition in f64: per sequence, head and query row, the visible keys' scaled
    /// dot products, their softmax (with the sink in the denominator) and the weighted values.
    fn reference(
        s: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sinks: Option<&[f32]>,
        scale: f32,
    ) -> Vec<f64> {
        let (hd, vd) = (s.head_dim, s.v_dim);
        let mut out = vec![0f64; s.batch * s.seq * s.n_heads * vd];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                let g = h / (s.n_heads / s.n_kv_heads);
                for i in 0..s.seq {
                    let pos = s.keys - s.seq + i;
                    let qi = &q[((b * s.n_heads + h) * s.seq + i) * hd..][..hd];
                    let kv = |t: &[f32], j: usize, n: usize| -> Vec<f64> {
                        t[((b * s.n_kv_heads + g) * s.keys + j) * n..][..n]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    };
                    let vis: Vec<usize> = (0..=pos)
                        .filter(|&j| s.window.is_none_or(|w| j + w > pos))
                        .collect();
                    let logits: Vec<f64> = vis
                        .iter()
                        .map(|&j| {
                            let kj = kv(k, j, hd);
                            qi.iter().zip(&kj).map(|(&a, b)| a as f64 * b).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let sink = sinks.map(|sk| sk[h] as f64);
                    let max = logits
                        .iter()
                        .copied()
                        .chain(sink)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let den: f64 = logits.iter().map(|l| (l - max).exp()).sum::<f64>()
                        + sink.map_or(0.0, |sk| (sk - max).exp());
                    let o = &mut out[((b * s.seq + i) * s.n_heads + h) * vd..][..vd];
                    for (&j, l) in vis.iter().zip(&logits) {
                        let p = (l - max).exp() / den;
                        for (oo, vv) in o.iter_mut().zip(kv(v, j, vd)) {
                            *oo += p * vv;
                        }
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn isas() -> Vec<KernelVariant> {
        let mut seen = Vec::new();
        KernelVariant::testable()
            .into_iter()
            .filter(|&v| {
                let isa = Isa::of(v);
                let new = !seen.contains(&isa);
                seen.push(isa);
                new
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(
        batch: usize,
        seq: usize,
        keys: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            keys,
            n_heads,
            n_kv_heads,
            head_dim,
            v_dim: head_dim,
            window,
        }
    }

    #[test]
    fn matches_f64_reference_every_variant_thread_count_and_shape() {
        let cases = [
            // (shape, sinks): grouped heads, a head narrower than a register, partial blocks.
            (shape(2, 7, 7, 4, 2, 8, None), false),
            // A cache before the pass, a head with a tail after whole registers.
            (shape(1, 9, 14, 2, 1, 20, None), false),
            // gpt-oss: sliding window and sinks, the window shorter than the pass.
            (shape(1, 33, 38, 4, 2, 64, Some(9)), true),
            // One decode row against a long cache, head_dim 128.
            (shape(2, 1, 41, 4, 4, 128, None), false),
            // Many blocks, one key/value head (rows split over threads), window > pass.
            (shape(1, 70, 70, 3, 1, 48, Some(100)), true),
            // Latent attention expanded: values narrower than queries and keys.
            (
                AttentionShape {
                    v_dim: 40,
                    ..shape(2, 12, 12, 2, 2, 72, None)
                },
                false,
            ),
        ];
        for (case, (s, with_sinks)) in cases.iter().enumerate() {
            let q = values(s.batch * s.n_heads * s.seq * s.head_dim, 1 + case as u64);
            let k = values(
                s.batch * s.n_kv_heads * s.keys * s.head_dim,
                11 + case as u64,
            );
            let v = values(s.batch * s.n_kv_heads * s.keys * s.v_dim, 21 + case as u64);
            let sinks = with_sinks.then(|| values(s.n_heads, 31 + case as u64));
            let scale = 1.0 / (s.head_dim as f32).sqrt();
            let want = reference(s, &q, &k, &v, sinks.as_deref(), scale);
            let mut first: Option<Vec<f32>> = None;
            for variant in isas() {
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![f32::NAN; s.batch * s.seq * s.n_heads * s.v_dim];
                    pool.install(|| {
                        causal_attention(variant, s, &q, &k, &v, sinks.as_deref(), scale, &mut out)
                    });
                    let err = out
                        .iter()
                        .zip(&want)
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        err < 2e-5,
                        "case {case} {s:?}, {}, {threads} threads: max error {err}",
                        variant.name()
                    );
                    // The same variant gives the same bits on every thread count.
                    match &first {
                        Some(f) if threads > 1 => assert!(
                            f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "case {case}, {}: {threads} threads differ from 1",
                            variant.name()
                        ),
                        _ => first = Some(out),
                    }
                }
                first = None;
            }
        }
    }

    /// One decode row against a position-major cache, every SIMD variant, against the pass
    /// kernel's reference on the same data laid out head-major.
    #[test]
    fn decode_row_matches_f64_reference_every_variant() {
        for (case, (nh, nkv, hd, keys, first, with_sinks)) in [
            (4, 2, 8, 7, 0, false),
            (2, 1, 20, 33, 0, true),
            (4, 4, 128, 41, 9, false),
            (3, 1, 64, 1, 0, true),
            (8, 2, 48, 130, 100, true),
            // Long enough to split the heads over threads (`ONE_SPLIT_MIN_MACS`).
            (16, 4, 64, 1100, 0, false),
        ]
        .into_iter()
        .enumerate()
        {
            let row = nkv * hd;
            let q = values(nh * hd, 101 + case as u64);
            let k = values(keys * row, 111 + case as u64);
            let v = values(keys * row, 121 + case as u64);
            let sinks = with_sinks.then(|| values(nh, 131 + case as u64));
            let scale = 1.0 / (hd as f32).sqrt();
            // The same data head-major, `[1, n_kv, keys, hd]`, for the pass reference.
            let head_major = |t: &[f32]| -> Vec<f32> {
                let mut o = Vec::with_capacity(t.len());
                for g in 0..nkv {
                    for j in 0..keys {
                        o.extend_from_slice(&t[j * row + g * hd..][..hd]);
                    }
                }
                o
            };
            let s = AttentionShape {
                window: (first > 0).then_some(keys - first),
                ..shape(1, 1, keys, nh, nkv, hd, None)
            };
            let want = reference(
                &s,
                &q,
                &head_major(&k),
                &head_major(&v),
                sinks.as_deref(),
                scale,
            );
            let d = DecodeShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                first,
                keys,
            };
            assert_eq!(case == 5, keys * nh * hd >= ONE_SPLIT_MIN_MACS);
            for variant in isas() {
                let mut first_bits: Option<Vec<u32>> = None;
                // From a pool thread of 1-3 threads (which splits from shorter steps), then from
                // this thread, outside any pool (`threads` 0: the global pool, larger splits).
                for threads in [1, 2, 3, 0] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads.max(1))
                        .build()
                        .unwrap();
                    let mut scores = vec![f32::NAN; scores_len(keys - first)];
                    let mut out = vec![f32::NAN; nh * hd];
                    let run = |scores: &mut [f32], out: &mut [f32]| {
                        attend_one(
                            variant,
                            &d,
                            &q,
                            &k,
                            &v,
                            sinks.as_deref(),
                            scale,
                            scores,
                            out,
                        )
                    };
                    if threads == 0 {
                        run(&mut scores, &mut out);
                    } else {
                        pool.install(|| run(&mut scores, &mut out));
                    }
                    let err = out
                        .iter()
                        .zip(&want)
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        err < 2e-5,
                        "case {case}, {}, {threads} threads: max error {err}",
                        variant.name()
                    );
                    let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                    match &first_bits {
                        Some(f) => assert!(f == &bits, "case {case}: {threads} threads differ"),
                        None => first_bits = Some(bits),
                    }
                }
            }
        }
    }

    #[test]
    fn tasks_cover_every_row_once_and_use_every_thread() {
        for (s, threads) in [
            (shape(2, 128, 128, 16, 8, 64, None), 2),
            (shape(1, 70, 70, 3, 1, 48, None), 2),
            (shape(1, 70, 90, 3, 1, 48, Some(16)), 3),
            (shape(1, 1, 90, 3, 1, 48, None), 4),
        ] {
            let t = tasks(&s, threads);
            let units = s.batch * s.n_kv_heads;
            assert!(
                t.len() >= threads.min(units * s.seq.div_ceil(ROWS)),
                "{s:?}: {t:?}"
            );
            for b in 0..s.batch {
                for g in 0..s.n_kv_heads {
                    let mut next = 0;
                    for x in t.iter().filter(|x| x.b == b && x.g == g) {
                        assert_eq!(x.r0, next, "{s:?}: {t:?}");
                        assert!(x.r1 > x.r0);
                        next = x.r1;
                    }
                    assert_eq!(next, s.seq, "{s:?}: {t:?}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "query heads over")]
    fn heads_that_do_not_group_are_refused() {
        let s = shape(1, 2, 2, 3, 2, 4, None);
        let x = vec![0f32; 24];
        let kv = vec![0f32; 16];
        let mut out = x.clone();
        causal_attention(
            KernelVariant::Portable,
            &s,
            &x,
            &kv,
            &kv,
            None,
            1.0,
            &mut out,
        );
    }
}
