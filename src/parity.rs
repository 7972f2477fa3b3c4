//! Running a model the way the `run` example does, and comparing what it produces with the
//! goldens that `scripts/export.py` computes with PyTorch in float64.
//!
//! A golden file (`golden.safetensors`) holds an input `x`, an upstream gradient `g`, and for
//! each mode (`train`, `eval`): `y.<mode>`, `grad.<mode>.x`, `grad.<mode>.<parameter>`; and for
//! BatchNorm models the buffers after one train-mode forward, `after_train.bn.running_mean`,
//! `after_train.bn.running_var` and `after_train.bn.num_batches_tracked`.

use crate::nn::{Model, TracedModuleT};
use candle_core::{DType, ModuleT, Result, Tensor, Var};
use std::collections::HashMap;

/// How [`forward_backward`] computes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientPath {
    /// Candle's autograd: `(y * g).sum().backward()`.
    Autograd,
    /// The model's [`Trace`](crate::Trace): `forward_traced`, then `backward(g)`.
    Trace,
}

/// What one forward (and, given `g`, backward) of a model produces, under the names the `run`
/// example writes: `y`, `grad.x`, `grad.<parameter>`, and after a train-mode forward of a
/// BatchNorm model its buffers (`bn.running_mean`, …).
pub fn forward_backward(
    model: &Model,
    x: &Tensor,
    g: Option<&Tensor>,
    train: bool,
    path: GradientPath,
) -> Result<Vec<(String, Tensor)>> {
    let Some(g) = g else {
        let mut outputs = vec![("y".to_string(), model.forward_t(x, train)?)];
        if train {
            outputs.extend(model.buffers());
        }
        return Ok(outputs);
    };
    let g = g.to_dtype(x.dtype())?;
    let (x, y, grads) = match path {
        GradientPath::Autograd => {
            let x = Var::from_tensor(x)?.as_tensor().clone();
            let y = model.forward_t(&x, train)?;
            check_gradient_shape(&g, &y)?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            (x, y, grads)
        }
        GradientPath::Trace => {
            let (y, trace) = model.forward_traced(x, train)?;
            check_gradient_shape(&g, &y)?;
            let grads = trace.backward(&g)?;
            (x.clone(), y, grads)
        }
    };
    let mut outputs = vec![("y".to_string(), y)];
    let mut named = vec![("x".to_string(), x)];
    named.extend(model.parameters());
    for (name, t) in named {
        let grad = grads
            .get(&t)
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached {name}")))?;
        outputs.push((format!("grad.{name}"), grad.clone()));
    }
    if train {
        outputs.extend(model.buffers());
    }
    Ok(outputs)
}

fn check_gradient_shape(g: &Tensor, y: &Tensor) -> Result<()> {
    if g.dims() != y.dims() {
        candle_core::bail!(
            "the gradient g has shape {:?} but the output has {:?}",
            g.dims(),
            y.dims()
        );
    }
    Ok(())
}

/// The golden key that an output of [`forward_backward`] is compared with.
pub fn golden_key(output: &str, train: bool) -> String {
    let mode = if train { "train" } else { "eval" };
    match output.strip_prefix("grad.") {
        Some(rest) => format!("grad.{mode}.{rest}"),
        None if output == "y" => format!("y.{mode}"),
        None => format!("after_train.{output}"),
    }
}

/// One output's agreement with its golden.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The output's name.
    pub name: String,
    /// `max |ours - golden| / max |golden|`, or the plain maximum difference when the golden
    /// is zero to working precision (e.g. a bias gradient that BatchNorm cancels).
    pub error: f64,
    /// Whether `error` is relative (else absolute).
    pub relative: bool,
    /// Whether `error` is within the tolerance (always true when not `checked`).
    pub ok: bool,
    /// Whether the tolerance applies; see [`cancelled_by_batch_norm`].
    pub checked: bool,
}

/// Whether `name` is a gradient that train-mode BatchNorm cancels: the loss does not depend on
/// a per-feature shift of its input, and on a per-feature scale only through `eps`, so the
/// gradients of the linear bias and of the learned scale are sums whose terms cancel to
/// (nearly) zero. Their golden values lie below the resolution of f16 and bf16, so those dtypes
/// cannot reproduce them; f32 and f64 are still held to their tolerance.
pub fn cancelled_by_batch_norm(name: &str, train: bool, golden: &HashMap<String, Tensor>) -> bool {
    train
        && golden.contains_key("after_train.bn.running_mean")
        && matches!(name, "grad.gemm.bias" | "grad.scale")
}

/// `|ours − golden|` for one element, where a NaN or an infinity agrees only with itself: equal
/// infinities and two NaNs differ by 0, a non-finite value against any other by infinity.
fn element_difference(ours: f64, golden: f64) -> f64 {
    if ours.is_finite() && golden.is_finite() {
        (ours - golden).abs()
    } else if ours == golden || (ours.is_nan() && golden.is_nan()) {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Compares every output with its golden (a NaN or an infinity agrees only with itself); an
/// output without a golden is an error. With `half_precision`, the gradients of
/// [`cancelled_by_batch_norm`] are reported unchecked.
pub fn compare(
    outputs: &[(String, Tensor)],
    golden: &HashMap<String, Tensor>,
    train: bool,
    tolerance: f64,
    half_precision: bool,
) -> Result<Vec<Comparison>> {
    outputs
        .iter()
        .map(|(name, ours)| {
            let key = golden_key(name, train);
            let reference = golden.get(&key).ok_or_else(|| {
                candle_core::Error::Msg(format!("the golden file has no {key:?}"))
            })?;
            if ours.dims() != reference.dims() {
                candle_core::bail!(
                    "{name}: shape {:?}, golden {key} has {:?}",
                    ours.dims(),
                    reference.dims()
                );
            }
            let ours = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let reference = reference
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let diff = ours
                .iter()
                .zip(&reference)
                .map(|(&a, &b)| element_difference(a, b))
                .fold(0f64, f64::max);
            let magnitude = reference
                .iter()
                .filter(|v| v.is_finite())
                .fold(0f64, |m, v| m.max(v.abs()));
            let relative = magnitude > 1e-10;
            let error = if relative { diff / magnitude } else { diff };
            let checked = !(half_precision && cancelled_by_batch_norm(name, train, golden));
            Ok(Comparison {
                name: name.clone(),
                error,
                relative,
                ok: !checked || error <= tolerance,
                checked,
            })
        })
        .collect()
}

/// The tolerance for comparing with float64 goldens: the precision of the computation.
pub fn tolerance(dtype: DType, tf32: bool) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 if tf32 => 5e-4,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(ours: &[f32], golden: &[f32]) -> Comparison {
        let tensor = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let goldens = HashMap::from([("y.eval".to_string(), tensor(golden))]);
        let outputs = [("y".to_string(), tensor(ours))];
        compare(&outputs, &goldens, false, 1e-5, false)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn non_finite_values_agree_only_with_themselves() {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        for (ours, golden, ok) in [
            ([1.0, 2.0], [1.0, 2.0], true),
            ([1.0, 2.0], [1.0, 2.1], false),
            ([1.0, 2.0], [nan, 2.0], false),
            ([nan, 2.0], [1.0, 2.0], false),
            ([nan, 2.0], [nan, 2.0], true),
            ([inf, 2.0], [inf, 2.0], true),
            ([-inf, 2.0], [inf, 2.0], false),
            ([1.0, 2.0], [inf, 2.0], false),
        ] {
            let comparison = check(&ours, &golden);
            assert_eq!(
                comparison.ok, ok,
                "{ours:?} against {golden:?}: {comparison:?}"
            );
            assert!(!comparison.error.is_nan(), "{ours:?} against {golden:?}");
        }
    }
}
