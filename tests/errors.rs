//! Bad input to the fused ops and the modules: every case returns a `candle_core::Error` whose
//! message names the problem (the operand, the shape, the dtype, the key), never a panic, and
//! the inputs that are merely laid out differently (non-contiguous) are accepted.

mod common;
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_fused::{
    fused_linear, fused_linear_batch_norm, fused_linear_traced, Activation, BatchNormParams,
    BatchStats, Epilogue, FusedLinear, Model, ModelConfig, ModelKind, Precision, RunningUpdate,
    ScaleBatchNorm, SwishScale, TracedModuleT,
};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_err, to_f64};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OPS: [&str; 2] = ["fused_linear", "fused_linear_batch_norm"];
const EPS: f64 = 1e-5;
const FACTOR: f64 = 2.0;

/// A tensor of values uniform in `[lo, hi)`, reproducible from `seed`.
fn uniform(dims: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi) as f32).collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// The operands of one layer: `x (batch, in)`, `w (out, in)` and the per-feature vectors.
struct Operands {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    scale: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl Operands {
    fn new(batch: usize, inp: usize, out: usize) -> Self {
        Operands {
            x: uniform(&[batch, inp], -1.0, 1.0, 1),
            w: uniform(&[out, inp], -0.5, 0.5, 2),
            b: uniform(&[out], -0.5, 0.5, 3),
            scale: uniform(&[out], 0.5, 1.5, 4),
            gamma: uniform(&[out], 0.5, 1.5, 5),
            beta: uniform(&[out], -0.5, 0.5, 6),
            running_mean: uniform(&[out], -0.2, 0.2, 7),
            running_var: uniform(&[out], 0.5, 1.5, 8),
        }
    }

    fn to_dtype(&self, dtype: DType) -> Self {
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        Operands {
            x: c(&self.x),
            w: c(&self.w),
            b: c(&self.b),
            scale: c(&self.scale),
            gamma: c(&self.gamma),
            beta: c(&self.beta),
            running_mean: c(&self.running_mean),
            running_var: c(&self.running_var),
        }
    }

    fn bn(&self) -> BatchNormParams<'_> {
        BatchNormParams {
            weight: &self.gamma,
            bias: &self.beta,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            eps: EPS,
            update: None,
        }
    }

    /// SwishScale through `fused_linear`.
    fn linear(&self) -> Result<Tensor> {
        fused_linear(
            &self.x,
            &self.w,
            Some(&self.b),
            None,
            Epilogue::swish_scale(FACTOR),
            Precision::Exact,
        )
    }

    /// ScaleBatchNorm through `fused_linear_batch_norm`.
    fn batch_norm(&self, train: bool) -> Result<Tensor> {
        fused_linear_batch_norm(
            &self.x,
            &self.w,
            Some(&self.b),
            Some(&self.scale),
            Epilogue::per_feature_scale(),
            &self.bn(),
            train,
            Precision::Exact,
        )
        .map(|(y, _)| y)
    }

    /// Both ops, each with its op name (`OPS`); the BatchNorm op in train and eval mode.
    fn both(&self) -> Vec<(&'static str, Result<Tensor>)> {
        vec![
            (OPS[0], self.linear()),
            (OPS[1], self.batch_norm(true)),
            (OPS[1], self.batch_norm(false)),
        ]
    }
}

/// Asserts that both ops fail on `ops` with messages naming the op and every one of `needles`.
#[track_caller]
fn assert_both_err(ops: &Operands, needles: &[&str]) {
    for (op, result) in ops.both() {
        let mut all = vec![op];
        all.extend_from_slice(needles);
        assert_err(result, &all);
    }
}

/// `max |a - b|` over all elements, in f64.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Asserts bitwise equality of two tensors of one dtype.
#[track_caller]
fn assert_same(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims());
    assert_eq!(a.dtype(), b.dtype());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
}

/// `x·Wᵀ + b` in f64 with plain candle ops.
fn reference_z(ops: &Operands) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    f(&ops.x)
        .matmul(&f(&ops.w).t().unwrap())
        .unwrap()
        .broadcast_add(&f(&ops.b))
        .unwrap()
}

/// SwishScale in f64 with plain candle ops: `z * sigmoid(z) * FACTOR`.
fn reference_swish(ops: &Operands) -> Tensor {
    let z = reference_z(ops);
    let sigmoid = (z.neg().unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .recip()
        .unwrap();
    ((z * sigmoid).unwrap() * FACTOR).unwrap()
}

/// ScaleBatchNorm in eval mode in f64 with plain candle ops.
fn reference_batch_norm_eval(ops: &Operands) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let u = reference_z(ops).broadcast_mul(&f(&ops.scale)).unwrap();
    let inv_std = (f(&ops.running_var) + EPS)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    u.broadcast_sub(&f(&ops.running_mean))
        .unwrap()
        .broadcast_mul(&inv_std)
        .unwrap()
        .broadcast_mul(&f(&ops.gamma))
        .unwrap()
        .broadcast_add(&f(&ops.beta))
        .unwrap()
}

/// A module built from a fresh `VarMap` (PyTorch's initialisation).
fn fresh_model(config: &ModelConfig) -> Model {
    let map = VarMap::new();
    Model::load(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        config,
    )
    .unwrap()
}

fn config(kind: ModelKind, inp: usize, out: usize) -> ModelConfig {
    ModelConfig {
        kind,
        in_features: inp,
        out_features: out,
        scaling_factor: (kind != ModelKind::ScaleBatchNorm).then_some(FACTOR),
        eps: EPS,
        momentum: Some(0.1),
    }
}

/// The BatchNorm op and module take a `(batch, in)` matrix only, as PyTorch's `BatchNorm1d`
/// after a linear layer; the linear op and its modules take `(..., in)`, as `nn.Linear`, so only
/// a scalar input is wrong there.
#[test]
fn input_of_the_wrong_rank_is_rejected() {
    let base = Operands::new(4, 8, 6);
    for (dims, shown) in [(vec![8], "[8]"), (vec![2, 4, 8], "[2, 4, 8]")] {
        let ops = Operands {
            x: uniform(&dims, -1.0, 1.0, 9),
            ..Operands::new(4, 8, 6)
        };
        for train in [false, true] {
            assert_err(
                ops.batch_norm(train),
                &[OPS[1], "input must have shape (batch, in_features)", shown],
            );
            let model = fresh_model(&config(ModelKind::ScaleBatchNorm, 8, 6));
            assert_err(
                model.forward_t(&ops.x, train),
                &["input must have shape (batch, in_features)", shown],
            );
        }
    }
    let scalar = Operands {
        x: Tensor::new(1f32, &Device::Cpu).unwrap(),
        ..Operands::new(4, 8, 6)
    };
    assert_err(
        scalar.linear(),
        &[OPS[0], "input must have shape (..., in_features)", "[]"],
    );
    for kind in [ModelKind::SwishScale, ModelKind::SigmoidResidual] {
        let model = fresh_model(&config(kind, 8, 6));
        assert_err(
            model.forward_t(&scalar.x, false),
            &["input must have shape (..., in_features)", "[]"],
        );
    }
    // Leading dimensions do not hide a wrong feature count or an empty batch.
    let wrong_features = Operands {
        x: uniform(&[2, 3, 7], -1.0, 1.0, 10),
        ..Operands::new(4, 8, 6)
    };
    assert_err(wrong_features.linear(), &[OPS[0], "7 features", "[6, 8]"]);
    let empty = Operands {
        x: Tensor::zeros((2, 0, 8), DType::F32, &Device::Cpu).unwrap(),
        ..Operands::new(4, 8, 6)
    };
    assert_err(empty.linear(), &[OPS[0], "empty operands", "[2, 0, 8]"]);
    // The valid operands do work (the errors above come from the rank alone).
    for (op, result) in base.both() {
        assert_eq!(result.unwrap().dims(), &[4, 6], "{op}");
    }
}

/// `fused_linear` and the modules over it take any leading dimensions as `nn.Linear` does: the
/// output keeps them, and the output and every gradient (through autograd and through a trace)
/// are those of the same rows given as one `(batch, in)` matrix.
#[test]
fn leading_dimensions_are_flattened_like_nn_linear() {
    let ops = Operands::new(6, 8, 5);
    let epilogue = Epilogue::swish_scale(FACTOR);
    let linear =
        |x: &Tensor| fused_linear(x, &ops.w, Some(&ops.b), None, epilogue, Precision::Exact);
    // The gradients of Σ y ⊙ g for x, the weight and the bias, through Candle's autograd.
    let autograd_grads = |x: &Tensor, g: &Tensor| -> Vec<Tensor> {
        let vars = [x, &ops.w, &ops.b].map(|t| Var::from_tensor(t).unwrap());
        let y = fused_linear(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            Some(vars[2].as_tensor()),
            None,
            epilogue,
            Precision::Exact,
        )
        .unwrap();
        let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect()
    };
    let traced_grads = |x: &Tensor, g: &Tensor| -> Vec<Tensor> {
        let (_, trace) =
            fused_linear_traced(x, &ops.w, Some(&ops.b), None, epilogue, Precision::Exact).unwrap();
        let grads = trace.backward(g).unwrap();
        [x, &ops.w, &ops.b]
            .iter()
            .map(|t| grads.get(t).unwrap().clone())
            .collect()
    };
    let matrix_y = linear(&ops.x).unwrap();
    let matrix_g = uniform(&[6, 5], -1.0, 1.0, 11);
    let matrix_autograd = autograd_grads(&ops.x, &matrix_g);
    let matrix_traced = traced_grads(&ops.x, &matrix_g);
    for leading in [vec![2, 3], vec![3, 1, 2], vec![1, 6]] {
        let x = ops.x.reshape([leading.as_slice(), &[8]].concat()).unwrap();
        let out_dims = [leading.as_slice(), &[5]].concat();
        let g = matrix_g.reshape(out_dims.as_slice()).unwrap();
        let y = linear(&x).unwrap();
        assert_eq!(y.dims(), out_dims.as_slice());
        assert_same(&y.reshape((6, 5)).unwrap(), &matrix_y);
        for (grads, matrix) in [
            (autograd_grads(&x, &g), &matrix_autograd),
            (traced_grads(&x, &g), &matrix_traced),
        ] {
            assert_eq!(grads[0].dims(), x.dims(), "{leading:?}");
            assert_same(&grads[0].reshape((6, 8)).unwrap(), &matrix[0]);
            assert_same(&grads[1], &matrix[1]);
            assert_same(&grads[2], &matrix[2]);
        }
        // A trace wants the gradient in the output's shape, not the flattened one.
        let (_, trace) =
            fused_linear_traced(&x, &ops.w, Some(&ops.b), None, epilogue, Precision::Exact)
                .unwrap();
        assert_err(
            trace.backward(&matrix_g),
            &["backward", "shape [6, 5]", &format!("{out_dims:?}")],
        );
    }
    // A single sample `(in,)` gives `(out,)`, the first row of the matrix result.
    let row = ops.x.get(0).unwrap();
    let y = linear(&row).unwrap();
    assert_eq!(y.dims(), &[5]);
    assert_same(&y, &matrix_y.get(0).unwrap());
    // Non-contiguous leading dimensions: the batch as the transpose of a (3, 2, 8) tensor.
    let x = ops.x.reshape((3, 2, 8)).unwrap().transpose(0, 1).unwrap();
    assert!(!x.is_contiguous());
    let expected = linear(&x.contiguous().unwrap()).unwrap();
    assert_same(&linear(&x).unwrap(), &expected);
    // Through the modules over the op.
    for kind in [ModelKind::SwishScale, ModelKind::SigmoidResidual] {
        let model = fresh_model(&config(kind, 8, 5));
        let x = ops.x.reshape((2, 3, 8)).unwrap();
        let batch = model.forward_t(&ops.x, false).unwrap();
        let y = model.forward_t(&x, false).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5]);
        assert_same(&y.reshape((6, 5)).unwrap(), &batch);
    }
}

#[test]
fn weight_of_wrong_rank_is_rejected() {
    for (dims, shown) in [(vec![6], "[6]"), (vec![1, 6, 8], "[1, 6, 8]")] {
        let ops = Operands {
            w: uniform(&dims, -0.5, 0.5, 10),
            ..Operands::new(4, 8, 6)
        };
        assert_both_err(
            &ops,
            &["weight must have shape (out_features, in_features)", shown],
        );
        let layer =
            FusedLinear::new(ops.w.clone(), Some(ops.b.clone()), None, Epilogue::IDENTITY).unwrap();
        assert_err(
            layer.forward(&ops.x),
            &["fused_linear", "weight must have shape", shown],
        );
    }
}

#[test]
fn in_features_mismatch_is_rejected() {
    let ops = Operands {
        w: uniform(&[6, 7], -0.5, 0.5, 11),
        ..Operands::new(4, 8, 6)
    };
    assert_both_err(
        &ops,
        &["the input has 8 features but the weight [6, 7] expects 7"],
    );
    // Through the modules: a model for 8 features fed 9.
    let x = uniform(&[4, 9], -1.0, 1.0, 12);
    for kind in [
        ModelKind::SwishScale,
        ModelKind::SigmoidResidual,
        ModelKind::ScaleBatchNorm,
    ] {
        let model = fresh_model(&config(kind, 8, 6));
        for train in [false, true] {
            assert_err(
                model.forward_t(&x, train),
                &["the input has 9 features but the weight [6, 8] expects 8"],
            );
        }
    }
}

#[test]
fn per_feature_vectors_of_the_wrong_length_are_rejected() {
    let good = || Operands::new(4, 8, 6);
    let short = || uniform(&[5], 0.5, 1.5, 13);
    let long = || uniform(&[7], 0.5, 1.5, 14);
    let row = || uniform(&[1, 6], 0.5, 1.5, 15);
    for (bad, shown) in [(short(), "[5]"), (long(), "[7]"), (row(), "[1, 6]")] {
        // The bias goes to both ops.
        let ops = Operands {
            b: bad.clone(),
            ..good()
        };
        assert_both_err(&ops, &["bias must have shape (6,)", shown]);
        // The others go to the BatchNorm op.
        let cases: [(&str, Operands); 5] = [
            (
                "scale",
                Operands {
                    scale: bad.clone(),
                    ..good()
                },
            ),
            (
                "bn.weight",
                Operands {
                    gamma: bad.clone(),
                    ..good()
                },
            ),
            (
                "bn.bias",
                Operands {
                    beta: bad.clone(),
                    ..good()
                },
            ),
            (
                "bn.running_mean",
                Operands {
                    running_mean: bad.clone(),
                    ..good()
                },
            ),
            (
                "bn.running_var",
                Operands {
                    running_var: bad.clone(),
                    ..good()
                },
            ),
        ];
        for (name, ops) in cases {
            let needle = format!("{name} must have shape (6,), got {shown}");
            for train in [true, false] {
                assert_err(ops.batch_norm(train), &[OPS[1], &needle]);
            }
        }
        // A per-feature scale through fused_linear.
        let ops = good();
        let result = fused_linear(
            &ops.x,
            &ops.w,
            Some(&ops.b),
            Some(&bad),
            Epilogue::per_feature_scale(),
            Precision::Exact,
        );
        assert_err(
            result,
            &[OPS[0], &format!("scale must have shape (6,), got {shown}")],
        );
        // And through a module built over existing tensors.
        let layer =
            FusedLinear::new(ops.w.clone(), Some(bad.clone()), None, Epilogue::IDENTITY).unwrap();
        assert_err(
            layer.forward(&ops.x),
            &[OPS[0], "bias must have shape (6,)", shown],
        );
    }
}

#[test]
fn dtype_mismatches_are_rejected() {
    let f32s = Operands::new(4, 8, 6);
    let f64s = f32s.to_dtype(DType::F64);
    let good = || Operands::new(4, 8, 6);
    let c = |t: &Tensor| t.clone();
    // The weight and the bias, for both ops.
    assert_both_err(
        &Operands {
            w: c(&f64s.w),
            ..good()
        },
        &["weight has dtype F64 but the input has F32"],
    );
    assert_both_err(
        &Operands {
            b: c(&f64s.b),
            ..good()
        },
        &["bias has dtype F64 but the input has F32"],
    );
    // An f64 input with f32 parameters: the weight is named.
    assert_both_err(
        &Operands {
            x: c(&f64s.x),
            ..good()
        },
        &["weight has dtype F32 but the input has F64"],
    );
    let cases: [(&str, Operands); 5] = [
        (
            "scale",
            Operands {
                scale: c(&f64s.scale),
                ..good()
            },
        ),
        (
            "bn.weight",
            Operands {
                gamma: c(&f64s.gamma),
                ..good()
            },
        ),
        (
            "bn.bias",
            Operands {
                beta: c(&f64s.beta),
                ..good()
            },
        ),
        (
            "bn.running_mean",
            Operands {
                running_mean: c(&f64s.running_mean),
                ..good()
            },
        ),
        (
            "bn.running_var",
            Operands {
                running_var: c(&f64s.running_var),
                ..good()
            },
        ),
    ];
    for (name, ops) in cases {
        let needle = format!("{name} has dtype F64 but the input has F32");
        for train in [true, false] {
            assert_err(ops.batch_norm(train), &[OPS[1], &needle]);
        }
    }
    // A half-precision input with f32 parameters.
    assert_both_err(
        &Operands {
            x: f32s.x.to_dtype(DType::BF16).unwrap(),
            ..good()
        },
        &["weight has dtype F32 but the input has BF16"],
    );
    // Through the modules: an f64 batch into an f32 model.
    for kind in [
        ModelKind::SwishScale,
        ModelKind::SigmoidResidual,
        ModelKind::ScaleBatchNorm,
    ] {
        let model = fresh_model(&config(kind, 8, 6));
        for train in [false, true] {
            assert_err(
                model.forward_t(&f64s.x, train),
                &["weight has dtype F32 but the input has F64"],
            );
        }
    }
    // All-f64 operands are fine.
    for (op, result) in f64s.both() {
        assert_eq!(result.unwrap().dtype(), DType::F64, "{op}");
    }
}

#[test]
fn integer_inputs_are_rejected() {
    let good = Operands::new(4, 8, 6);
    for dtype in [DType::U32, DType::I64, DType::U8] {
        let shown = format!("unsupported dtype {dtype:?}");
        // An integer input, with float parameters and with all operands integer.
        assert_both_err(
            &Operands {
                x: good.x.to_dtype(dtype).unwrap(),
                ..Operands::new(4, 8, 6)
            },
            &[&shown],
        );
        assert_both_err(&good.to_dtype(dtype), &[&shown]);
        // An integer weight with a float input.
        let needle = format!("weight has dtype {dtype:?} but the input has F32");
        assert_both_err(
            &Operands {
                w: good.w.to_dtype(dtype).unwrap(),
                ..Operands::new(4, 8, 6)
            },
            &[&needle],
        );
        // Through a module.
        let model = fresh_model(&config(ModelKind::SwishScale, 8, 6));
        assert_err(
            model.forward_t(&good.x.to_dtype(dtype).unwrap(), false),
            &[&shown],
        );
    }
}

#[test]
fn empty_operands_are_rejected() {
    for (batch, inp, out) in [(0, 8, 6), (4, 0, 6), (4, 8, 0)] {
        let ops = Operands::new(batch, inp, out);
        let needle = format!("empty operands: input [{batch}, {inp}], weight [{out}, {inp}]");
        assert_both_err(&ops, &[&needle]);
    }
    // Through a module: an empty batch.
    let model = fresh_model(&config(ModelKind::ScaleBatchNorm, 8, 6));
    let x = Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap();
    for train in [false, true] {
        assert_err(
            model.forward_t(&x, train),
            &["empty operands", "input [0, 8]"],
        );
    }
}

/// Broadcast views can have more elements than memory can address. Such an operand is refused by
/// name before its element count wraps (a product of 2^64 + 3 rows read as 3 rows, one of 2^64
/// as an empty batch) or its contiguous copy is attempted.
#[test]
fn operands_too_large_to_address_are_rejected() {
    let mut ops = Operands::new(2, 5, 4);
    let row = ops.x.narrow(0, 0, 1).unwrap();
    ops.x = row.broadcast_as((1usize << 62, 5)).unwrap();
    assert_both_err(
        &ops,
        &[
            "the input of shape [4611686018427387904, 5]",
            "more elements than memory can address",
        ],
    );
    let flat = row.reshape((1, 1, 5)).unwrap();
    for leading in [(467443687usize, 39463029637usize), (1 << 32, 1 << 32)] {
        let x = flat.broadcast_as((leading.0, leading.1, 5)).unwrap();
        let y = fused_linear(&x, &ops.w, None, None, Epilogue::IDENTITY, Precision::Exact);
        let shape = format!("the input of shape [{}, {}, 5]", leading.0, leading.1);
        assert_err(
            y,
            &[OPS[0], &shape, "more elements than memory can address"],
        );
    }
    let x = row.broadcast_as((1usize << 31, 5)).unwrap();
    let w = ops
        .w
        .narrow(0, 0, 1)
        .unwrap()
        .broadcast_as((1usize << 33, 5))
        .unwrap();
    let y = fused_linear(&x, &w, None, None, Epilogue::IDENTITY, Precision::Exact);
    assert_err(
        y,
        &[
            OPS[0],
            "the output of shape [2147483648, 8589934592]",
            "more elements",
        ],
    );
}

#[test]
fn batch_norm_train_needs_two_rows_but_eval_takes_one() {
    let ops = Operands::new(1, 8, 6);
    assert_err(
        ops.batch_norm(true),
        &[
            OPS[1],
            "train mode needs more than one value per feature, got a batch of 1",
        ],
    );
    // Eval mode normalises by the running statistics: one row is fine, and right.
    let y = ops.batch_norm(false).unwrap();
    assert_eq!(y.dims(), &[1, 6]);
    let err = max_abs_diff(&y, &reference_batch_norm_eval(&ops));
    assert!(err < 1e-5, "eval mode with one row is off by {err}");
    // Two rows are enough for train mode.
    let two = Operands::new(2, 8, 6);
    assert_eq!(two.batch_norm(true).unwrap().dims(), &[2, 6]);

    // Through the module: the failed train-mode forward leaves the running statistics alone.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let module = ScaleBatchNorm::load(vb, 8, 6, EPS, Some(0.1)).unwrap();
    let before: Vec<Vec<f64>> = module.buffers().iter().map(|(_, t)| to_f64(t)).collect();
    assert_err(module.forward_t(&ops.x, true), &["got a batch of 1"]);
    assert_eq!(module.forward_t(&ops.x, false).unwrap().dims(), &[1, 6]);
    let after: Vec<Vec<f64>> = module.buffers().iter().map(|(_, t)| to_f64(t)).collect();
    assert_eq!(
        before, after,
        "a rejected or eval-mode forward changed the buffers"
    );
}

#[test]
fn scale_must_be_given_exactly_for_a_per_feature_epilogue() {
    let ops = Operands::new(4, 8, 6);
    let given_needlessly = "a scale tensor was given but the epilogue's scale is not per-feature";
    let missing = "the epilogue has a per-feature scale but no scale tensor was given";
    for epilogue in [
        Epilogue::swish_scale(FACTOR),
        Epilogue::IDENTITY,
        Epilogue::activation(Activation::Relu),
    ] {
        let r = fused_linear(
            &ops.x,
            &ops.w,
            Some(&ops.b),
            Some(&ops.scale),
            epilogue,
            Precision::Exact,
        );
        assert_err(r, &[OPS[0], given_needlessly]);
        for train in [true, false] {
            let r = fused_linear_batch_norm(
                &ops.x,
                &ops.w,
                Some(&ops.b),
                Some(&ops.scale),
                epilogue,
                &ops.bn(),
                train,
                Precision::Exact,
            );
            assert_err(r, &[OPS[1], given_needlessly]);
        }
    }
    let r = fused_linear(
        &ops.x,
        &ops.w,
        Some(&ops.b),
        None,
        Epilogue::per_feature_scale(),
        Precision::Exact,
    );
    assert_err(r, &[OPS[0], missing]);
    for train in [true, false] {
        let r = fused_linear_batch_norm(
            &ops.x,
            &ops.w,
            Some(&ops.b),
            None,
            Epilogue::per_feature_scale(),
            &ops.bn(),
            train,
            Precision::Exact,
        );
        assert_err(r, &[OPS[1], missing]);
    }
    // The module refuses to be built either way.
    let needle = "a scale tensor must be given exactly when the epilogue's scale is per feature";
    assert_err(
        FusedLinear::new(
            ops.w.clone(),
            Some(ops.b.clone()),
            None,
            Epilogue::per_feature_scale(),
        ),
        &["FusedLinear", needle],
    );
    assert_err(
        FusedLinear::new(
            ops.w.clone(),
            Some(ops.b.clone()),
            Some(ops.scale.clone()),
            Epilogue::swish_scale(FACTOR),
        ),
        &["FusedLinear", needle],
    );
}

#[test]
fn eps_must_be_positive_and_momentum_in_range() {
    let ops = Operands::new(4, 8, 6);
    // The last is 0 as the f32 that the GPU takes, where a constant feature would get NaN.
    let cases = [0.0, -1e-5, f64::NAN, 1e-50].map(|eps| match eps {
        1e-50 => (eps, "eps 1e-50 is 0 as an f32".to_string()),
        _ => (eps, format!("eps must be positive, got {eps}")),
    });
    for (eps, needle) in cases {
        let bn = BatchNormParams { eps, ..ops.bn() };
        for train in [true, false] {
            let r = fused_linear_batch_norm(
                &ops.x,
                &ops.w,
                Some(&ops.b),
                Some(&ops.scale),
                Epilogue::per_feature_scale(),
                &bn,
                train,
                Precision::Exact,
            );
            assert_err(r, &[OPS[1], &needle]);
        }
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        assert_err(
            ScaleBatchNorm::load(vb, 8, 6, eps, Some(0.1)),
            &["ScaleBatchNorm", &needle],
        );
    }
    for momentum in [1.5, -0.1, f64::NAN] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        assert_err(
            ScaleBatchNorm::load(vb, 8, 6, EPS, Some(momentum)),
            &[
                "ScaleBatchNorm",
                &format!("momentum must be in [0, 1], got {momentum}"),
            ],
        );
    }
    // Model::load passes the config's eps on (a config built in code skips the JSON checks).
    let cfg = ModelConfig {
        eps: 0.0,
        ..config(ModelKind::ScaleBatchNorm, 8, 6)
    };
    let map = VarMap::new();
    assert_err(
        Model::load(
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
            &cfg,
        ),
        &[
            "scale_batchnorm: invalid config",
            "\"eps\" must be positive",
        ],
    );
    // And a SwishScale config without its factor is refused by name.
    let cfg = ModelConfig {
        scaling_factor: None,
        ..config(ModelKind::SwishScale, 8, 6)
    };
    let map = VarMap::new();
    assert_err(
        Model::load(
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
            &cfg,
        ),
        &["swish_scale: invalid config", "missing \"scaling_factor\""],
    );
    // Sizes of no weight or of one too large to address, and a factor that is not finite,
    // are refused before any variable is made.
    for cfg in [
        config(ModelKind::SigmoidResidual, 0, 6),
        config(ModelKind::SigmoidResidual, 1 << 62, 4),
        ModelConfig {
            scaling_factor: Some(f64::NAN),
            ..config(ModelKind::SwishScale, 8, 6)
        },
    ] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        assert_err(Model::load(vb, &cfg), &["invalid config"]);
        assert!(map.all_vars().is_empty(), "{cfg:?} made variables");
    }
    // FusedLinear::load has no per-feature scale to give: refused, with no variable made.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    assert_err(
        FusedLinear::load(vb, 3, 2, Epilogue::per_feature_scale()),
        &["a scale tensor must be given exactly when"],
    );
    assert!(map.all_vars().is_empty());
}

#[test]
fn non_contiguous_operands_are_accepted() {
    let ops = Operands::new(5, 8, 6);
    // The same values in other layouts: transposed copies, a column slice of a wider matrix, a
    // row slice with a start offset, and vectors read with a stride.
    let transposed = |t: &Tensor| t.t().unwrap().contiguous().unwrap().t().unwrap();
    let strided_vector = |v: &Tensor| {
        // Column 1 of an (out, 3) matrix: stride 3.
        let m = Tensor::stack(&[&v.zeros_like().unwrap(), v, &v.ones_like().unwrap()], 1).unwrap();
        m.narrow(1, 1, 1).unwrap().squeeze(1).unwrap()
    };
    let column_slice = |t: &Tensor| {
        // The matrix as the middle columns of a wider one.
        let pad = t.zeros_like().unwrap();
        Tensor::cat(&[&pad, t, &pad], 1)
            .unwrap()
            .narrow(1, t.dim(1).unwrap(), t.dim(1).unwrap())
            .unwrap()
    };
    let row_offset = |t: &Tensor| {
        let pad = t.ones_like().unwrap();
        Tensor::cat(&[&pad, t], 0)
            .unwrap()
            .narrow(0, t.dim(0).unwrap(), t.dim(0).unwrap())
            .unwrap()
    };
    let x_t = transposed(&ops.x);
    let w_t = transposed(&ops.w);
    assert!(!x_t.is_contiguous() && !w_t.is_contiguous());
    assert!(!column_slice(&ops.x).is_contiguous());
    assert!(!strided_vector(&ops.b).is_contiguous());
    let variants: Vec<(&str, Operands)> = vec![
        (
            "transposed x",
            Operands {
                x: x_t.clone(),
                ..Operands::new(5, 8, 6)
            },
        ),
        (
            "transposed weight",
            Operands {
                w: w_t.clone(),
                ..Operands::new(5, 8, 6)
            },
        ),
        (
            "both transposed",
            Operands {
                x: x_t,
                w: w_t,
                ..Operands::new(5, 8, 6)
            },
        ),
        (
            "column-sliced x and weight",
            Operands {
                x: column_slice(&ops.x),
                w: column_slice(&ops.w),
                ..Operands::new(5, 8, 6)
            },
        ),
        (
            "row-offset x and weight",
            Operands {
                x: row_offset(&ops.x),
                w: row_offset(&ops.w),
                ..Operands::new(5, 8, 6)
            },
        ),
        (
            "strided vectors",
            Operands {
                b: strided_vector(&ops.b),
                scale: strided_vector(&ops.scale),
                gamma: strided_vector(&ops.gamma),
                beta: strided_vector(&ops.beta),
                running_mean: strided_vector(&ops.running_mean),
                running_var: strided_vector(&ops.running_var),
                ..Operands::new(5, 8, 6)
            },
        ),
    ];
    let expected: Vec<Tensor> = ops.both().into_iter().map(|(_, r)| r.unwrap()).collect();
    // The contiguous results are right to begin with.
    let err = max_abs_diff(&expected[0], &reference_swish(&ops));
    assert!(err < 1e-5, "SwishScale is off by {err}");
    let err = max_abs_diff(&expected[2], &reference_batch_norm_eval(&ops));
    assert!(err < 1e-5, "ScaleBatchNorm (eval) is off by {err}");
    for (what, variant) in &variants {
        for ((op, result), want) in variant.both().into_iter().zip(&expected) {
            let got = result.unwrap_or_else(|e| panic!("{op} rejected {what}: {e}"));
            assert_same(&got, want);
        }
    }
    // Through a module built over a transposed weight, and with a transposed batch.
    let layer = FusedLinear::new(
        transposed(&ops.w),
        Some(ops.b.clone()),
        None,
        Epilogue::swish_scale(FACTOR),
    )
    .unwrap();
    assert_same(&layer.forward(&transposed(&ops.x)).unwrap(), &expected[0]);
    let map = VarMap::new();
    let swish = SwishScale::load(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        8,
        6,
        FACTOR,
    )
    .unwrap();
    assert_same(
        &swish.forward(&transposed(&ops.x)).unwrap(),
        &swish.forward(&ops.x).unwrap(),
    );

    // Gradients reach a non-contiguous variable too, equal to the contiguous one's.
    let grad_of_x = |x: &Tensor| {
        let x = candle_core::Var::from_tensor(x).unwrap();
        let y = fused_linear(
            x.as_tensor(),
            &ops.w,
            Some(&ops.b),
            None,
            Epilogue::swish_scale(FACTOR),
            Precision::Exact,
        )
        .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        grads.get(x.as_tensor()).unwrap().clone()
    };
    assert_same(&grad_of_x(&transposed(&ops.x)), &grad_of_x(&ops.x));
}

#[test]
fn unknown_names_are_rejected() {
    assert_err(
        "softplus".parse::<Activation>(),
        &["unknown activation \"softplus\"", "silu"],
    );
    assert_err("".parse::<Activation>(), &["unknown activation \"\""]);
    assert_err(
        "fp8".parse::<Precision>(),
        &["unknown precision \"fp8\"", "exact or tf32"],
    );
    assert_err("TF32".parse::<Precision>(), &["unknown precision \"TF32\""]);
    assert_err("mlp".parse::<ModelKind>(), &["unknown model \"mlp\""]);
    // The documented names do parse.
    assert_eq!("swish".parse::<Activation>().unwrap(), Activation::Silu);
    assert_eq!("tf32".parse::<Precision>().unwrap(), Precision::Tf32);
    assert_eq!("exact".parse::<Precision>().unwrap(), Precision::Exact);
    for kind in [
        ModelKind::SwishScale,
        ModelKind::ScaleBatchNorm,
        ModelKind::SigmoidResidual,
    ] {
        assert_eq!(kind.name().parse::<ModelKind>().unwrap(), kind);
    }
}

#[test]
fn trace_backward_rejects_a_mismatched_output_gradient() {
    for kind in [
        ModelKind::SwishScale,
        ModelKind::ScaleBatchNorm,
        ModelKind::SigmoidResidual,
    ] {
        let model = fresh_model(&config(kind, 6, 5));
        let x = uniform(&[4, 6], -1.0, 1.0, 7);
        let (y, trace) = model.forward_traced(&x, true).unwrap();
        assert_err(
            trace.backward(&Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap()),
            &["backward", "shape [4, 6]", "[4, 5]"],
        );
        assert_err(
            trace.backward(&y.to_dtype(DType::F64).unwrap()),
            &["backward", "F64", "F32"],
        );
        // The right gradient works, and twice gives the same answer: nothing accumulates.
        let g = uniform(&[4, 5], -1.0, 1.0, 8);
        let first = trace.backward(&g).unwrap();
        let second = trace.backward(&g).unwrap();
        for (name, t) in model.parameters() {
            let (a, b) = (first.get(&t).unwrap(), second.get(&t).unwrap());
            assert_eq!(to_f64(a), to_f64(b), "{name}");
        }
        assert!(first.get(&x).is_some());
    }
}

/// A train-mode forward with `bn.update` refuses running buffers that it could not write
/// safely (shared storage, strided views), a bad factor or counter, and leaves the buffers
/// untouched when it refuses; a valid one is PyTorch's update (checked in f64).
#[test]
fn running_update_in_the_forward_rejects_bad_buffers() {
    let ops = Operands::new(4, 8, 6).to_dtype(DType::F64);
    let count = Tensor::new(2i64, &Device::Cpu).unwrap();
    let forward = |bn: &BatchNormParams| {
        fused_linear_batch_norm(
            &ops.x,
            &ops.w,
            Some(&ops.b),
            Some(&ops.scale),
            Epilogue::per_feature_scale(),
            bn,
            true,
            Precision::Exact,
        )
    };
    let update = |factor, num_batches_tracked| RunningUpdate {
        factor,
        num_batches_tracked,
    };
    let (mean, var) = (
        ops.running_mean.copy().unwrap(),
        ops.running_var.copy().unwrap(),
    );
    let wide = Tensor::stack(&[&mean, &var], 1).unwrap();
    let strided = wide.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let in_x = ops.x.flatten_all().unwrap().narrow(0, 0, 6).unwrap();
    let f32_count = Tensor::new(2f32, &Device::Cpu).unwrap();
    let cases: [(Tensor, Tensor, RunningUpdate, &[&str]); 6] = [
        (
            mean.clone(),
            mean.clone(),
            update(0.1, None),
            &["bn.running_var shares its storage with bn.running_mean"],
        ),
        (
            in_x,
            var.clone(),
            update(0.1, None),
            &["bn.running_mean shares its storage with the input"],
        ),
        (
            strided,
            var.clone(),
            update(0.1, None),
            &["bn.running_mean must be contiguous"],
        ),
        (
            mean.clone(),
            var.clone(),
            update(1.5, None),
            &["factor must be in [0, 1], got 1.5"],
        ),
        (
            mean.clone(),
            var.clone(),
            update(0.1, Some(&f32_count)),
            &["num_batches_tracked must be one int64", "F32"],
        ),
        (
            mean.clone(),
            var.clone(),
            update(0.1, Some(&mean)),
            &["num_batches_tracked must be one int64"],
        ),
    ];
    for (running_mean, running_var, update, needles) in cases {
        let bn = BatchNormParams {
            running_mean: &running_mean,
            running_var: &running_var,
            update: Some(update),
            ..ops.bn()
        };
        let mut needles = needles.to_vec();
        needles.push(OPS[1]);
        assert_err(forward(&bn), &needles);
    }
    assert_eq!(
        to_f64(&mean),
        to_f64(&ops.running_mean),
        "a refused call wrote"
    );
    assert_eq!(
        to_f64(&var),
        to_f64(&ops.running_var),
        "a refused call wrote"
    );
    assert_eq!(count.to_scalar::<i64>().unwrap(), 2);

    let bn = BatchNormParams {
        running_mean: &mean,
        running_var: &var,
        update: Some(update(0.25, Some(&count))),
        ..ops.bn()
    };
    let (_, stats) = forward(&bn).unwrap();
    let stats = stats.unwrap();
    let blend = |running: &Tensor, batch: &Tensor, weight: f64| -> Vec<f64> {
        to_f64(running)
            .iter()
            .zip(to_f64(batch))
            .map(|(r, b)| 0.75 * r + 0.25 * weight * b)
            .collect()
    };
    assert_eq!(to_f64(&mean), blend(&ops.running_mean, &stats.mean, 1.0));
    assert_eq!(to_f64(&var), blend(&ops.running_var, &stats.var, 4.0 / 3.0));
    assert_eq!(count.to_scalar::<i64>().unwrap(), 3);
}

#[test]
fn running_statistics_update_rejects_bad_arguments() {
    let dev = &Device::Cpu;
    let stats = BatchStats {
        mean: Tensor::new(&[1f32, 2.0, 3.0], dev).unwrap(),
        var: Tensor::new(&[4f32, 5.0, 6.0], dev).unwrap(),
    };
    let mean = Var::from_tensor(&Tensor::zeros(3, DType::F32, dev).unwrap()).unwrap();
    let var = Var::from_tensor(&Tensor::ones(3, DType::F32, dev).unwrap()).unwrap();
    let short = Var::from_tensor(&Tensor::ones(2, DType::F32, dev).unwrap()).unwrap();
    assert_err(
        stats.update_running(&mean, &var, 1.5, 8),
        &["factor must be in [0, 1]", "1.5"],
    );
    assert_err(
        stats.update_running(&mean, &var, 0.1, 1),
        &["batch of at least 2"],
    );
    assert_err(
        stats.update_running(&mean, &short, 0.1, 8),
        &["running_var has shape [2]", "[3]"],
    );
    // Each rejected after the other buffer's checks passed: neither buffer is written.
    let int_stats = BatchStats {
        mean: stats.mean.clone(),
        var: Tensor::new(&[4i64, 5, 6], dev).unwrap(),
    };
    let var_as_mean = BatchStats {
        mean: var.as_tensor().clone(),
        var: stats.var.clone(),
    };
    let before = (to_f64(&mean), to_f64(&var));
    assert_err(
        int_stats.update_running(&mean, &var, 0.1, 8),
        &["batch statistic for running_var", "I64"],
    );
    assert_err(
        stats.update_running(&mean, &mean, 0.1, 8),
        &["running_var shares its storage with running_mean"],
    );
    assert_err(
        var_as_mean.update_running(&mean, &var, 0.1, 8),
        &["running_var shares its storage with the batch mean"],
    );
    assert_eq!((to_f64(&mean), to_f64(&var)), before);
    // Statistics in another float dtype or layout give what contiguous f32 ones give.
    let table = Tensor::new(&[[1f64, 4.0], [2.0, 5.0], [3.0, 6.0]], dev).unwrap();
    let strided_stats = BatchStats {
        mean: table
            .narrow(1, 0, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
        var: table.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(),
    };
    let (mean2, var2) = (
        Var::from_tensor(&mean.copy().unwrap()).unwrap(),
        Var::from_tensor(&var.copy().unwrap()).unwrap(),
    );
    strided_stats.update_running(&mean2, &var2, 0.1, 4).unwrap();
    // And a valid update is PyTorch's: momentum blend, unbiased variance for the running one.
    stats.update_running(&mean, &var, 0.1, 4).unwrap();
    assert_eq!(to_f64(&mean2), to_f64(&mean));
    assert_eq!(to_f64(&var2), to_f64(&var));
    assert_eq!(to_f64(&mean), [0.1, 0.2, 0.3].map(|v: f64| v as f32 as f64));
    let expected: Vec<f64> = [4.0, 5.0, 6.0]
        .iter()
        .map(|v: &f64| (0.9 + 0.1 * v * 4.0 / 3.0) as f32 as f64)
        .collect();
    assert_eq!(to_f64(&var), expected);
}
