//! Parity with PyTorch (the goldens `scripts/export.py` computed in float64) and with finite
//! differences, on the CPU.

mod common;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::parity::{compare, forward_backward, tolerance, GradientPath};
use candle_fused::{
    fused_linear, fused_linear_batch_norm, fused_linear_batch_norm_traced, fused_linear_traced,
    Activation, BatchNormParams, Checkpoint, Epilogue, OutputScale, Precision, Trace,
};
use common::{
    assert_batch_norm_cancels_a_shift, assert_nan_row_propagates, golden, shipped, to_f64,
};

const MODELS: [&str; 3] = ["swish_scale", "scale_batchnorm", "sigmoid_residual"];

/// Runs a shipped model in `dtype` on its golden input and checks every output.
fn check_model(model: &str, dtype: DType, train: bool, path: GradientPath) {
    let checkpoint = Checkpoint::from_dir(shipped(model)).unwrap();
    let varmap = checkpoint.var_map(dtype, &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let net = candle_fused::Model::load(vb, &checkpoint.config).unwrap();
    let golden = golden(model);
    let x = golden["x"].to_dtype(dtype).unwrap();
    let g = golden["g"].to_dtype(dtype).unwrap();
    let outputs = forward_backward(&net, &x, Some(&g), train, path).unwrap();
    let expected = 1 + 1 + net.parameters().len() + if train { net.buffers().len() } else { 0 };
    assert_eq!(outputs.len(), expected, "{model}: outputs {outputs:?}");
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let results = compare(&outputs, &golden, train, tolerance(dtype, false), half).unwrap();
    for c in &results {
        assert!(
            c.ok,
            "{model} {dtype:?} train={train} {path:?}: {} error {:.3e}",
            c.name, c.error
        );
    }
    // Only the gradients that train-mode BatchNorm cancels may go unchecked, and only in
    // half precision.
    let unchecked: Vec<_> = results
        .iter()
        .filter(|c| !c.checked)
        .map(|c| c.name.as_str())
        .collect();
    if half && train && model == "scale_batchnorm" {
        assert_eq!(unchecked, ["grad.gemm.bias", "grad.scale"]);
    } else {
        assert!(unchecked.is_empty(), "{unchecked:?}");
    }
}

/// Every shipped model in `dtype`, in both modes, through both gradient paths.
fn check_models(dtype: DType) {
    for model in MODELS {
        for train in [false, true] {
            for path in [GradientPath::Autograd, GradientPath::Trace] {
                check_model(model, dtype, train, path);
            }
        }
    }
}

#[test]
fn f32_matches_pytorch_train_and_eval() {
    check_models(DType::F32);
}

#[test]
fn f64_matches_pytorch_to_rounding() {
    check_models(DType::F64);
}

#[test]
fn half_precisions_match_pytorch_within_their_resolution() {
    check_models(DType::F16);
    check_models(DType::BF16);
}

/// A train-mode BatchNorm's backward uses the forward's own `x̂` in every dtype: 16-bit ones
/// round `z` and `u` where they are stored, in the forward and in the backward alike.
#[test]
fn batch_norm_backward_sees_the_forward_normalised_values() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for size in [(64, 16, 8), (37, 13, 5)] {
            assert_batch_norm_cancels_a_shift(&Device::Cpu, dtype, size);
        }
    }
}

/// Half-precision results against the f32 path, on a random problem larger than the goldens.
#[test]
fn half_precisions_match_f32() {
    let dev = Device::Cpu;
    let (m, k, n) = (33, 70, 45);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() / (k as f64).sqrt()).unwrap();
    let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
    for epilogue in [
        Epilogue::swish_scale(2.0),
        Epilogue::sigmoid_residual(2.0),
        Epilogue::activation(Activation::Gelu),
    ] {
        let reference = fused_linear(&x, &w, Some(&b), None, epilogue, Precision::Exact).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let y = fused_linear(
                &cast(&x),
                &cast(&w),
                Some(&cast(&b)),
                None,
                epilogue,
                Precision::Exact,
            )
            .unwrap();
            assert_eq!(y.dtype(), dtype);
            let err = relative_error(&y, &reference);
            assert!(err < 1e-2, "{epilogue:?} {dtype:?}: {err}");
        }
    }
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_f64(a), to_f64(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max);
    diff / b.iter().fold(1e-30f64, |m, v| m.max(v.abs()))
}

/// A deterministic pseudo-random f64 tensor (no RNG state shared between tests).
fn seeded(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f64> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((state >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Checks every gradient of `loss(inputs) = Σ f(inputs) ⊙ g` against central differences
/// at every element (the problems are small).
fn gradcheck(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let g = seeded(y.dims(), 99, -1.0, 1.0);
    let loss = |ts: &[Tensor]| -> f64 {
        (f(ts).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-6;
    for (i, input) in inputs.iter().enumerate() {
        let analytic = grads
            .get(&tensors[i])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let values = input.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = analytic.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for e in 0..values.len() {
            let at = |delta: f64| -> f64 {
                let mut moved = values.clone();
                moved[e] += delta;
                let mut ts: Vec<Tensor> = inputs.to_vec();
                ts[i] = Tensor::from_vec(moved, input.shape(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - analytic[e]).abs() <= 1e-6 * scale,
                "{name}: input {i} element {e}: numeric {numeric} analytic {}",
                analytic[e]
            );
        }
    }
}

/// Shapes that are multiples of nothing, batch 1 included.
const SHAPES: [(usize, usize, usize); 4] = [(1, 3, 2), (5, 7, 3), (2, 1, 9), (6, 11, 13)];

#[test]
fn fused_linear_gradients_match_finite_differences() {
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        let seed = s as u64 * 10;
        for activation in Activation::ALL {
            for (scale, residual) in [
                (OutputScale::None, false),
                (OutputScale::Scalar(1.7), true),
                (OutputScale::PerFeature, false),
                (OutputScale::PerFeature, true),
            ] {
                let epilogue = Epilogue {
                    activation,
                    scale,
                    residual,
                };
                let mut inputs = vec![
                    seeded(&[m, k], seed + 1, -1.5, 1.5),
                    seeded(&[n, k], seed + 2, -1.0, 1.0),
                    seeded(&[n], seed + 3, -0.5, 0.5),
                ];
                if epilogue.has_scale_param() {
                    inputs.push(seeded(&[n], seed + 4, 0.5, 2.0));
                }
                gradcheck(&format!("{epilogue:?} {m}x{k}->{n}"), &inputs, &|t| {
                    fused_linear(
                        &t[0],
                        &t[1],
                        Some(&t[2]),
                        t.get(3),
                        epilogue,
                        Precision::Exact,
                    )
                });
            }
        }
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        let seed = s as u64 * 10 + 100;
        for train in [false, true] {
            if train && m < 2 {
                continue; // train mode needs two rows; tests/errors.rs covers the error
            }
            for epilogue in [Epilogue::per_feature_scale(), Epilogue::swish_scale(0.8)] {
                let mut inputs = vec![
                    seeded(&[m, k], seed + 1, -1.5, 1.5),
                    seeded(&[n, k], seed + 2, -1.0, 1.0),
                    seeded(&[n], seed + 3, -0.5, 0.5),
                    seeded(&[n], seed + 5, 0.5, 1.5),
                    seeded(&[n], seed + 6, -0.5, 0.5),
                ];
                if epilogue.has_scale_param() {
                    inputs.push(seeded(&[n], seed + 4, 0.5, 2.0));
                }
                let running_mean = seeded(&[n], seed + 7, -0.3, 0.3);
                let running_var = seeded(&[n], seed + 8, 0.5, 2.0);
                gradcheck(
                    &format!("bn train={train} {epilogue:?} {m}x{k}->{n}"),
                    &inputs,
                    &|t| {
                        let bn = BatchNormParams {
                            weight: &t[3],
                            bias: &t[4],
                            running_mean: &running_mean,
                            running_var: &running_var,
                            eps: 1e-3,
                            update: None,
                        };
                        let (y, _) = fused_linear_batch_norm(
                            &t[0],
                            &t[1],
                            Some(&t[2]),
                            t.get(5),
                            epilogue,
                            &bn,
                            train,
                            Precision::Exact,
                        )?;
                        Ok(y)
                    },
                );
            }
        }
    }
}

/// Checks a call whose operands repeat tensors (`f` builds it from `inputs`) against central
/// differences through Candle's autograd, then checks that its trace (`traced` builds that)
/// gives each input the same gradient: the sum over the places it was passed.
fn check_tied(
    name: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    traced: &dyn Fn(&[Tensor]) -> Result<Trace>,
) {
    gradcheck(name, inputs, f);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let g = seeded(y.dims(), 98, -1.0, 1.0);
    let autograd = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let trace = traced(inputs).unwrap();
    let from_trace = trace.backward(&g).unwrap();
    for (i, (input, tensor)) in inputs.iter().zip(&tensors).enumerate() {
        let want = autograd.get(tensor).unwrap();
        let got = from_trace.get(input).unwrap();
        let err = relative_error(got, want);
        assert!(
            err < 1e-12,
            "{name}: input {i}: traced gradient off by {err}"
        );
    }
}

/// A tensor given to a call in two places gets the sum of its gradients, through autograd and
/// through a trace alike: `x` as the weight too, the bias as the per-feature scale too, and
/// BatchNorm's weight as the scale.
#[test]
fn tied_operands_get_the_sum_of_their_gradients() {
    let epilogue = Epilogue {
        activation: Activation::Silu,
        scale: OutputScale::PerFeature,
        residual: true,
    };
    let square = seeded(&[5, 5], 1, -1.0, 1.0);
    let vector = seeded(&[5], 2, 0.5, 1.5);
    check_tied(
        "x as the weight, the bias as the scale",
        &[square.clone(), vector.clone()],
        &|t| {
            fused_linear(
                &t[0],
                &t[0],
                Some(&t[1]),
                Some(&t[1]),
                epilogue,
                Precision::Exact,
            )
        },
        &|t| {
            fused_linear_traced(
                &t[0],
                &t[0],
                Some(&t[1]),
                Some(&t[1]),
                epilogue,
                Precision::Exact,
            )
            .map(|(_, trace)| trace)
        },
    );

    let running = [seeded(&[5], 3, -0.3, 0.3), seeded(&[5], 4, 0.5, 2.0)];
    let (weight, beta) = (seeded(&[5, 5], 5, -1.0, 1.0), seeded(&[5], 6, -0.5, 0.5));
    fn bn<'a>(
        gamma: &'a Tensor,
        beta: &'a Tensor,
        running: &'a [Tensor; 2],
    ) -> BatchNormParams<'a> {
        BatchNormParams {
            weight: gamma,
            bias: beta,
            running_mean: &running[0],
            running_var: &running[1],
            eps: 1e-3,
            update: None,
        }
    }
    let scale = Epilogue::per_feature_scale();
    for train in [false, true] {
        check_tied(
            &format!("BatchNorm's weight as the scale, train={train}"),
            &[square.clone(), vector.clone()],
            &|t| {
                let bn = bn(&t[1], &beta, &running);
                fused_linear_batch_norm(
                    &t[0],
                    &weight,
                    None,
                    Some(&t[1]),
                    scale,
                    &bn,
                    train,
                    Precision::Exact,
                )
                .map(|(y, _)| y)
            },
            &|t| {
                let bn = bn(&t[1], &beta, &running);
                fused_linear_batch_norm_traced(
                    &t[0],
                    &weight,
                    None,
                    Some(&t[1]),
                    scale,
                    &bn,
                    train,
                    Precision::Exact,
                )
                .map(|(_, _, trace)| trace)
            },
        );
    }
}

/// A NaN in the input makes its row of the output NaN for every activation, and none other, as
/// in PyTorch (`torch.relu` keeps a NaN; a max with 0 would hide it). Its row of the input's
/// gradient is NaN where the activation's derivative is NaN, and finite for the identity and
/// relu, whose derivative PyTorch takes as 1 there (`threshold_backward` zeroes only `z <= 0`).
#[test]
fn a_nan_input_propagates_as_in_pytorch() {
    let (m, k, n) = (3, 4, 5);
    let mut values = to_f64(&seeded(&[m, k], 7, -1.0, 1.0));
    values[0] = f64::NAN;
    let x = Var::from_vec(values, (m, k), &Device::Cpu).unwrap();
    let w = seeded(&[n, k], 8, -1.0, 1.0);
    let g = seeded(&[m, n], 9, -1.0, 1.0);
    for activation in Activation::ALL {
        let y = fused_linear(
            x.as_tensor(),
            &w,
            None,
            None,
            Epilogue::activation(activation),
            Precision::Exact,
        )
        .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        assert_nan_row_propagates(&format!("{activation:?}"), activation, &y, dx);
    }
}

/// A batch whose variance overflows f32 (values near 1e20) still trains in f32 on the CPU, as
/// in PyTorch's CPU BatchNorm: the forward takes its statistics in f64, and so must the backward,
/// where `1/σ` (near 1e-20) is representable though `σ²` is not. The gradients match the same
/// call in f64.
#[test]
fn batch_norm_trains_on_a_variance_beyond_f32_range() {
    let (m, k, n) = (4, 3, 5);
    let x = seeded(&[m, k], 31, -1.0, 1.0);
    let w = (seeded(&[n, k], 32, -1.0, 1.0) * 1e20).unwrap();
    let gamma = seeded(&[n], 33, 0.5, 1.5);
    let beta = seeded(&[n], 34, -0.5, 0.5);
    let g = seeded(&[m, n], 35, -1.0, 1.0);
    let grads = |dtype: DType| {
        let vars: Vec<Var> = [&x, &w, &gamma, &beta]
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let (running_mean, running_var) = (
            Tensor::zeros(n, dtype, &Device::Cpu).unwrap(),
            Tensor::ones(n, dtype, &Device::Cpu).unwrap(),
        );
        let bn = BatchNormParams {
            weight: vars[2].as_tensor(),
            bias: vars[3].as_tensor(),
            running_mean: &running_mean,
            running_var: &running_var,
            eps: 1e-5,
            update: None,
        };
        let (y, stats) = fused_linear_batch_norm(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            None,
            None,
            Epilogue::IDENTITY,
            &bn,
            true,
            Precision::Exact,
        )
        .unwrap();
        let loss = (&y * g.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let store = loss.backward().unwrap();
        let mut out = vec![y, stats.unwrap().var];
        out.extend(
            vars.iter()
                .map(|v| store.get(v.as_tensor()).unwrap().clone()),
        );
        out
    };
    let (single, double) = (grads(DType::F32), grads(DType::F64));
    let var_max = to_f64(&double[1]).into_iter().fold(0f64, f64::max);
    assert!(
        var_max > f32::MAX as f64,
        "the batch must overflow f32: {var_max}"
    );
    assert_eq!(
        single[1].dtype(),
        DType::F32,
        "batch statistics keep the input's dtype"
    );
    let compared = [
        ("y", 0),
        ("dx", 2),
        ("dweight", 3),
        ("dgamma", 4),
        ("dbeta", 5),
    ];
    for (name, i) in compared {
        let err = relative_error(&single[i], &double[i]);
        assert!(err < 1e-4, "{name}: f32 against f64, relative error {err}");
    }
}

/// The shipped goldens come with non-trivial BatchNorm state, so eval mode really reads it.
#[test]
fn batch_norm_eval_and_train_differ_on_the_golden() {
    let golden = golden("scale_batchnorm");
    assert!(relative_error(&golden["y.eval"], &golden["y.train"]) > 0.1);
}
