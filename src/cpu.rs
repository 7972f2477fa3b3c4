//! CPU implementations of the fused ops: the reference path, and the fallback when no GPU is used.
//!
//! Everything runs in an accumulation type [`Accum`]: f64 for f64 tensors, f32 for the others
//! (f16 and bf16 are widened once and computed in f32). A 16-bit op rounds where its tensors are
//! stored and where PyTorch's would be: the pre-activation `z`, which the backward reads back,
//! is rounded before the epilogue sees it, and the output once at the end. The product
//! goes through the `gemm` crate (Candle's own CPU matmul), with the bias preloaded into the
//! destination so that the epilogue is a single pass over the output.

use crate::epilogue::Epilogue;
use crate::ops::ParamRows;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// A float type the CPU path computes in.
pub(crate) trait Accum: num_traits::Float + Send + Sync + std::fmt::Debug + 'static {
    /// The operand as a contiguous slice of `Self`, borrowed when no conversion is needed.
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [Self]>>;
    /// `values` rounded into a storage of `dtype`.
    fn to_storage(values: Vec<Self>, dtype: DType) -> Result<CpuStorage>;
    /// A tensor's elements on the host, converted to `Self`.
    fn host_vec(t: &Tensor) -> Result<Vec<Self>>;
    /// A CPU tensor of `Self` holding `values`.
    fn host_tensor(values: Vec<Self>, shape: impl Into<Shape>) -> Result<Tensor>;
    /// The rounding of a value to `dtype`, the type its tensor is stored in, and back.
    fn rounding(dtype: DType) -> fn(Self) -> Self;
}

/// The contiguous element range of an operand, or an error naming the op.
fn contiguous_range(layout: &Layout) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => bail!(
            "fused op: operand with shape {:?} is not contiguous",
            layout.dims()
        ),
    }
}

impl Accum for f32 {
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
        let (start, end) = contiguous_range(layout)?;
        Ok(match storage {
            CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
            CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
            CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
            other => bail!(
                "fused op: expected an f32, f16 or bf16 operand, got {:?}",
                other.dtype()
            ),
        })
    }

    fn to_storage(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
            other => bail!("fused op: cannot store f32 results as {other:?}"),
        })
    }

    fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }

    fn host_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_vec(values, shape.into(), &Device::Cpu)
    }

    fn rounding(dtype: DType) -> fn(f32) -> f32 {
        match dtype {
            DType::F16 => |v| half::f16::from_f32(v).to_f32(),
            DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
            _ => |v| v,
        }
    }
}

impl Accum for f64 {
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f64]>> {
        let (start, end) = contiguous_range(layout)?;
        match storage {
            CpuStorage::F64(v) => Ok(Cow::Borrowed(&v[start..end])),
            other => bail!("fused op: expected an f64 operand, got {:?}", other.dtype()),
        }
    }

    fn to_storage(values: Vec<f64>, dtype: DType) -> Result<CpuStorage> {
        match dtype {
            DType::F64 => Ok(CpuStorage::F64(values)),
            other => bail!("fused op: cannot store f64 results as {other:?}"),
        }
    }

    fn host_vec(t: &Tensor) -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
    }

    fn host_tensor(values: Vec<f64>, shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_vec(values, shape.into(), &Device::Cpu)
    }

    fn rounding(_: DType) -> fn(f64) -> f64 {
        |v| v
    }
}

/// The fused linear layer: `y = epilogue(z)` with `z = x·Wᵀ + bias` for `x` (m, k) and `w`
/// (n, k), row-major; the bias is row 0 of `params`. `z` is rounded to `dtype` (the type it is
/// kept in for the backward) before the epilogue, so that the backward differentiates at the
/// very `z` the forward used. The product goes into one buffer and a single pass adds the bias
/// and applies the epilogue, in place unless `keep_z` asks for `z` too (then returned second).
pub(crate) fn linear_epilogue<A: Accum>(
    (x, w, params): (&[A], &[A], &[A]),
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    rows: ParamRows,
    epilogue: &Epilogue,
    keep_z: bool,
) -> (Vec<A>, Option<Vec<A>>) {
    let mut acc = vec![A::zero(); m * n];
    matmul_into(&mut acc, x, w, (m, n, k), Transpose::B, false);
    let bias = &params[..n];
    let scales = feature_scales(epilogue, params, rows, n);
    let round = A::rounding(dtype);
    // The pass is split by rows over the cores, as the product was.
    if !keep_z {
        acc.par_chunks_mut(n).for_each(|row| {
            for j in 0..n {
                row[j] = epilogue.apply(round(row[j] + bias[j]), scales[j]);
            }
        });
        return (acc, None);
    }
    let mut y = vec![A::zero(); m * n];
    acc.par_chunks_mut(n)
        .zip(y.par_chunks_mut(n))
        .for_each(|(z_row, y_row)| {
            for j in 0..n {
                z_row[j] = round(z_row[j] + bias[j]);
                y_row[j] = epilogue.apply(z_row[j], scales[j]);
            }
        });
    (y, Some(acc))
}

/// Which operand of [`matmul_into`] is stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transpose {
    /// `a` (m, k) times `bᵀ` where `b` is stored (n, k).
    B,
    /// `aᵀ` times `b` where `a` is stored (k, m) and `b` (k, n).
    A,
    /// `a` (m, k) times `b` (k, n).
    None,
}

/// `dst (m, n) = [dst +] op(a) · op(b)`, row-major, through the `gemm` crate on all cores.
pub(crate) fn matmul_into<A: Accum>(
    dst: &mut [A],
    a: &[A],
    b: &[A],
    (m, n, k): (usize, usize, usize),
    transpose: Transpose,
    accumulate: bool,
) {
    assert!(dst.len() == m * n && a.len() == m * k && b.len() == k * n);
    // (row stride, column stride) of the logical (m, k) and (k, n) operands.
    let (a_rs, a_cs, b_rs, b_cs) = match transpose {
        Transpose::None => (k, 1, n, 1),
        Transpose::B => (k, 1, 1, k),
        Transpose::A => (1, m, n, 1),
    };
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides above describe `a` (m×k), `b` (k×n) and `dst` (m×n) exactly, and the
    // assertion checked that the three slices hold that many elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            A::one(),
            A::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The per-feature scale of `epilogue`: the table's scale row, or the scalar factor.
fn feature_scales<'a, A: Accum>(
    epilogue: &Epilogue,
    params: &'a [A],
    rows: ParamRows,
    n: usize,
) -> Cow<'a, [A]> {
    match rows.scale {
        Some(r) => Cow::Borrowed(&params[r * n..(r + 1) * n]),
        None => Cow::Owned(vec![A::from(epilogue.scalar_scale()).unwrap(); n]),
    }
}

/// `y = epilogue(z)` elementwise over an (m, n) matrix.
pub(crate) fn epilogue_forward<A: Accum>(
    z: &[A],
    params: &[A],
    rows: ParamRows,
    n: usize,
    epilogue: &Epilogue,
) -> Vec<A> {
    let scales = feature_scales(epilogue, params, rows, n);
    z.chunks_exact(n)
        .flat_map(|row| {
            row.iter()
                .zip(scales.iter())
                .map(|(&z, &s)| epilogue.apply(z, s))
        })
        .collect()
}

/// The gradient of `epilogue` at `z` given `dy`: returns `dz` (m, n) and the table's gradient
/// (rows.len, n) with the bias and scale rows filled and any other row zero.
///
/// `z` may be `None` only when `!epilogue.backward_needs_preactivation()`.
pub(crate) fn epilogue_backward<A: Accum>(
    dy: &[A],
    z: Option<&[A]>,
    params: &[A],
    rows: ParamRows,
    n: usize,
    epilogue: &Epilogue,
) -> (Vec<A>, Vec<f64>) {
    let scales = feature_scales(epilogue, params, rows, n);
    let mut dparams = vec![0f64; rows.len * n];
    let dz: Vec<A> = match z {
        Some(z) => {
            let mut dz = Vec::with_capacity(dy.len());
            for (dy_row, z_row) in dy.chunks_exact(n).zip(z.chunks_exact(n)) {
                for j in 0..n {
                    let (g, zv, s) = (dy_row[j], z_row[j], scales[j]);
                    let d = g * epilogue.derivative(zv, s);
                    dz.push(d);
                    dparams[j] += d.to_f64().unwrap();
                    if let Some(r) = rows.scale {
                        dparams[r * n + j] += (g * epilogue.activation.apply(zv)).to_f64().unwrap();
                    }
                }
            }
            dz
        }
        None => {
            assert!(!epilogue.backward_needs_preactivation());
            let dz: Vec<A> = dy
                .chunks_exact(n)
                .flat_map(|row| {
                    let scales = &scales;
                    row.iter()
                        .enumerate()
                        .map(move |(j, &g)| g * epilogue.derivative(A::zero(), scales[j]))
                })
                .collect();
            for row in dz.chunks_exact(n) {
                for (acc, &d) in dparams.iter_mut().zip(row) {
                    *acc += d.to_f64().unwrap();
                }
            }
            dz
        }
    };
    (dz, dparams)
}

/// Per-feature mean and biased variance of an (m, n) matrix, in f64, by two passes.
pub(crate) fn column_stats<A: Accum>(u: &[A], n: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (u.len() / n) as f64;
    let mut mean = vec![0f64; n];
    for row in u.chunks_exact(n) {
        for (acc, &v) in mean.iter_mut().zip(row) {
            *acc += v.to_f64().unwrap();
        }
    }
    mean.iter_mut().for_each(|v| *v /= m);
    let mut var = vec![0f64; n];
    for row in u.chunks_exact(n) {
        for ((acc, &v), &mu) in var.iter_mut().zip(row).zip(&mean) {
            let d = v.to_f64().unwrap() - mu;
            *acc += d * d;
        }
    }
    var.iter_mut().for_each(|v| *v /= m);
    (mean, var)
}

/// `y = (u - mean) / sqrt(var + eps) * gamma + beta`, in place over an (m, n) matrix.
pub(crate) fn normalize<A: Accum>(
    u: &mut [A],
    mean: &[f64],
    var: &[f64],
    gamma: &[A],
    beta: &[A],
    eps: f64,
) {
    let n = mean.len();
    // Per feature, the normalisation is one affine map `y = u * a + c`.
    let (a, c): (Vec<A>, Vec<A>) = (0..n)
        .map(|j| {
            let a = gamma[j].to_f64().unwrap() / (var[j] + eps).sqrt();
            let c = beta[j].to_f64().unwrap() - mean[j] * a;
            (A::from(a).unwrap(), A::from(c).unwrap())
        })
        .unzip();
    for row in u.chunks_exact_mut(n) {
        for j in 0..n {
            row[j] = row[j] * a[j] + c[j];
        }
    }
}

/// The BatchNorm backward at `u = epilogue(z)` given `dy`, composed with the epilogue
/// backward: returns `dz` and the table gradient (bias, scale, gamma, beta rows; running
/// statistics rows zero). In train mode `u` is rounded to `dtype`, as the forward rounded it
/// before taking its statistics: `x̂` must be the forward's own, since Σ x̂ = 0 is what cancels
/// the gradient of a shift (a rounding of `u` left out here moves every `x̂` by up to
/// ulp(u)/σ, which swamps the gradients of a column whose mean is far from zero).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_backward<A: Accum>(
    dy: &[A],
    z: &[A],
    params: &[A],
    rows: ParamRows,
    (mean, var): (&[f64], &[f64]),
    n: usize,
    dtype: DType,
    epilogue: &Epilogue,
    eps: f64,
    train: bool,
) -> (Vec<A>, Vec<f64>) {
    let gamma_row = rows.gamma.expect("batch-norm table has a gamma row");
    let gamma = &params[gamma_row * n..(gamma_row + 1) * n];
    let mut u = epilogue_forward(z, params, rows, n, epilogue);
    if train {
        let round = A::rounding(dtype);
        u.iter_mut().for_each(|v| *v = round(*v));
    }
    let m = (dy.len() / n) as f64;
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let x_hat = |i: usize, j: usize| (u[i * n + j].to_f64().unwrap() - mean[j]) * inv_std[j];
    let (mut dgamma, mut dbeta) = (vec![0f64; n], vec![0f64; n]);
    for (i, row) in dy.chunks_exact(n).enumerate() {
        for j in 0..n {
            let g = row[j].to_f64().unwrap();
            dbeta[j] += g;
            dgamma[j] += g * x_hat(i, j);
        }
    }
    let du: Vec<A> = dy
        .chunks_exact(n)
        .enumerate()
        .flat_map(|(i, row)| {
            let (dgamma, dbeta, inv_std, x_hat) = (&dgamma, &dbeta, &inv_std, &x_hat);
            row.iter().enumerate().map(move |(j, g)| {
                let g = g.to_f64().unwrap();
                let scale = gamma[j].to_f64().unwrap() * inv_std[j];
                let du = if train {
                    scale / m * (m * g - dbeta[j] - x_hat(i, j) * dgamma[j])
                } else {
                    g * scale
                };
                A::from(du).unwrap()
            })
        })
        .collect();
    let (dz, mut dparams) = epilogue_backward(&du, Some(z), params, rows, n, epilogue);
    dparams[gamma_row * n..(gamma_row + 1) * n].copy_from_slice(&dgamma);
    dparams[(gamma_row + 1) * n..(gamma_row + 2) * n].copy_from_slice(&dbeta);
    (dz, dparams)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three transposition modes agree with a naive triple loop on odd sizes.
    #[test]
    fn matmul_matches_naive_loops() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let at = |i: usize, p: usize| a[i * k + p];
        let bt = |p: usize, j: usize| b[p * n + j];
        let expected: Vec<f64> = (0..m * n)
            .map(|e| (0..k).map(|p| at(e / n, p) * bt(p, e % n)).sum())
            .collect();
        let mut plain = vec![0.0; m * n];
        matmul_into(&mut plain, &a, &b, (m, n, k), Transpose::None, false);
        // The same product with `a` stored transposed (k, m) and `b` stored transposed (n, k).
        let a_t: Vec<f64> = (0..k * m).map(|e| at(e % m, e / m)).collect();
        let b_t: Vec<f64> = (0..n * k).map(|e| bt(e % k, e / k)).collect();
        let mut ta = vec![0.0; m * n];
        matmul_into(&mut ta, &a_t, &b, (m, n, k), Transpose::A, false);
        let mut tb = vec![0.0; m * n];
        matmul_into(&mut tb, &a, &b_t, (m, n, k), Transpose::B, false);
        for ((e, p), (q, r)) in expected.iter().zip(&plain).zip(ta.iter().zip(&tb)) {
            assert!((e - p).abs() < 1e-12 && (e - q).abs() < 1e-12 && (e - r).abs() < 1e-12);
        }
    }

    #[test]
    fn column_stats_are_two_pass_exact() {
        // Large offset: a one-pass Σu² − (Σu)²/n would lose the variance entirely in f32.
        let u: Vec<f32> = vec![1e4 + 1.0, 1e4 + 3.0, 1e4 + 2.0, 1e4 + 6.0];
        let (mean, var) = column_stats(&u, 2);
        assert_eq!(mean, vec![1e4 + 1.5, 1e4 + 4.5]);
        assert_eq!(var, vec![0.25, 2.25]);
    }
}
