//! `y = epilogue(x·Wᵀ + b)` as a `CustomOp3` over `(x, weight, params)`.

use super::autograd::{self, Saved};
use super::trace::{linear_targets, Graph, Trace};
use super::{check_linear_operands, scale_operand, InputRank, ParamOperand, ParamRows, Precision};
use crate::cpu::{self, Accum};
use crate::epilogue::Epilogue;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

/// The fused linear op. One instance serves one forward call and its backward: it holds what
/// the forward kept for the backward.
struct FusedLinearOp {
    epilogue: Epilogue,
    rows: ParamRows,
    /// The per-feature vectors after the first, when the third input is not their table.
    held: Vec<Tensor>,
    precision: Precision,
    /// Whether the forward keeps the pre-activation (some input tracks gradients and the
    /// epilogue's derivative depends on `z`).
    keep_preactivation: bool,
    saved: Saved,
}

/// `y = epilogue(x·Wᵀ + b)`, fused: on the GPU one kernel computes the product and the
/// epilogue; on the CPU the epilogue is one pass over the product.
///
/// - `x`: `(..., in)`, as PyTorch's `nn.Linear` takes it: `(batch, in)`, `(in,)`, or any
///   leading dimensions, which the op flattens into one batch and `y` keeps (`(..., out)`);
///   `weight`: `(out, in)` (PyTorch's `nn.Linear` layout); `bias` and `scale`: `(out,)`. All of
///   one dtype (f32, f16, bf16; f64 on the CPU) and one device.
/// - `scale` is the learned per-feature factor and must be given exactly when
///   `epilogue.scale` is [`OutputScale::PerFeature`](crate::OutputScale::PerFeature).
/// - `precision` selects the f32 GPU product (see [`Precision`]).
///
/// Non-contiguous operands are copied to contiguous ones first. Gradients flow to `x`,
/// `weight`, `bias` and `scale` through Candle's autograd.
pub fn fused_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    epilogue: Epilogue,
    precision: Precision,
) -> Result<Tensor> {
    let call = LinearCall::new(x, weight, bias, scale, epilogue, precision, Graph::Autograd)?;
    let y = call
        .x
        .apply_op3_arc(&call.weight, &call.params, call.op.clone())?;
    call.caller_output(&y)
}

/// [`fused_linear`] outside Candle's autograd graph, with a [`Trace`] of the call whose
/// [`backward`](Trace::backward) returns the gradients of `x`, `weight`, `bias` and `scale`
/// directly. The forward keeps the pre-activation whenever the epilogue's derivative needs it.
pub fn fused_linear_traced(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    epilogue: Epilogue,
    precision: Precision,
) -> Result<(Tensor, Trace)> {
    let call = LinearCall::new(x, weight, bias, scale, epilogue, precision, Graph::Traced)?;
    let y = call
        .x
        .apply_op3_arc(&call.weight, &call.params, call.op.clone())?;
    let targets = linear_targets(x, weight, bias, scale, &call.rows);
    let output = call.caller_output(&y)?;
    let operands = [call.x, call.weight, call.params];
    let trace = Trace::new(call.op, operands, &y, output.dims(), targets);
    Ok((output, trace))
}

/// A checked fused-linear call, ready to apply: the op and its three operands.
struct LinearCall {
    op: Arc<Box<dyn CustomOp3 + Send + Sync>>,
    rows: ParamRows,
    /// The input as a `(batch, in)` matrix.
    x: Tensor,
    weight: Tensor,
    params: Tensor,
    /// The output's shape, `(..., out)`, when the input was not a matrix.
    output_shape: Option<Shape>,
}

impl LinearCall {
    fn new(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        scale: Option<&Tensor>,
        epilogue: Epilogue,
        precision: Precision,
        graph: Graph,
    ) -> Result<Self> {
        const OP: &str = "fused_linear";
        let mut vectors = Vec::new();
        if let Some(b) = bias {
            vectors.push(("bias", b));
        }
        vectors.extend(scale_operand(OP, &epilogue, scale)?);
        let (batch, in_features, out_features) =
            check_linear_operands(OP, x, weight, &vectors, InputRank::Leading)?;
        let output_shape = (x.rank() != 2).then(|| {
            let mut dims = x.dims()[..x.rank() - 1].to_vec();
            dims.push(out_features);
            Shape::from(dims)
        });
        let [x, weight] = graph.operands([x, weight]);
        let x = match output_shape {
            Some(_) => x.reshape((batch, in_features))?,
            None => x,
        };
        let bias = bias.map(|b| graph.operand(b));
        let scale: Vec<Tensor> = scale.map(|s| graph.operand(s)).into_iter().collect();
        let ParamOperand {
            input: params,
            held,
        } = ParamOperand::new(
            bias.as_ref(),
            &scale.iter().collect::<Vec<_>>(),
            &weight,
            &[],
        )?;
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        let rows = ParamRows::linear(&epilogue);
        let op = FusedLinearOp {
            epilogue,
            rows,
            held,
            precision,
            keep_preactivation: graph.keeps_for_backward(&[&x, &weight, &params])
                && epilogue.backward_needs_preactivation(),
            saved: Saved::default(),
        };
        Ok(Self {
            op: Arc::new(Box::new(op)),
            rows,
            x,
            weight,
            params,
            output_shape,
        })
    }

    /// The op's `(batch, out)` output `y` in the shape that the caller's input implies:
    /// `(..., out)`, or `y` itself for a matrix input (no reshape in Candle's graph).
    fn caller_output(&self, y: &Tensor) -> Result<Tensor> {
        match &self.output_shape {
            Some(shape) => y.reshape(shape),
            None => Ok(y.clone()),
        }
    }
}

impl FusedLinearOp {
    fn cpu_forward<A: Accum>(
        &self,
        (x, w, p): (&[A], &[A], &[A]),
        (m, n, k): (usize, usize, usize),
        dtype: DType,
    ) -> Result<CpuStorage> {
        let (y, z) = cpu::linear_epilogue(
            (x, w, p),
            (m, n, k),
            dtype,
            self.rows,
            &self.epilogue,
            self.keep_preactivation,
        );
        if let Some(z) = z {
            self.saved
                .keep_preactivation(Storage::Cpu(A::to_storage(z, dtype)?), (m, n))?;
        }
        A::to_storage(y, dtype)
    }
}

impl CustomOp3 for FusedLinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        p: &CpuStorage,
        p_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let n = w_l.dims()[0];
        let dims = (m, n, k);
        if !self.held.is_empty() {
            candle_core::bail!("fused_linear: per-feature vectors held outside a table on the CPU");
        }
        let y = match x.dtype() {
            DType::F64 => self.cpu_forward(
                (
                    &f64::slice(x, x_l)?,
                    &f64::slice(w, w_l)?,
                    &f64::slice(p, p_l)?,
                ),
                dims,
                x.dtype(),
            )?,
            dtype => self.cpu_forward(
                (
                    &f32::slice(x, x_l)?,
                    &f32::slice(w, w_l)?,
                    &f32::slice(p, p_l)?,
                ),
                dims,
                dtype,
            )?,
        };
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
        p: &candle_core::CudaStorage,
        p_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n) = (x_l.dims()[0], w_l.dims()[0]);
        let (y, z) = super::with_cuda_param_rows((p, p_l), &self.held, n, |params| {
            let problem =
                super::cuda_problem((x, x_l), (w, w_l), params, self.epilogue, self.precision)?;
            crate::cuda::linear_forward(&problem, self.keep_preactivation)
        })?;
        if let Some(z) = z {
            self.saved.keep_preactivation(Storage::Cuda(z), (m, n))?;
        }
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = self.saved.preactivation()?;
        let dy = dy.contiguous()?;
        // With held vectors the third gradient is still the whole table's, `(rows, out)`: only a
        // trace (nothing tracks gradients then) calls this, and it takes the rows it needs.
        let p = &ParamOperand::table(p, &self.held)?;
        let (dz, dparams) = match dy.device() {
            Device::Cpu => match dy.dtype() {
                DType::F64 => self.cpu_backward::<f64>(&dy, z.as_ref(), p)?,
                _ => self.cpu_backward::<f32>(&dy, z.as_ref(), p)?,
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                autograd::cuda_epilogue_backward(&dy, z.as_ref(), p, &self.epilogue)?
            }
            device => autograd::unsupported_device(self.name(), device)?,
        };
        let (dx, dw) = autograd::input_and_weight_grads(&dz, x, w, self.precision)?;
        Ok((Some(dx), Some(dw), Some(dparams)))
    }
}

impl FusedLinearOp {
    /// The epilogue backward on the CPU: `(dz, dparams)`.
    fn cpu_backward<A: Accum>(
        &self,
        dy: &Tensor,
        z: Option<&Tensor>,
        p: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let z = z.map(A::host_vec).transpose()?;
        let (dz, dparams) = cpu::epilogue_backward(
            &A::host_vec(dy)?,
            z.as_deref(),
            &A::host_vec(p)?,
            self.rows,
            p.dim(1)?,
            &self.epilogue,
        );
        autograd::host_grads(dz, dparams, dy, p)
    }
}
