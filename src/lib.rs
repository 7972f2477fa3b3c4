//! # candle-fused
//!
//! Fused Linear + epilogue operators for [Candle](https://github.com/huggingface/candle): a
//! linear layer and what follows it (activation, scale, residual, BatchNorm) computed as one op,
//! with CUDA kernels (feature `cuda`), a CPU fallback, autograd, and candle-nn-style modules
//! that load PyTorch checkpoints.
//!
//! - [`ops`]: the custom ops, [`fused_linear`] and [`fused_linear_batch_norm`];
//! - [`epilogue`]: what follows the product, as a composition of small pieces;
//! - [`nn`]: the modules ([`SwishScale`], [`ScaleBatchNorm`], [`SigmoidResidual`],
//!   [`FusedLinear`]);
//! - [`parity`]: running a model and comparing it with PyTorch's goldens;
//! - [`checkpoint`]: loading a PyTorch `state_dict` exported as safetensors, from a directory
//!   or a Hugging Face Hub cache.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_fused::{fused_linear, Epilogue, Precision};
//!
//! let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
//! let w = Tensor::randn(0f32, 1.0, (16, 8), &Device::Cpu)?;
//! let b = Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu)?;
//! // SwishScale: y = z * sigmoid(z) * 2 with z = x·Wᵀ + b.
//! let y = fused_linear(&x, &w, Some(&b), None, Epilogue::swish_scale(2.0), Precision::Exact)?;
//! assert_eq!(y.dims(), &[4, 16]);
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod epilogue;
pub mod nn;
pub mod ops;
pub mod parity;

pub use checkpoint::{Checkpoint, ModelConfig, ModelKind};
pub use epilogue::{Activation, Epilogue, OutputScale};
pub use nn::{FusedLinear, Model, ScaleBatchNorm, SigmoidResidual, SwishScale, TracedModuleT};
pub use ops::{
    fused_linear, fused_linear_batch_norm, fused_linear_batch_norm_traced, fused_linear_traced,
    BatchNormParams, BatchStats, Precision, RunningUpdate, Trace,
};

/// Makes `device` keep the memory of freed tensors for reuse, as PyTorch's caching allocator
/// does, instead of returning it to the driver at every synchronisation: large per-step buffers
/// (gradients, activations) are then not mapped again at each training step. The memory stays
/// reserved by the process. Does nothing on the CPU or in a build without `cuda`.
pub fn keep_freed_device_memory(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(device) = device {
        return cuda::keep_freed_memory(device);
    }
    let _ = device;
    Ok(())
}
