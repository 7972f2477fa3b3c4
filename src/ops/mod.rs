//! The fused operators, as Candle custom ops with autograd.
//!
//! Two ops cover the three seed models:
//!
//! - [`fused_linear`]: `y = epilogue(x·Wᵀ + b)` (SwishScale, SigmoidResidual, or any
//!   [`Epilogue`]);
//! - [`fused_linear_batch_norm`]: `y = BatchNorm1d(epilogue(x·Wᵀ + b))` in train or eval mode
//!   (ScaleBatchNorm).
//!
//! Both are `CustomOp3`s over `(x, weight, params)`, where `params` is a per-feature table of
//! shape `(rows, out)` stacked from the bias, the optional learned scale and the BatchNorm
//! parameters (see [`ParamRows`]). Stacking keeps the op at three inputs while Candle's autograd
//! routes each row of the table's gradient back to the tensor it came from. On CUDA, when no
//! gradient flows through the vectors (inference, or a traced call), nothing is stacked: `params`
//! is the bias, the op holds the other vectors, and the kernels read each where it lies.
//!
//! **Two ways to the gradients.** Under Candle's autograd ([`fused_linear`],
//! [`fused_linear_batch_norm`] with operands that track gradients, then `Tensor::backward`), or
//! through a [`Trace`] ([`fused_linear_traced`], [`fused_linear_batch_norm_traced`]), whose
//! backward returns the gradients directly without Candle's gradient store. Both run the same
//! fused backward: one kernel for the gradient at the pre-activation and the per-feature
//! parameter gradients, then the input and weight products in the op's precision (on the GPU:
//! exact f32 on the crate's fp32-accurate 3xTF32 GEMM, the others on cuBLAS; the exact f32 input
//! gradient, and the TF32 one of a batch of at most 128 rows, run on the crate's Hopper kernel
//! that reads the weight as it lies; the weight gradient of a batch of at most 128 rows runs in
//! exact f32 as one TF32 cuBLAS GEMM over the same split, and in TF32, f16 and bf16 on the
//! crate's Hopper kernel).
//!
//! **Where 16-bit ops round.** f16 and bf16 compute in f32 and round where a tensor is stored
//! and where PyTorch's separate ops would: the pre-activation `z` (which the backward reads
//! back) before the epilogue sees it, a train-mode BatchNorm's input `u` before its statistics
//! are taken, and the output. So the backward differentiates at the values the forward used:
//! for BatchNorm in training this is what keeps its `x̂` the forward's, whose sum cancels the
//! gradient of a shift; rebuilt from other values, each `x̂` moves by up to ulp(u)/σ.
//!
//! **What the forward keeps for the backward.** Only when some input tracks gradients (or the
//! call is traced), the op keeps the pre-activation `z = x·Wᵀ + b` (one `batch × out` tensor in
//! the input dtype), because every derivative of the epilogue is a pointwise function of `z` and
//! recomputing it would cost a second GEMM. When the epilogue is `z * constant` nothing is kept.
//! The BatchNorm op also keeps its `(2, out)` f32 statistics (mean and biased variance). In
//! inference nothing extra is kept or written.
//!
//! **What the backward allocates for a moment.** Tensor-core products read f32 operands along
//! the contraction, so on the GPU the f32 backward makes transposed copies, freed when it
//! returns: `dzᵀ` and `xᵀ` (batch-sized) in TF32 and exact f32; for a batch of at most 128 rows,
//! exact f32 instead makes the split copies of `dzᵀ` and `xᵀ` (three times their size). Exact
//! f32 also makes dz's TF32 remainders (its size) for the Hopper kernel that reads `W` as it
//! lies, and `Wᵀ`, one more weight-sized buffer, only where that kernel does not take the input
//! gradient (another GPU, or a shape it does not take); TF32 makes dz rounded to TF32 (its size)
//! for that kernel when a batch of at most 128 rows uses it.
//!
//! **What stays allocated between calls.** On the GPU, each host thread keeps one workspace per
//! device and stream, of up to 64 MiB, which the next forward or backward there reuses: a
//! train-mode BatchNorm's partial statistics, the exact f32 forward's TF32 remainders of x (x's
//! size, where its Hopper kernel takes the problem: enough output tiles to fill the GPU), the
//! exact f32 GEMM's partial tiles where CTAs share a tile, and the backward's per-feature
//! partial sums. It grows to the largest need seen; a need above 64 MiB is allocated for the
//! call and freed when it returns.

mod autograd;
mod batch_norm;
pub(crate) use batch_norm::check_eps;
mod linear;
mod trace;

pub use batch_norm::{
    fused_linear_batch_norm, fused_linear_batch_norm_traced, BatchNormParams, BatchStats,
    RunningUpdate,
};
pub use linear::{fused_linear, fused_linear_traced};
pub use trace::Trace;

use crate::epilogue::Epilogue;
use candle_core::{bail, DType, Device, Result, Tensor};

/// How an f32 product is computed on the GPU. bf16, f16 and f64 ignore it, and so does the CPU,
/// which always computes f32 in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    /// fp32-accurate (the default): on the GPU an error-compensated tensor-core product whose
    /// error against a float64 reference is no larger than twice cuBLAS's fp32 error.
    #[default]
    Exact,
    /// TF32 tensor cores (10-bit mantissa inputs, f32 accumulation), like PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32 = True`.
    Tf32,
}

impl std::str::FromStr for Precision {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Precision::Exact),
            "tf32" => Ok(Precision::Tf32),
            other => bail!("unknown precision {other:?}: expected exact or tf32"),
        }
    }
}

/// Where each per-feature vector sits in the op's `(rows, out)` parameter table.
///
/// Row 0 is the bias, then the learned scale when the epilogue has one; the BatchNorm op
/// appends gamma and beta, and in eval mode the running mean and variance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamRows {
    /// Row of the per-feature scale, if the epilogue has one.
    pub scale: Option<usize>,
    /// Row of BatchNorm's gamma (beta follows it), if this is the BatchNorm op.
    pub gamma: Option<usize>,
    /// Row of the running mean (the running variance follows it), in BatchNorm eval mode.
    pub running_mean: Option<usize>,
    /// The number of rows.
    pub len: usize,
}

impl ParamRows {
    /// The rows of a fused linear op's table.
    pub fn linear(epilogue: &Epilogue) -> Self {
        let scale = epilogue.has_scale_param().then_some(1);
        ParamRows {
            scale,
            gamma: None,
            running_mean: None,
            len: 1 + scale.is_some() as usize,
        }
    }

    /// The row of BatchNorm's gamma (beta follows it), or an error naming `op` for a table
    /// without BatchNorm rows.
    pub fn batch_norm_gamma(&self, op: &str) -> Result<usize> {
        match self.gamma {
            Some(gamma) => Ok(gamma),
            None => bail!("{op}: the parameter table has no BatchNorm rows"),
        }
    }

    /// The rows of a fused linear + BatchNorm op's table.
    pub fn batch_norm(epilogue: &Epilogue, train: bool) -> Self {
        let linear = Self::linear(epilogue);
        let gamma = linear.len;
        let running_mean = (!train).then_some(gamma + 2);
        ParamRows {
            gamma: Some(gamma),
            running_mean,
            len: gamma + if train { 2 } else { 4 },
            ..linear
        }
    }
}

/// The input shapes an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputRank {
    /// `(batch, in_features)` only, as BatchNorm1d after a linear layer needs.
    Matrix,
    /// `(..., in_features)`, any number of leading dimensions (none included), as PyTorch's
    /// `nn.Linear` takes: the op sees them flattened into one batch dimension.
    Leading,
}

/// Refuses an operand (`what`, of shape `dims`) whose elements would need more bytes than one
/// allocation can hold, as a broadcast view of a small tensor can: its element count would wrap
/// (and read as another shape) or its contiguous copy could not be made.
fn addressable(op: &str, what: &str, dims: &[usize], dtype: DType) -> Result<()> {
    if dims.contains(&0) {
        return Ok(()); // empty: the caller says so by name
    }
    let bytes = dims
        .iter()
        .try_fold(dtype.size_in_bytes(), |bytes, &d| bytes.checked_mul(d));
    match bytes {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => bail!(
            "{op}: {what} of shape {dims:?} in {dtype:?} has more elements than memory can address"
        ),
    }
}

/// Checks the operands of a fused linear layer and returns `(batch, in, out)`, where `batch`
/// is the product of the input's leading dimensions.
///
/// Every message names the tensor at fault, so that a wrong checkpoint or input is found from
/// the error alone.
fn check_linear_operands(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    vectors: &[(&str, &Tensor)],
    rank: InputRank,
) -> Result<(usize, usize, usize)> {
    let dtype = x.dtype();
    addressable(op, "the input", x.dims(), dtype)?;
    addressable(op, "the weight", weight.dims(), dtype)?;
    let (batch, in_features) = match (x.dims(), rank) {
        (&[b, i], _) => (b, i),
        (&[ref leading @ .., i], InputRank::Leading) => (leading.iter().product(), i),
        (dims, InputRank::Matrix) => {
            bail!("{op}: the input must have shape (batch, in_features), got shape {dims:?}")
        }
        (dims, InputRank::Leading) => {
            bail!("{op}: the input must have shape (..., in_features), got shape {dims:?}")
        }
    };
    let (out_features, w_in) = match weight.dims() {
        &[o, i] => (o, i),
        dims => bail!("{op}: the weight must have shape (out_features, in_features), got {dims:?}"),
    };
    if batch == 0 || in_features == 0 || out_features == 0 {
        bail!(
            "{op}: empty operands: input {:?}, weight {:?}",
            x.dims(),
            weight.dims()
        );
    }
    if w_in != in_features {
        bail!(
            "{op}: the input has {in_features} features but the weight {:?} expects {w_in}",
            weight.dims()
        );
    }
    addressable(op, "the output", &[batch, out_features], dtype)?;
    if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
        bail!("{op}: unsupported dtype {dtype:?}: expected f32, f64, f16 or bf16");
    }
    let mut named = vec![("weight", weight)];
    named.extend_from_slice(vectors);
    for (name, t) in named {
        if t.dtype() != dtype {
            bail!(
                "{op}: {name} has dtype {:?} but the input has {dtype:?}",
                t.dtype()
            );
        }
        if !t.device().same_device(x.device()) {
            bail!(
                "{op}: {name} is on {} but the input is on {}",
                describe_device(t.device()),
                describe_device(x.device())
            );
        }
    }
    for (name, t) in vectors {
        if t.dims() != [out_features] {
            bail!(
                "{op}: {name} must have shape ({out_features},), got {:?}",
                t.dims()
            );
        }
    }
    Ok((batch, in_features, out_features))
}

/// The per-feature scale as a named operand: required exactly when the epilogue's scale is per
/// feature.
fn scale_operand<'a>(
    op: &str,
    epilogue: &Epilogue,
    scale: Option<&'a Tensor>,
) -> Result<Option<(&'static str, &'a Tensor)>> {
    match (epilogue.has_scale_param(), scale) {
        (true, Some(s)) => Ok(Some(("scale", s))),
        (false, None) => Ok(None),
        (true, None) => {
            bail!("{op}: the epilogue has a per-feature scale but no scale tensor was given")
        }
        (false, Some(_)) => {
            bail!("{op}: a scale tensor was given but the epilogue's scale is not per-feature")
        }
    }
}

/// A short device name for error messages.
fn describe_device(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The per-feature vectors as an op takes them: its third input, and the vectors it holds.
///
/// On the CPU, or when a gradient flows through a vector under Candle's autograd, the input is
/// the `(rows, out)` table stacked from the vectors (autograd splits its gradient back) and
/// nothing is held. On CUDA, when no gradient flows through them (inference, or a traced call's
/// detached operands), the input is the first vector and the op holds the others: the forward
/// kernels read every vector where it lies, so no launch to stack them comes before the GEMM.
/// A traced backward stacks them then ([`ParamOperand::table`]).
pub(super) struct ParamOperand {
    /// The op's third input.
    pub input: Tensor,
    /// The vectors after the first, when they are not stacked into `input`.
    pub held: Vec<Tensor>,
}

impl ParamOperand {
    /// The operand of `bias` (a constant zero row when missing) followed by `rest`, each
    /// `(out,)` like `like`'s rows. Vectors that share storage with a tensor of `written` (which
    /// the op writes while it reads its operands) are stacked, never held.
    fn new(
        bias: Option<&Tensor>,
        rest: &[&Tensor],
        like: &Tensor,
        written: &[&Tensor],
    ) -> Result<Self> {
        let zero_bias;
        let bias = match bias {
            Some(b) => b,
            None => {
                zero_bias = Tensor::zeros(like.dim(0)?, like.dtype(), like.device())?;
                &zero_bias
            }
        };
        let mut rows = vec![bias];
        rows.extend_from_slice(rest);
        let held = untracked_on_cuda(&rows)
            && !rows
                .iter()
                .any(|t| written.iter().any(|w| same_storage(t, w)));
        if held {
            return Ok(Self {
                input: bias.clone(),
                held: rest.iter().copied().cloned().collect(),
            });
        }
        Ok(Self {
            input: stack_rows(&rows)?,
            held: Vec::new(),
        })
    }

    /// The `(rows, out)` table, given the op's third input `input` and the vectors it held.
    pub(super) fn table(input: &Tensor, held: &[Tensor]) -> Result<Tensor> {
        if held.is_empty() {
            return Ok(input.clone());
        }
        let mut rows = vec![input];
        rows.extend(held);
        stack_rows(&rows)
    }
}

/// Whether two tensors share one storage (views, clones and detached copies of a tensor do).
fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let id = |t: &Tensor| &*t.storage_and_layout().0 as *const candle_core::Storage;
    std::ptr::eq(id(a), id(b))
}

/// Whether the vectors are several contiguous CUDA tensors that no gradient flows through: the
/// kernels can then read each where it lies, and [`stack_rows`] stacks them in one launch.
fn untracked_on_cuda(rows: &[&Tensor]) -> bool {
    rows.len() > 1
        && rows[0].device().is_cuda()
        && rows.iter().all(|t| t.is_contiguous() && !t.track_op())
}

/// The vectors stacked into a contiguous `(rows, out)` table: on CUDA, contiguous vectors that
/// no gradient flows through by one kernel launch instead of one copy per vector.
fn stack_rows(rows: &[&Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if untracked_on_cuda(rows) {
        let rest = rows[1..].iter().copied().cloned().collect();
        return rows[0].apply_op1_no_bwd(&StackVectors { rest });
    }
    // Stacking a single row is a view of it, strided when the vector is: the kernels need a
    // contiguous table.
    Tensor::stack(rows, 0)?.contiguous()
}

/// The CUDA problem of an op's forward: `x` (m, k) and `w` (n, k), each contiguous, and the
/// per-feature vectors of [`with_cuda_param_rows`].
#[cfg(feature = "cuda")]
fn cuda_problem<'a>(
    (x, x_l): (&'a candle_core::CudaStorage, &candle_core::Layout),
    (w, w_l): (&'a candle_core::CudaStorage, &candle_core::Layout),
    params: &'a [crate::cuda::Operand<'a>],
    epilogue: Epilogue,
    precision: Precision,
) -> Result<crate::cuda::LinearProblem<'a>> {
    let (m, k) = x_l.shape().dims2()?;
    let n = w_l.dims()[0];
    Ok(crate::cuda::LinearProblem {
        x: (x, autograd::contiguous_start(x_l)?),
        w: (w, autograd::contiguous_start(w_l)?),
        params,
        m,
        n,
        k,
        epilogue,
        precision,
    })
}

/// The per-feature vectors of an op's CUDA forward, `n` elements each: the rows of the table
/// `p` when nothing is `held`, else `p` itself followed by the held vectors. `f` runs while the
/// held vectors' storages are locked for reading.
#[cfg(feature = "cuda")]
pub(super) fn with_cuda_param_rows<R>(
    (p, p_l): (&candle_core::CudaStorage, &candle_core::Layout),
    held: &[Tensor],
    n: usize,
    f: impl FnOnce(&[crate::cuda::Operand]) -> Result<R>,
) -> Result<R> {
    let start = autograd::contiguous_start(p_l)?;
    let count = p_l.shape().elem_count();
    if held.is_empty() {
        if n == 0 || count % n != 0 {
            bail!("fused op: a parameter table of {count} elements for {n} features");
        }
        let rows: Vec<_> = (0..count / n).map(|r| (p, start + r * n)).collect();
        return f(&rows);
    }
    if count != n {
        bail!("fused op: a per-feature vector of {count} elements for {n} features");
    }
    let guards: Vec<_> = held.iter().map(Tensor::storage_and_layout).collect();
    let mut rows = vec![(p, start)];
    for (storage, layout) in &guards {
        match &**storage {
            candle_core::Storage::Cuda(s) if layout.shape().elem_count() == n => {
                rows.push((s, autograd::contiguous_start(layout)?))
            }
            candle_core::Storage::Cuda(_) => {
                bail!("fused op: a per-feature vector does not have {n} elements")
            }
            _ => bail!("fused op: every per-feature vector must be on the CUDA device"),
        }
    }
    f(&rows)
}

/// [`stack_rows`]'s one-launch stack on CUDA: the op's input is the first vector, `rest` the
/// others, all contiguous, of one dtype and length, on one device.
#[cfg(feature = "cuda")]
struct StackVectors {
    rest: Vec<Tensor>,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for StackVectors {
    fn name(&self) -> &'static str {
        "fused-param-table"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("fused parameter table: the one-launch stack is for CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        first: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let n = layout.shape().elem_count();
        let guards: Vec<_> = self.rest.iter().map(|t| t.storage_and_layout()).collect();
        let mut rows = vec![(first, layout.start_offset())];
        for (storage, l) in &guards {
            match &**storage {
                candle_core::Storage::Cuda(s) if l.shape().elem_count() == n => {
                    rows.push((s, l.start_offset()))
                }
                candle_core::Storage::Cuda(_) => {
                    bail!("fused parameter table: vectors of different lengths")
                }
                _ => bail!("fused parameter table: every vector must be on the CUDA device"),
            }
        }
        let table = crate::cuda::param_table(&rows, n)?;
        Ok((table, (rows.len(), n).into()))
    }
}
