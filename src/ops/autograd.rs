//! What a forward keeps for its backward, and the backward's device plumbing.

use super::Precision;
use crate::cpu::Accum;
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Tensors a forward call keeps for its backward. Written once by the forward, read by the
/// backward; empty when no input tracked gradients.
#[derive(Default)]
pub(super) struct Saved {
    preactivation: Mutex<Option<Tensor>>,
    stats: Mutex<Option<Tensor>>,
}

/// A tensor over freshly computed storage, outside the autograd graph.
pub(super) fn detached(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn store(slot: &Mutex<Option<Tensor>>, tensor: Tensor) -> Result<()> {
    *slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("fused op: saved state poisoned".into()))? =
        Some(tensor);
    Ok(())
}

fn load(slot: &Mutex<Option<Tensor>>) -> Result<Option<Tensor>> {
    Ok(slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("fused op: saved state poisoned".into()))?
        .clone())
}

impl Saved {
    /// Keeps the pre-activation `z`.
    pub(super) fn keep_preactivation(&self, storage: Storage, shape: (usize, usize)) -> Result<()> {
        store(&self.preactivation, detached(storage, shape))
    }

    /// Keeps the per-feature statistics, `(2, out)`: mean and biased variance.
    pub(super) fn keep_stats(&self, stats: Tensor) -> Result<()> {
        store(&self.stats, stats)
    }

    /// The pre-activation, if the forward kept it.
    pub(super) fn preactivation(&self) -> Result<Option<Tensor>> {
        load(&self.preactivation)
    }

    /// The statistics of the forward.
    pub(super) fn stats(&self) -> Result<Tensor> {
        match load(&self.stats)? {
            Some(stats) => Ok(stats),
            None => bail!("fused op: the forward has not run, no statistics were kept"),
        }
    }
}

/// The offset of a contiguous operand's first element, or an error.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn contiguous_start(layout: &Layout) -> Result<usize> {
    match layout.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => bail!(
            "fused op: operand with shape {:?} is not contiguous",
            layout.dims()
        ),
    }
}

/// `(dz, dparams)` as CPU tensors of `dy`'s dtype, shaped like `dy` and `params`.
pub(super) fn host_grads<A: Accum>(
    dz: Vec<A>,
    dparams: Vec<f64>,
    dy: &Tensor,
    params: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dz = detached(
        Storage::Cpu(A::to_storage(dz, dy.dtype())?),
        dy.shape().clone(),
    );
    let dparams = Tensor::from_vec(dparams, params.shape(), &Device::Cpu)?.to_dtype(dy.dtype())?;
    Ok((dz, dparams))
}

/// The gradients of `z = x·Wᵀ + b` at `x` and `W` given `dz`: `dz·W` and `dzᵀ·x`.
///
/// On the CPU the products run in the accumulation type (Candle's CPU matmul has no bf16); on
/// the GPU in the op's `precision`: exact f32 on the crate's fp32-accurate 3xTF32 split, the
/// others on cuBLAS, with the crate's own kernels for small batches' products (see
/// [`linear_input_and_weight_grads`](crate::cuda::linear_input_and_weight_grads)).
pub(super) fn input_and_weight_grads(
    dz: &Tensor,
    x: &Tensor,
    w: &Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] precision: Precision,
) -> Result<(Tensor, Tensor)> {
    match dz.device() {
        Device::Cpu => match dz.dtype() {
            DType::F64 => cpu_input_and_weight_grads::<f64>(dz, x, w),
            _ => cpu_input_and_weight_grads::<f32>(dz, x, w),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            use crate::cuda::BackwardOperands;
            let ((m, n), k) = (dz.dims2()?, x.dim(1)?);
            let wanted = crate::cuda::takes_batch_major(dz.dtype());
            let copy = |t: &Tensor| wanted.then(|| cuda_transposed(t)).transpose();
            let (dz_t, x_t) = (copy(dz)?, copy(x)?);
            let (dx, dw) = cuda_operands(
                [dz, x, w],
                [dz_t.as_ref(), x_t.as_ref()],
                |[dz, x, w], [dz_t, x_t]| {
                    let operands = BackwardOperands {
                        dz,
                        x,
                        w,
                        batch_major: dz_t.zip(x_t),
                    };
                    crate::cuda::linear_input_and_weight_grads(&operands, (m, n, k), precision)
                },
            )?;
            Ok((
                detached(Storage::Cuda(dx), (m, k)),
                detached(Storage::Cuda(dw), (n, k)),
            ))
        }
        device => unsupported_device("fused_linear backward", device),
    }
}

fn cpu_input_and_weight_grads<A: Accum>(
    dz: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> Result<(Tensor, Tensor)> {
    use crate::cpu::{matmul_into, Transpose};
    let ((m, n), k) = (dz.dims2()?, x.dim(1)?);
    let (dz_h, x_h, w_h) = (A::host_vec(dz)?, A::host_vec(x)?, A::host_vec(w)?);
    let mut dx = vec![A::zero(); m * k];
    matmul_into(&mut dx, &dz_h, &w_h, (m, k, n), Transpose::None, false);
    let mut dw = vec![A::zero(); n * k];
    matmul_into(&mut dw, &dz_h, &x_h, (n, k, m), Transpose::A, false);
    let as_tensor = |v: Vec<A>, shape: (usize, usize)| -> Result<Tensor> {
        Ok(detached(Storage::Cpu(A::to_storage(v, dz.dtype())?), shape))
    };
    Ok((as_tensor(dx, (m, k))?, as_tensor(dw, (n, k))?))
}

/// The error for a device no path exists for.
pub(super) fn unsupported_device<T>(op: &str, device: &Device) -> Result<T> {
    bail!("{op}: no implementation for device {:?}", device.location())
}

#[cfg(feature = "cuda")]
mod cuda_glue {
    use super::*;
    use crate::cuda::Operand;
    use crate::epilogue::Epilogue;
    use candle_core::Layout;

    /// The storages and first-element offsets of CUDA tensors, each made contiguous, for `f`:
    /// every `required` tensor, and each `optional` one that is present.
    pub(crate) fn cuda_operands<R, const N: usize, const M: usize>(
        required: [&Tensor; N],
        optional: [Option<&Tensor>; M],
        f: impl FnOnce([Operand; N], [Option<Operand>; M]) -> Result<R>,
    ) -> Result<R> {
        fn operand<'a>(storage: &'a Storage, layout: &Layout) -> Result<Operand<'a>> {
            match storage {
                Storage::Cuda(s) => Ok((s, contiguous_start(layout)?)),
                _ => bail!("fused op: expected a CUDA tensor"),
            }
        }
        let required = required
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let optional = optional
            .iter()
            .map(|t| t.map(Tensor::contiguous).transpose())
            .collect::<Result<Vec<_>>>()?;
        let required_guards: Vec<_> = required.iter().map(Tensor::storage_and_layout).collect();
        let optional_guards: Vec<_> = optional
            .iter()
            .map(|t| t.as_ref().map(Tensor::storage_and_layout))
            .collect();
        let required: [Operand; N] = required_guards
            .iter()
            .map(|(storage, layout)| operand(storage, layout))
            .collect::<Result<Vec<_>>>()?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("fused op: operand count".into()))?;
        let mut present = [None; M];
        for (slot, guard) in present.iter_mut().zip(&optional_guards) {
            if let Some((storage, layout)) = guard {
                *slot = Some(operand(storage, layout)?);
            }
        }
        f(required, present)
    }

    /// `tᵀ` of a 2-D CUDA tensor, contiguous, by the fused transpose kernel.
    pub(crate) fn cuda_transposed(t: &Tensor) -> Result<Tensor> {
        let (rows, cols) = t.dims2()?;
        let storage = cuda_operands([t], [], |[a], []| crate::cuda::transpose(a, (rows, cols)))?;
        Ok(detached(Storage::Cuda(storage), (cols, rows)))
    }

    /// The epilogue backward on the GPU: `(dz, dparams)`.
    pub(crate) fn cuda_epilogue_backward(
        dy: &Tensor,
        z: Option<&Tensor>,
        params: &Tensor,
        epilogue: &Epilogue,
    ) -> Result<(Tensor, Tensor)> {
        let (m, n) = dy.dims2()?;
        let (dz, dparams) = cuda_operands([dy, params], [z], |[dy, p], [z]| {
            crate::cuda::epilogue_backward(dy, z, p, m, n, *epilogue)
        })?;
        Ok((
            detached(Storage::Cuda(dz), (m, n)),
            detached(Storage::Cuda(dparams), params.shape().clone()),
        ))
    }

    /// The BatchNorm backward (composed with the epilogue's) on the GPU: `(dz, dparams)`.
    pub(crate) fn cuda_batch_norm_backward(
        dy: &Tensor,
        z: Option<&Tensor>,
        params: &Tensor,
        stats: &Tensor,
        epilogue: &Epilogue,
        eps: f64,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let Some(z) = z else {
            bail!("fused_linear_batch_norm: backward without a kept pre-activation")
        };
        let (m, n) = dy.dims2()?;
        let (dz, dparams) = cuda_operands([dy, z, params, stats], [], |[dy, z, p, s], []| {
            crate::cuda::batch_norm_backward(dy, z, p, s, m, n, *epilogue, eps, train)
        })?;
        Ok((
            detached(Storage::Cuda(dz), (m, n)),
            detached(Storage::Cuda(dparams), params.shape().clone()),
        ))
    }
}

#[cfg(feature = "cuda")]
pub(super) use cuda_glue::*;
