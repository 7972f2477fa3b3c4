//! GPU parity: the CUDA path against the CPU path (computed in f64 from the same rounded
//! inputs), against PyTorch's goldens, and against float64 at the reference sizes.
//!
//! Every test skips, with a message, when no CUDA device is present.
#![cfg(feature = "cuda")]

mod common;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use candle_fused::parity::{compare, forward_backward, tolerance, GradientPath};
use candle_fused::{
    fused_linear, fused_linear_batch_norm, fused_linear_batch_norm_traced, fused_linear_traced,
    Activation, BatchNormParams, BatchStats, Checkpoint, Epilogue, OutputScale, Precision,
    RunningUpdate,
};
use common::{
    assert_batch_norm_cancels_a_shift, assert_nan_row_propagates, golden, shipped, to_f64,
};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// The precisions a GPU run is checked in: (dtype, precision, tolerance against f64).
const MODES: [(DType, Precision, f64); 4] = [
    (DType::F32, Precision::Exact, 1e-5),
    (DType::F32, Precision::Tf32, 3e-3),
    (DType::BF16, Precision::Exact, 1.5e-2),
    (DType::F16, Precision::Exact, 5e-3),
];

/// Shapes (m, k, n): 1s, primes, sizes just off the tile multiples, mid-size ones, and some
/// that the Hopper path takes (k and n multiples of 8) with partial tiles in m, n and k (one
/// with an epilogue subtile wholly past the last row; the last two, in the wide and the narrow
/// batch, with few tiles and enough k steps that the exact f32 GEMM splits each tile's k loop
/// between CTAs).
const SHAPES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (1, 300, 7),
    (2, 3, 257),
    (7, 129, 61),
    (97, 211, 2),
    (131, 64, 127),
    (257, 13, 131),
    (64, 256, 128),
    (300, 299, 293),
    (200, 136, 264),
    (150, 72, 136),
    (200, 1096, 264),
    (100, 520, 136),
];

/// The largest difference between `ours` and `reference`, relative to the largest magnitude in
/// `reference` (infinite if `ours` has a NaN or an infinity), computed on `ours`' device so that
/// tensors too large to copy to the host need not be.
fn max_rel_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let scalar = |t: Result<Tensor>| t.unwrap().to_scalar::<f64>().unwrap();
    let max_abs = |t: &Tensor| scalar(t.abs().and_then(|a| a.max(0)));
    let a = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = reference
        .to_dtype(DType::F64)
        .and_then(|b| b.to_device(a.device()))
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(a.dim(0).unwrap(), b.dim(0).unwrap());
    // A NaN or an infinity anywhere makes the sum non-finite, where a maximum might skip it.
    if !scalar(a.abs().and_then(|a| a.sum_all())).is_finite() {
        return f64::INFINITY;
    }
    max_abs(&(a - &b).unwrap()) / max_abs(&b).max(1e-30)
}

/// `t` as f64 on the CPU: a GPU operand's copy for the float64 reference.
fn to_cpu64(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .unwrap()
}

/// Random operands, rounded to `dtype`, on the GPU and (as f64) on the CPU.
struct Operands {
    gpu: Vec<Tensor>,
    cpu64: Vec<Tensor>,
}

fn operands(device: &Device, shapes: &[(&[usize], f32, f32)], dtype: DType) -> Operands {
    let mut gpu = Vec::new();
    let mut cpu64 = Vec::new();
    for &(shape, lo, hi) in shapes {
        let t = Tensor::rand(lo, hi, shape, device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        cpu64.push(to_cpu64(&t));
        gpu.push(t);
    }
    Operands { gpu, cpu64 }
}

/// The shapes and value ranges of the operands of a fused linear + BatchNorm call of shape
/// (m, k, n): x, weight, bias, scale, gamma, beta, running mean, running variance, then an
/// output gradient.
fn batch_norm_shapes((m, k, n): (usize, usize, usize)) -> [(Vec<usize>, f32, f32); 9] {
    let bound = 1.0 / (k as f32).sqrt();
    [
        (vec![m, k], -1.0, 1.0),
        (vec![n, k], -bound, bound),
        (vec![n], -0.5, 0.5),
        (vec![n], 0.5, 1.5),
        (vec![n], 0.5, 1.5),
        (vec![n], -0.5, 0.5),
        (vec![n], -0.2, 0.2),
        (vec![n], 0.5, 2.0),
        (vec![m, n], -1.0, 1.0),
    ]
}

/// The operands of `batch_norm_shapes`, on the GPU and as float64 copies on the CPU.
fn batch_norm_operands(device: &Device, size: (usize, usize, usize), dtype: DType) -> Operands {
    let shapes = batch_norm_shapes(size);
    let shapes: Vec<(&[usize], f32, f32)> = shapes
        .iter()
        .map(|(shape, lo, hi)| (shape.as_slice(), *lo, *hi))
        .collect();
    operands(device, &shapes, dtype)
}

fn epilogues() -> Vec<Epilogue> {
    let mut all = Vec::new();
    for activation in Activation::ALL {
        all.push(Epilogue::activation(activation));
        all.push(Epilogue {
            activation,
            scale: OutputScale::Scalar(1.7),
            residual: true,
        });
        all.push(Epilogue {
            activation,
            scale: OutputScale::PerFeature,
            residual: false,
        });
    }
    all
}

#[test]
fn fused_linear_matches_cpu_on_odd_shapes() {
    let Some(device) = gpu() else { return };
    fused_linear_matches_cpu(&device, &SHAPES, &MODES);
}

/// Every epilogue of `fused_linear` at each (m, k, n) of `shapes` in each of `modes`, against
/// the CPU's in float64.
fn fused_linear_matches_cpu(
    device: &Device,
    shapes: &[(usize, usize, usize)],
    modes: &[(DType, Precision, f64)],
) {
    for &(m, k, n) in shapes {
        for &(dtype, precision, tol) in modes {
            let bound = 1.0 / (k as f32).sqrt();
            let ops = operands(
                device,
                &[
                    (&[m, k], -1.0, 1.0),
                    (&[n, k], -bound, bound),
                    (&[n], -0.5, 0.5),
                    (&[n], 0.5, 1.5),
                ],
                dtype,
            );
            for epilogue in epilogues() {
                let scale = |ts: &[Tensor]| epilogue.has_scale_param().then(|| ts[3].clone());
                let y = fused_linear(
                    &ops.gpu[0],
                    &ops.gpu[1],
                    Some(&ops.gpu[2]),
                    scale(&ops.gpu).as_ref(),
                    epilogue,
                    precision,
                )
                .unwrap();
                let reference = fused_linear(
                    &ops.cpu64[0],
                    &ops.cpu64[1],
                    Some(&ops.cpu64[2]),
                    scale(&ops.cpu64).as_ref(),
                    epilogue,
                    precision,
                )
                .unwrap();
                assert_eq!(y.dtype(), dtype);
                let err = max_rel_error(&y, &reference);
                assert!(err <= tol, "{m}x{k}->{n} {dtype:?} {precision:?} {epilogue:?}: error {err:.2e} > {tol:.0e}");
            }
        }
    }
}

#[test]
fn batch_norm_matches_cpu_on_odd_shapes() {
    let Some(device) = gpu() else { return };
    // Besides the shared shapes, two tall batches, whose statistics come in more tiles than the
    // merge has threads per feature: on the Hopper path (k, n multiples of 8) and off it.
    let tall = [(2500, 24, 40), (2049, 13, 31)];
    let shapes: Vec<_> = SHAPES
        .iter()
        .filter(|s| s.0 >= 2)
        .chain(&tall)
        .copied()
        .collect();
    batch_norm_matches_cpu(&device, &shapes, &MODES);
}

/// `fused_linear_batch_norm` on the operands of `batch_norm_shapes` (x, weight, bias, scale,
/// gamma, beta, running mean, running variance; the scale used only by an epilogue that takes
/// one), leaving the running statistics alone.
fn batch_norm_forward(
    t: &[Tensor],
    epilogue: Epilogue,
    train: bool,
    precision: Precision,
) -> (Tensor, Option<BatchStats>) {
    let bn = BatchNormParams {
        weight: &t[4],
        bias: &t[5],
        running_mean: &t[6],
        running_var: &t[7],
        eps: 1e-5,
        update: None,
    };
    let scale = epilogue.has_scale_param().then(|| &t[3]);
    fused_linear_batch_norm(
        &t[0],
        &t[1],
        Some(&t[2]),
        scale,
        epilogue,
        &bn,
        train,
        precision,
    )
    .unwrap()
}

/// `fused_linear_batch_norm` in eval and train mode, with a per-feature scale and with the swish
/// epilogue, at each (m, k, n) of `shapes` (m ≥ 2) in each of `modes`, against the CPU's in
/// float64: the output and the batch statistics.
fn batch_norm_matches_cpu(
    device: &Device,
    shapes: &[(usize, usize, usize)],
    modes: &[(DType, Precision, f64)],
) {
    for &(m, k, n) in shapes {
        for &(dtype, precision, tol) in modes {
            let ops = batch_norm_operands(device, (m, k, n), dtype);
            for train in [false, true] {
                for epilogue in [Epilogue::per_feature_scale(), Epilogue::swish_scale(2.0)] {
                    let run = |t: &[Tensor]| batch_norm_forward(t, epilogue, train, precision);
                    let (y, stats) = run(&ops.gpu);
                    let (reference, ref_stats) = run(&ops.cpu64);
                    let what =
                        format!("{m}x{k}->{n} {dtype:?} {precision:?} train={train} {epilogue:?}");
                    // Normalising divides by the standard deviation: an error relative to |u|
                    // grows by max |u| / sqrt(var + eps), large for batches that barely vary.
                    let t = &ops.cpu64;
                    let scale = epilogue.has_scale_param().then(|| &t[3]);
                    let u =
                        fused_linear(&t[0], &t[1], Some(&t[2]), scale, epilogue, Precision::Exact)
                            .unwrap();
                    let var = match &ref_stats {
                        Some(r) => r.var.clone(),
                        None => t[7].clone(),
                    };
                    let spread = (var + 1e-5).unwrap().sqrt().unwrap();
                    let amplification = u.abs().unwrap().max(0).unwrap().div(&spread).unwrap();
                    let amplification = amplification
                        .max(0)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                        .max(1.0);
                    let err = max_rel_error(&y, &reference);
                    assert!(
                        err <= tol * amplification,
                        "{what}: y error {err:.2e} (amplification {amplification:.1})"
                    );
                    if let (Some(s), Some(r)) = (stats, ref_stats) {
                        assert!(max_rel_error(&s.mean, &r.mean) <= tol, "{what}: batch mean");
                        let err = max_rel_error(&s.var, &r.var);
                        assert!(
                            err <= tol * amplification,
                            "{what}: batch variance error {err:.2e}"
                        );
                    }
                }
            }
        }
    }
}

/// A train-mode forward given `bn.update` folds its batch statistics into the running ones in
/// place (on the GPU, in the kernel that merges the statistics), as PyTorch does: blended with
/// the momentum, the variance unbiased, `num_batches_tracked` counted; on the CPU alike.
#[test]
fn train_forward_updates_running_statistics() {
    let Some(device) = gpu() else { return };
    for &(m, k, n) in SHAPES.iter().filter(|s| s.0 >= 2) {
        for (dtype, precision, tol) in MODES {
            let ops = batch_norm_operands(&device, (m, k, n), dtype);
            let what = format!("{m}x{k}->{n} {dtype:?} {precision:?}");
            for t in [&ops.gpu, &ops.cpu64] {
                let (mean, var) = (t[6].copy().unwrap(), t[7].copy().unwrap());
                let count = Tensor::new(3i64, t[0].device()).unwrap();
                let bn = BatchNormParams {
                    weight: &t[4],
                    bias: &t[5],
                    running_mean: &mean,
                    running_var: &var,
                    eps: 1e-5,
                    update: Some(RunningUpdate {
                        factor: 0.1,
                        num_batches_tracked: Some(&count),
                    }),
                };
                let epilogue = Epilogue::swish_scale(2.0);
                let (_, stats) = fused_linear_batch_norm(
                    &t[0],
                    &t[1],
                    Some(&t[2]),
                    None,
                    epilogue,
                    &bn,
                    true,
                    precision,
                )
                .unwrap();
                let stats = stats.unwrap();
                // PyTorch's update of the statistics that this forward returned, in f64.
                let blend = |running: &Tensor, batch: &Tensor, weight: f64| {
                    let r = running
                        .to_dtype(DType::F64)
                        .unwrap()
                        .affine(0.9, 0.0)
                        .unwrap();
                    let b = batch.to_dtype(DType::F64).unwrap();
                    (r + b.affine(0.1 * weight, 0.0).unwrap()).unwrap()
                };
                let unbiased = m as f64 / (m as f64 - 1.0);
                let err_mean = max_rel_error(&mean, &blend(&t[6], &stats.mean, 1.0));
                let err_var = max_rel_error(&var, &blend(&t[7], &stats.var, unbiased));
                let tol = if t[0].device().is_cpu() { 1e-12 } else { tol };
                assert!(err_mean <= tol, "{what}: running mean error {err_mean:.2e}");
                assert!(
                    err_var <= tol,
                    "{what}: running variance error {err_var:.2e}"
                );
                assert_eq!(count.to_scalar::<i64>().unwrap(), 4, "{what}: batch count");
            }
        }
    }
}

/// Train-mode batch statistics of features whose mean lies far from zero against their spread
/// (about 1000 against 3 to 6): the case where Σu² − (Σu)²/n in f32 loses the variance to
/// cancellation (here by 0.1% to 4%). The operands are exact in TF32 (x in steps of 1/2, the
/// weight in steps of 1/8) and the products and sums exact in f32, so both f32 precisions see the
/// same u as the float64 reference. 16-bit outputs cannot hold such a column (1000 ± 3 in bf16
/// is a few distinct values), so only f32 is checked; on the Hopper path's wide and narrow batch
/// tiles (k, n multiples of 8) and on the portable kernel's.
#[test]
fn batch_norm_statistics_hold_far_from_zero() {
    let Some(device) = gpu() else { return };
    // f32 values in [lo, hi] in steps of `step`.
    let steps = |shape: &[usize], lo: f32, hi: f32, step: f32| {
        let t = Tensor::rand(lo / step, hi / step, shape, &device).unwrap();
        t.round().unwrap().affine(step as f64, 0.0).unwrap()
    };
    for (m, k, n) in [(300, 64, 136), (100, 64, 136), (300, 13, 31)] {
        for precision in [Precision::Exact, Precision::Tf32] {
            let x = steps(&[m, k], -2.0, 2.0, 0.5);
            let w = steps(&[n, k], -1.0, 1.0, 0.125);
            let bias = (steps(&[n], 0.0, 8.0, 0.125) + 1000.0).unwrap();
            let ones = Tensor::ones(n, DType::F32, &device).unwrap();
            let zeros = Tensor::zeros(n, DType::F32, &device).unwrap();
            let gpu = [
                x,
                w,
                bias,
                ones.clone(),
                ones.clone(),
                zeros.clone(),
                zeros,
                ones,
            ];
            let cpu64: Vec<Tensor> = gpu.iter().map(to_cpu64).collect();
            let run = |t: &[Tensor]| {
                let (y, stats) =
                    batch_norm_forward(t, Epilogue::per_feature_scale(), true, precision);
                (y, stats.unwrap())
            };
            let (y, stats) = run(&gpu);
            let (reference, ref_stats) = run(&cpu64);
            let what = format!("{m}x{k}->{n} {precision:?}");
            let err_mean = max_rel_error(&stats.mean, &ref_stats.mean);
            let err_var = max_rel_error(&stats.var, &ref_stats.var);
            let err_y = max_rel_error(&y, &reference);
            assert!(err_mean <= 1e-6, "{what}: batch mean error {err_mean:.2e}");
            assert!(
                err_var <= 1e-5,
                "{what}: batch variance error {err_var:.2e}"
            );
            assert!(err_y <= 1e-4, "{what}: y error {err_y:.2e}");
        }
    }
}

/// The train-mode BatchNorm's backward uses the forward's own `x̂` in 16 bits: `z` and `u`
/// rounded as stored, in the GEMM's epilogue and in the backward alike (see the CPU test of the
/// same name). On the Hopper path (k, n multiples of 8) and on the portable kernel's.
#[test]
fn batch_norm_backward_sees_the_forward_normalised_values() {
    let Some(device) = gpu() else { return };
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for size in [(256, 64, 136), (61, 13, 31)] {
            assert_batch_norm_cancels_a_shift(&device, dtype, size);
        }
    }
}

/// Bitwise equality of two tensors' values.
fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(to_f64(a), to_f64(b), "{what}");
}

/// On the GPU the forward reads each per-feature vector where it lies instead of stacking them
/// first. Vectors that are rows of one buffer (so at offsets into one storage) give the same
/// bits as separate ones, forward and traced backward; a vector that shares its storage with a
/// running buffer that the forward updates is stacked first, and gives the same bits too.
#[test]
fn per_feature_vectors_in_one_storage() {
    let Some(device) = gpu() else { return };
    // Off and on the Hopper path (k and n multiples of 8).
    for (m, k, n) in [(29, 13, 31), (37, 24, 40)] {
        for dtype in [DType::F32, DType::BF16] {
            let t = batch_norm_operands(&device, (m, k, n), dtype).gpu;
            let packed = Tensor::stack(&t[2..8], 0).unwrap();
            let rows: Vec<Tensor> = (0..6).map(|r| packed.i(r).unwrap()).collect();
            let epilogue = Epilogue::per_feature_scale();
            let what = format!("{m}x{k}->{n} {dtype:?}");
            for train in [false, true] {
                let run = |v: &[Tensor]| {
                    let bn = BatchNormParams {
                        weight: &v[2],
                        bias: &v[3],
                        running_mean: &v[4],
                        running_var: &v[5],
                        eps: 1e-5,
                        update: None,
                    };
                    let (y, _, trace) = fused_linear_batch_norm_traced(
                        &t[0],
                        &t[1],
                        Some(&v[0]),
                        Some(&v[1]),
                        epilogue,
                        &bn,
                        train,
                        Precision::Exact,
                    )
                    .unwrap();
                    let grads = trace.backward(&t[8]).unwrap();
                    let dparams: Vec<Tensor> = v[..4]
                        .iter()
                        .map(|p| grads.get(p).unwrap().clone())
                        .collect();
                    (y, dparams)
                };
                let (y, dparams) = run(&rows);
                let (y_separate, dparams_separate) = run(&t[2..8]);
                assert_same(&y, &y_separate, &format!("{what} train={train}: y"));
                for (i, (a, b)) in dparams.iter().zip(&dparams_separate).enumerate() {
                    assert_same(
                        a,
                        b,
                        &format!("{what} train={train}: gradient of vector {i}"),
                    );
                }
            }
            // gamma and the running mean in one storage, updated by a train-mode forward.
            let gamma_and_mean = Tensor::stack(&[&t[4], &t[6]], 0).unwrap();
            let run = |gamma: &Tensor, mean: &Tensor| {
                let var = t[7].copy().unwrap();
                let bn = BatchNormParams {
                    weight: gamma,
                    bias: &t[5],
                    running_mean: mean,
                    running_var: &var,
                    eps: 1e-5,
                    update: Some(RunningUpdate {
                        factor: 0.1,
                        num_batches_tracked: None,
                    }),
                };
                let (y, _) = fused_linear_batch_norm(
                    &t[0],
                    &t[1],
                    Some(&t[2]),
                    Some(&t[3]),
                    epilogue,
                    &bn,
                    true,
                    Precision::Exact,
                )
                .unwrap();
                (y, var)
            };
            let mean_separate = t[6].copy().unwrap();
            let (y_separate, var_separate) = run(&t[4], &mean_separate);
            let (y, var) = run(&gamma_and_mean.i(0).unwrap(), &gamma_and_mean.i(1).unwrap());
            assert_same(
                &y,
                &y_separate,
                &format!("{what}: y, gamma beside the running mean"),
            );
            assert_same(
                &gamma_and_mean.i(1).unwrap(),
                &mean_separate,
                &format!("{what}: running mean"),
            );
            assert_same(&var, &var_separate, &format!("{what}: running variance"));
        }
    }
}

/// The gradients of the op named by `which` (swish, sigmoid, bn-train, bn-eval) for the operands
/// `t` (x, weight, bias, scale, gamma, beta) and the output gradient `g`: through Candle's
/// autograd, or (`traced`) through a Trace. Only the operands that the op reads get one.
fn fused_grads(
    which: &str,
    epilogue: Epilogue,
    t: &[Tensor],
    g: &Tensor,
    precision: Precision,
    traced: bool,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = t.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let scale = epilogue.has_scale_param().then_some(v[3]);
    let (y, trace) = if which.starts_with("bn") {
        let (rm, rv) = (v[5].zeros_like()?, v[4].ones_like()?);
        let bn = BatchNormParams {
            weight: v[4],
            bias: v[5],
            running_mean: &rm,
            running_var: &rv,
            eps: 1e-5,
            update: None,
        };
        let train = which == "bn-train";
        let args = (v[0], v[1], Some(v[2]), scale, epilogue);
        if traced {
            let (y, _, trace) = fused_linear_batch_norm_traced(
                args.0, args.1, args.2, args.3, args.4, &bn, train, precision,
            )?;
            (y, Some(trace))
        } else {
            let y = fused_linear_batch_norm(
                args.0, args.1, args.2, args.3, args.4, &bn, train, precision,
            )?;
            (y.0, None)
        }
    } else if traced {
        let (y, trace) = fused_linear_traced(v[0], v[1], Some(v[2]), scale, epilogue, precision)?;
        (y, Some(trace))
    } else {
        let y = fused_linear(v[0], v[1], Some(v[2]), scale, epilogue, precision)?;
        (y, None)
    };
    let store = match trace {
        Some(trace) => trace.backward(g)?,
        None => (y * g)?.sum_all()?.backward()?,
    };
    let used = if which.starts_with("bn") {
        6
    } else if epilogue.has_scale_param() {
        4
    } else {
        3
    };
    gradients_of(&store, &v[..used])
}

/// The gradient of each of `vars` in `store`, or an error naming the one that has none.
fn gradients_of(store: &GradStore, vars: &[&Tensor]) -> Result<Vec<Tensor>> {
    vars.iter()
        .enumerate()
        .map(|(i, t)| {
            store
                .get(t)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for operand {i}")))
        })
        .collect()
}

#[test]
fn gradients_match_cpu_on_odd_shapes() {
    let Some(device) = gpu() else { return };
    // The last two shapes' backward products (contractions n and m, outputs k wide) are
    // aligned for the Hopper path, and the last one's weight gradient contracts enough rows
    // that the exact f32 GEMM splits its k loop between CTAs; the others run the portable
    // kernels. The first three shapes' weight gradients (batches of at most 128 rows) run in
    // exact f32 as one TF32 GEMM over split operands, and the third one's in TF32 (m and k
    // multiples of 4, n not a multiple of the kernel's 64-row tiles) on the Hopper
    // weight-gradient kernel.
    for &(m, k, n) in &[
        (3usize, 17usize, 5usize),
        (64, 33, 70),
        (100, 136, 70),
        (129, 100, 31),
        (200, 136, 264),
        (1032, 136, 264),
    ] {
        for (dtype, precision, tol) in MODES {
            let ops = batch_norm_operands(&device, (m, k, n), dtype);
            for (which, epilogue) in [
                ("swish", Epilogue::swish_scale(2.0)),
                ("sigmoid", Epilogue::sigmoid_residual(2.0)),
                ("bn-train", Epilogue::per_feature_scale()),
                ("bn-eval", Epilogue::per_feature_scale()),
            ] {
                let grads = |t: &[Tensor], g: &Tensor, traced| {
                    fused_grads(which, epilogue, t, g, precision, traced)
                };
                let reference = grads(&ops.cpu64[..6], &ops.cpu64[8], false).unwrap();
                for traced in [false, true] {
                    let ours = grads(&ops.gpu[..6], &ops.gpu[8], traced).unwrap();
                    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                        // Train-mode BatchNorm cancels the gradients of the bias (to zero) and of
                        // the scale (to a term in eps): sums whose terms cancel, so the rounding of
                        // the forward's f32 product decides what is left. The shipped-model test
                        // holds them to the PyTorch goldens; tests/parity.rs checks them in f64.
                        if which == "bn-train" && (i == 2 || i == 3) {
                            continue;
                        }
                        let err = max_rel_error(a, b);
                        assert!(err <= 2.0 * tol, "{which} {m}x{k}->{n} {dtype:?} {precision:?} traced={traced}: gradient {i} error {err:.2e}");
                    }
                }
            }
        }
    }
}

/// Shapes (m, k, n) whose input gradient runs on the Hopper kernel that reads W as it lies (n
/// and k multiples of 4, k at least 66 of its 128-column tiles): a partial batch, a single row,
/// a contraction shorter than one stage and one that ends inside a stage, k cutting the last
/// tile short; and, with n not a multiple of 4, a shape the kernel does not take, whose input
/// gradient then runs on the general path (in exact f32 on a transposed copy of W made for it).
const DIRECT_INPUT_GRAD_SHAPES: [(usize, usize, usize); 4] = [
    (100, 8452, 72),
    (1, 8452, 36),
    (128, 8704, 4),
    (100, 8452, 70),
];

/// The TF32 gradients of a batch of at most 128 rows: the input gradient on the Hopper kernel
/// that reads W as it lies, and the weight gradient on the Hopper weight-gradient kernel (m a
/// multiple of 4, k of 8), on shapes that cut its 64-row tiles and 128-column strips short (down
/// to a last strip of eight columns), cut its strips into bands of rows of unequal sizes, and
/// (with more strips than SMs) give CTAs several bands in turn; and, with k not a multiple of 8,
/// a shape the kernel does not take, whose weight gradient runs on cuBLAS.
#[test]
fn tf32_small_batch_gradients_match_float64() {
    let Some(device) = gpu() else { return };
    let shapes = [
        (128, 2056, 520),
        (36, 1000, 257),
        (4, 264, 1100),
        (4, 17032, 200),
        (128, 2052, 520),
    ];
    swish_gradients_match_float64(&device, MODES[1], &shapes);
    swish_gradients_match_float64(&device, MODES[1], &DIRECT_INPUT_GRAD_SHAPES);
}

/// The f16 and bf16 gradients of a batch of at most 128 rows, whose weight gradient runs on the
/// Hopper weight-gradient kernel from dz and x as they lie (n and k multiples of 8): shapes that
/// cut its 64-row tiles and 256-column strips short, a batch that ends inside the contraction's
/// 16-row steps, a single row, one with more strips than SMs cut into bands of unequal sizes;
/// and, with n not a multiple of 8, a shape the kernel does not take, which runs on cuBLAS.
#[test]
fn half_precision_small_batch_weight_gradient_matches_float64() {
    let Some(device) = gpu() else { return };
    let shapes = [
        (128, 2056, 520),
        (37, 1000, 264),
        (1, 264, 1104),
        (8, 34824, 328),
        (100, 1000, 70),
    ];
    for mode in [MODES[2], MODES[3]] {
        swish_gradients_match_float64(&device, mode, &shapes);
    }
}

/// The exact f32 input gradient on the Hopper kernel that reads W as it lies, which takes
/// batches of any size in tiles of 128 rows: the shapes above, and batches of three tiles whose
/// last holds a single row or 44 rows, with k cutting the last column tile short.
#[test]
fn exact_direct_input_gradient_matches_float64() {
    let Some(device) = gpu() else { return };
    swish_gradients_match_float64(&device, MODES[0], &DIRECT_INPUT_GRAD_SHAPES);
    swish_gradients_match_float64(&device, MODES[0], &[(257, 4100, 72), (300, 4228, 36)]);
}

/// The exact f32 forward on the Hopper kernel that feeds W through registers, which takes the
/// problems with at least half as many 128x128 tiles of y as the device has SMs: every epilogue,
/// both BatchNorm modes and the gradients (whose forward keeps z), on shapes whose last tiles
/// hold 1 row, 44 rows or 8 columns, and whose contraction ends 8 values into a 32-value stage.
#[test]
fn exact_register_operand_forward_matches_cpu() {
    let Some(device) = gpu() else { return };
    let shapes = [(257, 72, 4104), (300, 136, 4232), (100, 40, 8456)];
    fused_linear_matches_cpu(&device, &shapes, &MODES[..1]);
    batch_norm_matches_cpu(&device, &shapes, &MODES[..1]);
    swish_gradients_match_float64(&device, MODES[0], &shapes);
}

/// Every gradient of the swish op in `mode` at each (m, k, n) of `shapes`, against the CPU's in
/// float64.
fn swish_gradients_match_float64(
    device: &Device,
    (dtype, precision, tol): (DType, Precision, f64),
    shapes: &[(usize, usize, usize)],
) {
    for &(m, k, n) in shapes {
        let ops = batch_norm_operands(device, (m, k, n), dtype);
        let epilogue = Epilogue::swish_scale(2.0);
        let grads =
            |t: &[Tensor], g: &Tensor| fused_grads("swish", epilogue, t, g, precision, false);
        let reference = grads(&ops.cpu64[..6], &ops.cpu64[8]).unwrap();
        let ours = grads(&ops.gpu[..6], &ops.gpu[8]).unwrap();
        for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
            let err = max_rel_error(a, b);
            assert!(
                err <= 2.0 * tol,
                "{m}x{k}->{n} {dtype:?} {precision:?}: gradient {i} error {err:.2e}"
            );
        }
    }
}

/// The gradients of `fused_grads`' ops written with plain Candle ops as the PyTorch modules
/// define them, in float64 on the operands' device (an implementation that shares no code with
/// the crate's): z = x·wᵀ + b, then swish y = 2·z·σ(z), sigmoid y = 2·σ(z) + z, or the
/// BatchNorm of u = z·s (batch statistics with the biased variance in train mode, running mean
/// 0 and variance 1 in eval mode).
fn plain_f64_grads(which: &str, t: &[Tensor], g: &Tensor) -> Result<Vec<Tensor>> {
    let used = if which.starts_with("bn") { 6 } else { 3 };
    let vars: Vec<Var> = t[..used]
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
        .collect::<Result<_>>()?;
    let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let sigmoid = |z: &Tensor| (z.neg()?.exp()? + 1.0)?.recip();
    let z = v[0].matmul(&v[1].t()?)?.broadcast_add(v[2])?;
    let y = match which {
        "swish" => ((&z * sigmoid(&z)?)? * 2.0)?,
        "sigmoid" => ((sigmoid(&z)? * 2.0)? + &z)?,
        _ => {
            let u = z.broadcast_mul(v[3])?;
            let (centred, var) = if which == "bn-train" {
                let centred = u.broadcast_sub(&u.mean_keepdim(0)?)?;
                let var = centred.sqr()?.mean_keepdim(0)?;
                (centred, var)
            } else {
                (
                    u,
                    Tensor::ones((1, v[3].dim(0)?), DType::F64, v[3].device())?,
                )
            };
            let x_hat = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
            x_hat.broadcast_mul(v[4])?.broadcast_add(v[5])?
        }
    };
    let store = (y * g.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    gradients_of(&store, &v)
}

/// The three models' problems at their reference sizes, (m, k, n), with their epilogues: the
/// BatchNorm model's is the scaled product before the normalisation.
fn reference_problems() -> [(&'static str, (usize, usize, usize), Epilogue); 3] {
    [
        ("swish", (128, 32768, 32768), Epilogue::swish_scale(2.0)),
        (
            "sigmoid",
            (1024, 8192, 8192),
            Epilogue::sigmoid_residual(2.0),
        ),
        ("bn", (1024, 8192, 8192), Epilogue::per_feature_scale()),
    ]
}

/// The gradients at the reference sizes (the input, the weight and every per-feature vector),
/// through Candle's autograd and through a Trace, in every precision, against float64 ones of
/// the same model written with plain Candle ops, on the same rounded operands.
#[test]
fn reference_sizes_gradients_match_float64() {
    let Some(device) = gpu() else { return };
    for (name, (m, k, n), epilogue) in reference_problems() {
        let ops: &[&str] = match name {
            "bn" => &["bn-train", "bn-eval"],
            _ => &[name],
        };
        for (&which, (dtype, precision, tol)) in
            ops.iter().flat_map(|w| MODES.iter().map(move |m| (w, *m)))
        {
            // On the GPU only: the CPU copies of batch_norm_operands would take minutes here.
            let t: Vec<Tensor> = batch_norm_shapes((m, k, n))
                .iter()
                .map(|(shape, lo, hi)| {
                    Tensor::rand(*lo, *hi, shape.as_slice(), &device)?.to_dtype(dtype)
                })
                .collect::<Result<_>>()
                .unwrap();
            let reference = plain_f64_grads(which, &t[..6], &t[8]).unwrap();
            for traced in [false, true] {
                let ours = fused_grads(which, epilogue, &t[..6], &t[8], precision, traced).unwrap();
                assert_eq!(ours.len(), reference.len(), "{which}: gradient count");
                for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                    // As in gradients_match_cpu_on_odd_shapes: train-mode BatchNorm cancels
                    // the bias and scale gradients to rounding.
                    if which == "bn-train" && (i == 2 || i == 3) {
                        continue;
                    }
                    let err = max_rel_error(a, b);
                    println!("{which} {m}x{k}->{n} {dtype:?} {precision:?} traced={traced}: gradient {i} error {err:.2e}");
                    assert!(
                        err <= 2.0 * tol,
                        "{which} {dtype:?} {precision:?} traced={traced}: gradient {i} error {err:.2e}"
                    );
                }
            }
        }
    }
}

#[test]
fn shipped_models_match_pytorch_on_gpu() {
    let Some(device) = gpu() else { return };
    for model in ["swish_scale", "scale_batchnorm", "sigmoid_residual"] {
        let checkpoint = Checkpoint::from_dir(shipped(model)).unwrap();
        let golden = golden(model);
        let paths = [GradientPath::Autograd, GradientPath::Trace];
        for ((dtype, precision, _), train, path) in cross(MODES, [false, true], paths) {
            // A fresh model each time: a train-mode forward updates the BatchNorm buffers.
            let varmap = checkpoint.var_map(dtype, &device).unwrap();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &device);
            let net = candle_fused::Model::load(vb, &checkpoint.config)
                .unwrap()
                .with_precision(precision);
            let on_device = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&device).unwrap();
            let (x, g) = (on_device(&golden["x"]), on_device(&golden["g"]));
            let outputs = forward_backward(&net, &x, Some(&g), train, path).unwrap();
            let half = dtype != DType::F32;
            let tol = tolerance(dtype, precision == Precision::Tf32);
            for c in compare(&outputs, &golden, train, tol, half).unwrap() {
                assert!(
                    c.ok,
                    "{model} {dtype:?} {precision:?} train={train} {path:?}: {} error {:.2e}",
                    c.name, c.error
                );
            }
        }
    }
}

/// Every combination of one item of each list.
fn cross<A: Copy, B: Copy, C: Copy>(
    a: impl IntoIterator<Item = A>,
    b: impl IntoIterator<Item = B> + Clone,
    c: impl IntoIterator<Item = C> + Clone,
) -> Vec<(A, B, C)> {
    let mut all = Vec::new();
    for a in a {
        for b in b.clone() {
            for c in c.clone() {
                all.push((a, b, c));
            }
        }
    }
    all
}

/// The reference sizes, spot-checked against float64 dot products of sampled rows and columns.
#[test]
fn reference_sizes_match_float64_spot_checks() {
    let Some(device) = gpu() else { return };
    for (name, (m, k, n), epilogue) in reference_problems() {
        for (dtype, precision, tol) in MODES {
            let bound = 1.0 / (k as f32).sqrt();
            let x = Tensor::rand(-1f32, 1.0, (m, k), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::rand(-bound, bound, (n, k), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::rand(-0.5f32, 0.5, n, &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = Tensor::rand(0.5f32, 1.5, n, &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let scale = epilogue.has_scale_param().then_some(&s);
            let y = fused_linear(&x, &w, Some(&b), scale, epilogue, precision).unwrap();
            let rows: Vec<usize> = (0..8).map(|i| (i * 7919 + 13) % m).collect();
            let cols: Vec<usize> = (0..8).map(|j| (j * 104729 + 5) % n).collect();
            let f64_rows = |t: &Tensor, idx: &[usize]| -> Vec<Vec<f64>> {
                idx.iter().map(|&i| to_f64(&t.i(i).unwrap())).collect()
            };
            let (xr, wr) = (f64_rows(&x, &rows), f64_rows(&w, &cols));
            let (bv, sv) = (
                f64_rows(&b.unsqueeze(1).unwrap(), &cols),
                f64_rows(&s.unsqueeze(1).unwrap(), &cols),
            );
            let mut worst = 0f64;
            let mut magnitude = 0f64;
            for (ri, &i) in rows.iter().enumerate() {
                for (ci, &j) in cols.iter().enumerate() {
                    let z: f64 =
                        xr[ri].iter().zip(&wr[ci]).map(|(a, b)| a * b).sum::<f64>() + bv[ci][0];
                    let factor = if epilogue.has_scale_param() {
                        sv[ci][0]
                    } else {
                        epilogue.scalar_scale()
                    };
                    let expected = epilogue.apply(z, factor);
                    let got = y
                        .i((i, j))
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    worst = worst.max((got - expected).abs());
                    magnitude = magnitude.max(expected.abs());
                }
            }
            let err = worst / magnitude;
            println!("{name} {m}x{k}->{n} {dtype:?} {precision:?}: spot-check error {err:.2e}");
            assert!(
                err <= tol,
                "{name} {dtype:?} {precision:?}: spot-check error {err:.2e} > {tol:.0e}"
            );
        }
    }
}

/// `Precision::Exact` is fp32-accurate: its error against float64 is at most twice that of
/// Candle's cuBLAS fp32 matmul on the same inputs. The first shape runs on CUTLASS's 3xTF32 GEMM,
/// the second (enough 128x128 tiles of y to fill a Hopper GPU) on the kernel that feeds W
/// through registers.
#[test]
fn exact_f32_is_as_accurate_as_cublas_fp32() {
    let Some(device) = gpu() else { return };
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    for (m, k, n) in [(256, 8192, 1024), (256, 8192, 8192)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
        let b = Tensor::zeros(n, DType::F32, &device).unwrap();
        let ours =
            fused_linear(&x, &w, Some(&b), None, Epilogue::IDENTITY, Precision::Exact).unwrap();
        let cublas = x.matmul(&w.t().unwrap()).unwrap();
        let rows = 0..16;
        let x64 = to_cpu64(&x.i(rows.clone()).unwrap());
        let w64 = to_cpu64(&w);
        let reference = x64.matmul(&w64.t().unwrap()).unwrap();
        let ours_err = max_rel_error(&ours.i(rows.clone()).unwrap(), &reference);
        let cublas_err = max_rel_error(&cublas.i(rows).unwrap(), &reference);
        println!(
            "f32 error vs float64 at {m}x{k}->{n}: exact {ours_err:.2e}, cuBLAS fp32 {cublas_err:.2e}"
        );
        assert!(
            ours_err <= 2.0 * cublas_err,
            "{m}x{k}->{n}: exact {ours_err:.2e} vs cuBLAS {cublas_err:.2e}"
        );
    }
}

/// The backward products of `Precision::Exact` are fp32-accurate too: the input and weight
/// gradients' errors against float64 are at most twice those of Candle's cuBLAS fp32 matmul.
#[test]
fn exact_f32_gradients_are_as_accurate_as_cublas_fp32() {
    let Some(device) = gpu() else { return };
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    // The first batch's gradients run on the fused 3xTF32 GEMM. The others (at most 128 rows)
    // take the weight gradient as one TF32 GEMM over split operands, and the last one its input
    // gradient on the Hopper kernel that reads W as it lies.
    for (m, k, n) in [(2048, 1024, 2048), (128, 1024, 2048), (128, 8452, 2048)] {
        exact_gradients_against_cublas_fp32(&device, (m, k, n));
    }
}

/// The exact f32 input and weight gradients of a bare product at (m, k, n), and cuBLAS fp32's,
/// against float64 on 16 rows of each: ours no more than twice as far off.
fn exact_gradients_against_cublas_fp32(device: &Device, (m, k, n): (usize, usize, usize)) {
    let x = Tensor::randn(0f32, 1.0, (m, k), device).unwrap();
    let w = Tensor::randn(0f32, 1.0, (n, k), device).unwrap();
    let g = Tensor::randn(0f32, 1.0, (m, n), device).unwrap();
    let (_, trace) =
        fused_linear_traced(&x, &w, None, None, Epilogue::IDENTITY, Precision::Exact).unwrap();
    let grads = trace.backward(&g).unwrap();
    let (dx, dw) = (grads.get(&x).unwrap(), grads.get(&w).unwrap());
    let cublas_dx = g.matmul(&w).unwrap();
    let cublas_dw = g.t().unwrap().matmul(&x).unwrap();
    let rows = 0..16;
    // dx rows = g rows · W; dW rows = (columns of g)ᵀ · x.
    let dx64 = to_cpu64(&g.i(rows.clone()).unwrap())
        .matmul(&to_cpu64(&w))
        .unwrap();
    let dw64 = to_cpu64(&g.i((.., rows.clone())).unwrap().t().unwrap())
        .matmul(&to_cpu64(&x))
        .unwrap();
    for (name, ours, cublas, reference) in
        [("dx", dx, &cublas_dx, &dx64), ("dW", dw, &cublas_dw, &dw64)]
    {
        let ours_err = max_rel_error(&ours.i(rows.clone()).unwrap(), reference);
        let cublas_err = max_rel_error(&cublas.i(rows.clone()).unwrap(), reference);
        println!(
            "{name} error vs float64 at {m}x{k}->{n}: exact {ours_err:.2e}, cuBLAS fp32 {cublas_err:.2e}"
        );
        assert!(
            ours_err <= 2.0 * cublas_err,
            "{name} at {m}x{k}->{n}: exact {ours_err:.2e} vs cuBLAS {cublas_err:.2e}"
        );
    }
}

#[test]
fn non_contiguous_inputs_are_made_contiguous() {
    let Some(device) = gpu() else { return };
    let x = Tensor::rand(-1f32, 1.0, (40, 24), &device)
        .unwrap()
        .t()
        .unwrap(); // (24, 40), transposed
    let w = Tensor::rand(-0.2f32, 0.2, (40, 31), &device)
        .unwrap()
        .t()
        .unwrap(); // (31, 40)
    let b = Tensor::zeros(31, DType::F32, &device).unwrap();
    let epilogue = Epilogue::sigmoid_residual(2.0);
    let y = fused_linear(&x, &w, Some(&b), None, epilogue, Precision::Exact).unwrap();
    let reference = fused_linear(
        &x.contiguous().unwrap(),
        &w.contiguous().unwrap(),
        Some(&b),
        None,
        epilogue,
        Precision::Exact,
    )
    .unwrap();
    assert_eq!(max_rel_error(&y, &reference), 0.0);
}

/// A NaN in the input makes its row of the output NaN for every activation and mode, on the
/// portable GEMM and on the Hopper one, and none other; its row of the input's gradient is
/// finite exactly for the identity and relu, as on the CPU (tests/parity.rs) and in PyTorch.
#[test]
fn a_nan_input_propagates_as_on_the_cpu() {
    let Some(device) = gpu() else { return };
    for (m, k, n) in [(7, 129, 61), (64, 256, 128)] {
        for (dtype, precision, _) in MODES {
            let mut values: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            values[0] = f32::NAN;
            let x = Tensor::from_vec(values, (m, k), &device)
                .and_then(|x| x.to_dtype(dtype))
                .unwrap();
            let w = Tensor::rand(-0.1f32, 0.1, (n, k), &device)
                .and_then(|w| w.to_dtype(dtype))
                .unwrap();
            let g = Tensor::rand(-1f32, 1.0, (m, n), &device)
                .and_then(|g| g.to_dtype(dtype))
                .unwrap();
            for activation in Activation::ALL {
                let epilogue = Epilogue::activation(activation);
                let (y, trace) =
                    fused_linear_traced(&x, &w, None, None, epilogue, precision).unwrap();
                let grads = trace.backward(&g).unwrap();
                let at = format!("{m}x{k}->{n} {dtype:?} {precision:?} {activation:?}");
                assert_nan_row_propagates(&at, activation, &y, grads.get(&x).unwrap());
            }
        }
    }
}

/// An input with leading dimensions, `(2, 3, in)` and not contiguous: the output `(2, 3, out)`
/// and every traced gradient are those of the same six rows given as a matrix, in every mode.
#[test]
fn leading_dimensions_match_the_matrix_input() {
    let Some(device) = gpu() else { return };
    let shapes: [(&[usize], f32, f32); 4] = [
        (&[3, 2, 40], -1.0, 1.0),
        (&[31, 40], -0.2, 0.2),
        (&[31], -0.5, 0.5),
        (&[2, 3, 31], -1.0, 1.0),
    ];
    let epilogue = Epilogue::swish_scale(2.0);
    for (dtype, precision, tolerance) in MODES {
        let ops = operands(&device, &shapes, dtype);
        let [x, w, b, g] = [0, 1, 2, 3].map(|i| ops.gpu[i].clone());
        let x = x.transpose(0, 1).unwrap();
        assert!(!x.is_contiguous());
        let matrix = x.contiguous().unwrap().reshape((6, 40)).unwrap();
        let (y, trace) = fused_linear_traced(&x, &w, Some(&b), None, epilogue, precision).unwrap();
        let (matrix_y, matrix_trace) =
            fused_linear_traced(&matrix, &w, Some(&b), None, epilogue, precision).unwrap();
        assert_eq!(y.dims(), &[2, 3, 31]);
        let err = max_rel_error(&y.reshape((6, 31)).unwrap(), &matrix_y);
        assert!(
            err <= tolerance,
            "{dtype:?} {precision:?}: y off by {err:.2e}"
        );
        let grads = trace.backward(&g).unwrap();
        let matrix_grads = matrix_trace.backward(&g.reshape((6, 31)).unwrap()).unwrap();
        let dx = grads.get(&x).unwrap();
        assert_eq!(dx.dims(), x.dims());
        for (name, ours, want) in [
            (
                "x",
                &dx.reshape((6, 40)).unwrap(),
                matrix_grads.get(&matrix).unwrap(),
            ),
            (
                "weight",
                grads.get(&w).unwrap(),
                matrix_grads.get(&w).unwrap(),
            ),
            (
                "bias",
                grads.get(&b).unwrap(),
                matrix_grads.get(&b).unwrap(),
            ),
        ] {
            let err = max_rel_error(ours, want);
            assert!(
                err <= tolerance,
                "{dtype:?} {precision:?}: grad of {name} off by {err:.2e}"
            );
        }
    }
}

#[test]
fn operands_on_different_devices_are_an_error() {
    let Some(device) = gpu() else { return };
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 3), DType::F32, &device).unwrap();
    let err = fused_linear(&x, &w, None, None, Epilogue::IDENTITY, Precision::Exact)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("weight is on cuda:0 but the input is on cpu"),
        "{err}"
    );
}

/// A few optimizer steps from the same checkpoint on the GPU and on the CPU end at the same
/// parameters and running statistics.
#[test]
fn optimizer_steps_on_gpu_match_cpu() {
    use candle_core::ModuleT;
    use candle_nn::Optimizer;
    let Some(device) = gpu() else { return };
    for model in ["swish_scale", "scale_batchnorm", "sigmoid_residual"] {
        let checkpoint = Checkpoint::from_dir(shipped(model)).unwrap();
        let golden = golden(model);
        let train = |device: &Device| -> Vec<(String, Tensor)> {
            let varmap = checkpoint.var_map(DType::F32, device).unwrap();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device);
            let net = candle_fused::Model::load(vb, &checkpoint.config).unwrap();
            let x = golden["x"].to_device(device).unwrap();
            let target = golden["g"].to_device(device).unwrap();
            let mut sgd = candle_nn::SGD::new(net.trainable_vars().unwrap(), 0.05).unwrap();
            for _ in 0..5 {
                let loss =
                    candle_nn::loss::mse(&net.forward_t(&x, true).unwrap(), &target).unwrap();
                sgd.backward_step(&loss).unwrap();
            }
            let mut state = net.parameters();
            state.extend(net.buffers());
            state
        };
        let (on_gpu, on_cpu) = (train(&device), train(&Device::Cpu));
        for ((name, a), (_, b)) in on_gpu.iter().zip(&on_cpu) {
            let err = max_rel_error(a, b);
            assert!(
                err <= 1e-4,
                "{model}: {name} differs after 5 steps: {err:.2e}"
            );
        }
    }
}
