//! `y = BatchNorm1d(epilogue(x·Wᵀ + b))` as a `CustomOp3` over `(x, weight, params)`.

use super::autograd::{self, Saved};
use super::trace::{linear_targets, Graph, Target, Trace};
use super::{
    check_linear_operands, same_storage, scale_operand, InputRank, ParamOperand, ParamRows,
    Precision,
};
use crate::cpu::{self, Accum};
use crate::epilogue::Epilogue;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, Layout, Result, Shape, Storage,
    Tensor, Var,
};
use std::cell::Cell;
use std::sync::Arc;

/// BatchNorm1d's parameters and buffers, each of shape `(out,)` and the input's dtype.
#[derive(Clone, Copy, Debug)]
pub struct BatchNormParams<'a> {
    /// gamma (`bn.weight`).
    pub weight: &'a Tensor,
    /// beta (`bn.bias`).
    pub bias: &'a Tensor,
    /// `bn.running_mean`: read in eval mode, written in train mode when `update` is given;
    /// never receives a gradient.
    pub running_mean: &'a Tensor,
    /// `bn.running_var`: as `running_mean`.
    pub running_var: &'a Tensor,
    /// Added to the variance before the square root.
    pub eps: f64,
    /// In train mode, whether the forward also updates `running_mean` and `running_var` in
    /// place, as PyTorch's train-mode BatchNorm does (on the GPU inside the kernel that merges
    /// the batch statistics, at no extra launch). `None` leaves them alone: the returned
    /// [`BatchStats`] can update them later. Eval mode never touches them.
    pub update: Option<RunningUpdate<'a>>,
}

/// How a train-mode forward updates BatchNorm's running statistics in place:
/// `running_mean ← (1 − factor)·running_mean + factor·mean` and
/// `running_var ← (1 − factor)·running_var + factor·var·batch/(batch − 1)`, as
/// [`BatchStats::update_running`] does. The running buffers must be contiguous and must not
/// share storage with each other, with `num_batches_tracked`, or with the input or weight.
#[derive(Clone, Copy, Debug)]
pub struct RunningUpdate<'a> {
    /// The batch statistics' weight, in `[0, 1]`: BatchNorm's momentum, or
    /// `1/(num_batches_tracked + 1)` for its cumulative moving average.
    pub factor: f64,
    /// `bn.num_batches_tracked`, an int64 scalar incremented by one with the update, if given.
    pub num_batches_tracked: Option<&'a Tensor>,
}

/// The batch statistics of a train-mode forward, each `(out,)`, in f32 (f64 for f64 inputs).
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// The per-feature mean over the batch.
    pub mean: Tensor,
    /// The per-feature *biased* variance over the batch (what the normalisation divides by).
    pub var: Tensor,
}

impl BatchStats {
    /// PyTorch's running-statistics update after a train-mode batch of `batch` rows, in place:
    /// `running_mean ← (1 − factor)·running_mean + factor·mean` and
    /// `running_var ← (1 − factor)·running_var + factor·var·batch/(batch − 1)` (the unbiased
    /// variance). `factor` is BatchNorm's momentum, or `1/(batches seen + 1)` for its cumulative
    /// average. On the GPU each buffer is one kernel launch in f32; on the CPU the arithmetic is
    /// f64. Either way the result is rounded once to the buffer's dtype. The statistics may
    /// have any float dtype and layout; the buffers must share storage with neither each other
    /// nor the statistics. Every check runs before either buffer is written.
    pub fn update_running(
        &self,
        running_mean: &Var,
        running_var: &Var,
        factor: f64,
        batch: usize,
    ) -> Result<()> {
        const OP: &str = "BatchStats::update_running";
        check_factor(OP, factor)?;
        if batch < 2 {
            candle_core::bail!(
                "{OP}: the unbiased variance needs a batch of at least 2, got {batch}"
            );
        }
        let updates = [
            ("running_mean", running_mean, &self.mean, 1.0),
            ("running_var", running_var, &self.var, unbiasing(batch)),
        ];
        // Every check before any write: a rejected call leaves both buffers as they were.
        for (name, running, statistic, _) in updates {
            if running.dims() != statistic.dims() {
                candle_core::bail!(
                    "{OP}: {name} has shape {:?} but the batch statistic has {:?}",
                    running.dims(),
                    statistic.dims()
                );
            }
            if !running.device().same_device(statistic.device()) {
                candle_core::bail!("{OP}: {name} is on another device than the batch statistics");
            }
            // f64 runs on the CPU only.
            let float = match running.dtype() {
                DType::F64 => running.device().is_cpu(),
                dtype => dtype.is_float(),
            };
            if !float {
                candle_core::bail!(
                    "{OP}: {name} must be a float buffer (f64 on the CPU only), got {:?}",
                    running.dtype()
                );
            }
            if !statistic.dtype().is_float() {
                candle_core::bail!(
                    "{OP}: the batch statistic for {name} must be a float tensor, got {:?}",
                    statistic.dtype()
                );
            }
        }
        check_unshared(
            OP,
            &[("running_mean", running_mean), ("running_var", running_var)],
            &[
                ("the batch mean", &self.mean),
                ("the batch variance", &self.var),
            ],
        )?;
        // The statistics as the blend reads them: contiguous, in f32, or f64 on the CPU.
        let as_read = |statistic: &Tensor| {
            let dtype = match statistic.dtype() {
                DType::F64 if statistic.device().is_cpu() => DType::F64,
                _ => DType::F32,
            };
            statistic.to_dtype(dtype)?.contiguous()
        };
        let (mean, var) = (as_read(&self.mean)?, as_read(&self.var)?);
        for ((_, running, _, weight), statistic) in updates.into_iter().zip([mean, var]) {
            running.inplace_op2(&statistic, &RunningBlend { factor, weight })?;
        }
        Ok(())
    }
}

/// Errors if a buffer of `written` shares its storage with another, or with a tensor of `read`:
/// each is written in place, in turn, while the others are read.
fn check_unshared(op: &str, written: &[(&str, &Tensor)], read: &[(&str, &Tensor)]) -> Result<()> {
    for (i, (name, t)) in written.iter().enumerate() {
        let others = written[..i].iter().chain(read);
        if let Some((other, _)) = others.into_iter().find(|(_, o)| same_storage(t, o)) {
            candle_core::bail!("{op}: {name} shares its storage with {other}");
        }
    }
    Ok(())
}

/// Errors unless `factor`, the batch statistics' weight in a running update, is in `[0, 1]`.
fn check_factor(op: &str, factor: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&factor) {
        candle_core::bail!("{op}: the running-update factor must be in [0, 1], got {factor}");
    }
    Ok(())
}

/// `batch/(batch − 1)`: the weight that turns a batch's biased variance into the unbiased one
/// that PyTorch blends into the running variance.
fn unbiasing(batch: usize) -> f64 {
    let n = batch as f64;
    n / (n - 1.0)
}

/// `running = (1 − factor)·running + factor·weight·batch`, in place on the running buffer.
struct RunningBlend {
    factor: f64,
    weight: f64,
}

impl RunningBlend {
    fn blend<T: num_traits::Float>(&self, running: &mut [T], batch: &[f64]) {
        for (r, &b) in running.iter_mut().zip(batch) {
            let value = (1.0 - self.factor) * r.to_f64().unwrap_or(f64::NAN)
                + self.factor * self.weight * b;
            *r = T::from(value).unwrap_or(T::nan());
        }
    }

    /// The blend on the CPU, in f64, into `batch.len()` elements of `running` from `start`.
    fn blend_storage(&self, running: &mut CpuStorage, start: usize, batch: &[f64]) -> Result<()> {
        let range = start..start + batch.len();
        match running {
            CpuStorage::F32(v) => self.blend(&mut v[range], batch),
            CpuStorage::F64(v) => self.blend(&mut v[range], batch),
            CpuStorage::F16(v) => self.blend(&mut v[range], batch),
            CpuStorage::BF16(v) => self.blend(&mut v[range], batch),
            other => candle_core::bail!(
                "batch-norm running update: unsupported running-buffer dtype {:?}",
                other.dtype()
            ),
        }
        Ok(())
    }
}

impl InplaceOp2 for RunningBlend {
    fn name(&self) -> &'static str {
        "batch-norm-running-update"
    }

    fn cpu_fwd(
        &self,
        running: &mut CpuStorage,
        running_l: &Layout,
        batch: &CpuStorage,
        batch_l: &Layout,
    ) -> Result<()> {
        let batch: Vec<f64> = match batch {
            CpuStorage::F64(_) => f64::slice(batch, batch_l)?.into_owned(),
            _ => f32::slice(batch, batch_l)?
                .iter()
                .map(|&v| v as f64)
                .collect(),
        };
        let Some((start, end)) = running_l.contiguous_offsets() else {
            candle_core::bail!("{}: the running buffer is not contiguous", self.name())
        };
        if end - start != batch.len() {
            candle_core::bail!(
                "{}: {} running values for {} batch statistics",
                self.name(),
                end - start,
                batch.len()
            );
        }
        self.blend_storage(running, start, &batch)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        running: &mut candle_core::CudaStorage,
        running_l: &Layout,
        batch: &candle_core::CudaStorage,
        batch_l: &Layout,
    ) -> Result<()> {
        crate::cuda::batch_norm_update_running(
            (running, autograd::contiguous_start(running_l)?),
            (batch, autograd::contiguous_start(batch_l)?),
            running_l.shape().elem_count(),
            self.factor,
            self.weight,
        )
    }
}

/// The running statistics that a train-mode forward updates in place ([`RunningUpdate`]).
struct RunningBuffers {
    mean: Tensor,
    var: Tensor,
    num_batches_tracked: Option<Tensor>,
    factor: f64,
}

impl RunningBuffers {
    /// Checks `update` against the call's operands: the buffers are written while the op
    /// holds `x` and `weight`, so none may share storage with another or with those.
    fn new(
        op: &str,
        bn: &BatchNormParams,
        update: RunningUpdate,
        (x, weight): (&Tensor, &Tensor),
    ) -> Result<Self> {
        let factor = update.factor;
        check_factor(op, factor)?;
        let mut written = vec![
            ("bn.running_mean", bn.running_mean),
            ("bn.running_var", bn.running_var),
        ];
        for (name, t) in &written {
            if !t.is_contiguous() {
                candle_core::bail!("{op}: {name} must be contiguous to be updated in place");
            }
        }
        if let Some(count) = update.num_batches_tracked {
            if count.dtype() != DType::I64 || count.elem_count() != 1 {
                candle_core::bail!(
                    "{op}: num_batches_tracked must be one int64, got {:?} of shape {:?}",
                    count.dtype(),
                    count.dims()
                );
            }
            if !count.device().same_device(x.device()) {
                candle_core::bail!("{op}: num_batches_tracked is on another device than the input");
            }
            written.push(("num_batches_tracked", count));
        }
        check_unshared(op, &written, &[("the input", x), ("the weight", weight)])?;
        Ok(Self {
            mean: bn.running_mean.clone(),
            var: bn.running_var.clone(),
            num_batches_tracked: update.num_batches_tracked.cloned(),
            factor,
        })
    }

    /// The buffers the forward writes.
    fn written(&self) -> Vec<&Tensor> {
        let mut written = vec![&self.mean, &self.var];
        written.extend(&self.num_batches_tracked);
        written
    }

    /// Runs `f` with write access to the buffers' storages, each locked as Candle's in-place
    /// ops lock it.
    fn access<R>(&self, f: impl FnOnce(RunningAccess) -> Result<R>) -> Result<R> {
        with_storage_mut(&self.mean, |mean, mean_l| {
            let mean = (mean, mean_l.start_offset());
            with_storage_mut(&self.var, |var, var_l| {
                let var = (var, var_l.start_offset());
                let factor = self.factor;
                match &self.num_batches_tracked {
                    None => f(RunningAccess {
                        mean,
                        var,
                        num_batches_tracked: None,
                        factor,
                    }),
                    Some(count) => with_storage_mut(count, |count, count_l| {
                        f(RunningAccess {
                            mean,
                            var,
                            num_batches_tracked: Some((count, count_l.start_offset())),
                            factor,
                        })
                    }),
                }
            })
        })
    }
}

/// A storage open for writing, with the offset of the tensor's first element.
type WritableAt<'s> = (StorageMut<'s>, usize);

/// The running buffers, open for writing during a forward.
struct RunningAccess<'s> {
    mean: WritableAt<'s>,
    var: WritableAt<'s>,
    num_batches_tracked: Option<WritableAt<'s>>,
    factor: f64,
}

impl<'s> RunningAccess<'s> {
    /// PyTorch's update on the CPU from the batch's mean and biased variance over `batch` rows.
    fn update_cpu(self, mean: &[f64], var: &[f64], batch: usize) -> Result<()> {
        let factor = self.factor;
        for ((storage, start), statistic, weight) in
            [(self.mean, mean, 1.0), (self.var, var, unbiasing(batch))]
        {
            RunningBlend { factor, weight }.blend_storage(storage.cpu()?, start, statistic)?;
        }
        match self.num_batches_tracked {
            None => Ok(()),
            Some((StorageMut::Cpu(CpuStorage::I64(count)), start)) => {
                // Wraps at i64::MAX as the GPU's increment (and PyTorch's) does, rather than panic
                // in a debug build; ScaleBatchNorm's cumulative average, which reads the count,
                // refuses one that would.
                count[start] = count[start].wrapping_add(1);
                Ok(())
            }
            Some(_) => candle_core::bail!("num_batches_tracked must be an int64 on the CPU"),
        }
    }

    /// The buffers as the GPU forward takes them.
    #[cfg(feature = "cuda")]
    fn cuda_targets(self) -> Result<crate::cuda::RunningTargets<'s>> {
        fn on_gpu(
            (storage, start): WritableAt<'_>,
        ) -> Result<(&mut candle_core::CudaStorage, usize)> {
            match storage {
                StorageMut::Cuda(storage) => Ok((storage, start)),
                StorageMut::Cpu(_) => {
                    candle_core::bail!("batch-norm running update: a running buffer is on the CPU")
                }
            }
        }
        Ok(crate::cuda::RunningTargets {
            mean: on_gpu(self.mean)?,
            var: on_gpu(self.var)?,
            num_batches_tracked: self.num_batches_tracked.map(on_gpu).transpose()?,
            factor: self.factor,
        })
    }
}

/// A tensor's storage, borrowed for writing.
enum StorageMut<'s> {
    Cpu(&'s mut CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(&'s mut candle_core::CudaStorage),
}

impl<'s> StorageMut<'s> {
    fn cpu(self) -> Result<&'s mut CpuStorage> {
        match self {
            StorageMut::Cpu(storage) => Ok(storage),
            #[cfg(feature = "cuda")]
            StorageMut::Cuda(_) => {
                candle_core::bail!("batch-norm running update: a running buffer is on the GPU")
            }
        }
    }
}

/// Runs `f` with write access to `t`'s storage and its layout, under the lock that Candle's
/// in-place ops take (no other op reads or writes the storage meanwhile).
fn with_storage_mut<R>(t: &Tensor, f: impl FnOnce(StorageMut, &Layout) -> Result<R>) -> Result<R> {
    let access = StorageAccess {
        f: Cell::new(Some(f)),
        out: Cell::new(None),
    };
    t.inplace_op1(&access)?;
    match access.out.into_inner() {
        Some(out) => Ok(out),
        None => candle_core::bail!("fused storage access: the in-place op did not run"),
    }
}

/// [`with_storage_mut`]'s in-place op: it only hands the storage to the closure.
struct StorageAccess<F, R> {
    f: Cell<Option<F>>,
    out: Cell<Option<R>>,
}

impl<F: FnOnce(StorageMut, &Layout) -> Result<R>, R> StorageAccess<F, R> {
    fn run(&self, storage: StorageMut, layout: &Layout) -> Result<()> {
        let Some(f) = self.f.take() else {
            candle_core::bail!("fused storage access: ran twice")
        };
        self.out.set(Some(f(storage, layout)?));
        Ok(())
    }
}

impl<F: FnOnce(StorageMut, &Layout) -> Result<R>, R> InplaceOp1 for StorageAccess<F, R> {
    fn name(&self) -> &'static str {
        "fused-storage-access"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.run(StorageMut::Cpu(storage), layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        self.run(StorageMut::Cuda(storage), layout)
    }
}

struct LinearBatchNormOp {
    epilogue: Epilogue,
    rows: ParamRows,
    /// The per-feature vectors after the first, when the third input is not their table.
    held: Vec<Tensor>,
    eps: f64,
    train: bool,
    precision: Precision,
    /// Whether the forward keeps the pre-activation (some input tracks gradients).
    keep_preactivation: bool,
    /// Train mode: the running statistics to update in place, if asked.
    running: Option<RunningBuffers>,
    saved: Arc<Saved>,
}

/// `y = BatchNorm1d(epilogue(x·Wᵀ + b))`, fused, in train mode (`train = true`: normalised by
/// the batch statistics, which are returned, and with `bn.update` given, folded into the
/// running statistics in place) or eval mode (normalised by `bn.running_mean` and
/// `bn.running_var`).
///
/// The operands are those of [`fused_linear`](crate::fused_linear) plus `bn`, except that `x`
/// must be a `(batch, in)` matrix, as `nn.BatchNorm1d` after a linear layer needs. Train mode
/// needs a batch of at least two rows, as in PyTorch. Gradients flow to `x`, `weight`, `bias`,
/// `scale` and BatchNorm's weight and bias; in train mode they go through the batch statistics
/// as in PyTorch.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    epilogue: Epilogue,
    bn: &BatchNormParams,
    train: bool,
    precision: Precision,
) -> Result<(Tensor, Option<BatchStats>)> {
    let operands = (x, weight, bias, scale);
    let call = BatchNormCall::new(operands, epilogue, bn, train, precision, Graph::Autograd)?;
    let y = call.x.apply_op3_arc(&call.weight, &call.params, call.op)?;
    Ok((y, call.saved.batch_stats(train, x.dtype())?))
}

/// [`fused_linear_batch_norm`] outside Candle's autograd graph, with a [`Trace`] of the call
/// whose [`backward`](Trace::backward) returns the gradients of `x`, `weight`, `bias`, `scale`
/// and BatchNorm's weight and bias directly.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_batch_norm_traced(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    epilogue: Epilogue,
    bn: &BatchNormParams,
    train: bool,
    precision: Precision,
) -> Result<(Tensor, Option<BatchStats>, Trace)> {
    let operands = (x, weight, bias, scale);
    let call = BatchNormCall::new(operands, epilogue, bn, train, precision, Graph::Traced)?;
    let y = call
        .x
        .apply_op3_arc(&call.weight, &call.params, call.op.clone())?;
    let mut targets = linear_targets(x, weight, bias, scale, &call.rows);
    let gamma = call.rows.batch_norm_gamma("fused_linear_batch_norm")?;
    targets.push((bn.weight.clone(), Target::Row(gamma)));
    targets.push((bn.bias.clone(), Target::Row(gamma + 1)));
    let stats = call.saved.batch_stats(train, x.dtype())?;
    let operands = [call.x, call.weight, call.params];
    let trace = Trace::new(call.op, operands, &y, y.dims(), targets);
    Ok((y, stats, trace))
}

/// A checked fused linear + BatchNorm call, ready to apply.
struct BatchNormCall {
    op: Arc<Box<dyn CustomOp3 + Send + Sync>>,
    saved: Arc<Saved>,
    rows: ParamRows,
    x: Tensor,
    weight: Tensor,
    params: Tensor,
}

impl BatchNormCall {
    fn new(
        (x, weight, bias, scale): (&Tensor, &Tensor, Option<&Tensor>, Option<&Tensor>),
        epilogue: Epilogue,
        bn: &BatchNormParams,
        train: bool,
        precision: Precision,
        graph: Graph,
    ) -> Result<Self> {
        const OP: &str = "fused_linear_batch_norm";
        let mut vectors = vec![
            ("bn.weight", bn.weight),
            ("bn.bias", bn.bias),
            ("bn.running_mean", bn.running_mean),
            ("bn.running_var", bn.running_var),
        ];
        if let Some(b) = bias {
            vectors.push(("bias", b));
        }
        vectors.extend(scale_operand(OP, &epilogue, scale)?);
        let (batch, _, _) = check_linear_operands(OP, x, weight, &vectors, InputRank::Matrix)?;
        if train && batch < 2 {
            candle_core::bail!(
                "{OP}: train mode needs more than one value per feature, got a batch of {batch}"
            );
        }
        check_eps(bn.eps).map_err(|e| candle_core::Error::Msg(format!("{OP}: {e}")))?;
        let [x, weight, gamma, beta] = graph.operands([x, weight, bn.weight, bn.bias]);
        let bias = bias.map(|b| graph.operand(b));
        let mut rows: Vec<Tensor> = scale.map(|s| graph.operand(s)).into_iter().collect();
        rows.extend([gamma, beta]);
        if !train {
            // The running statistics never receive a gradient.
            rows.extend([bn.running_mean.detach(), bn.running_var.detach()]);
        }
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        let running = match (train, bn.update) {
            (true, Some(update)) => Some(RunningBuffers::new(OP, bn, update, (&x, &weight))?),
            _ => None,
        };
        let ParamOperand {
            input: params,
            held,
        } = ParamOperand::new(
            bias.as_ref(),
            &rows.iter().collect::<Vec<_>>(),
            &weight,
            &running
                .as_ref()
                .map_or_else(Vec::new, RunningBuffers::written),
        )?;
        let saved = Arc::new(Saved::default());
        let table = ParamRows::batch_norm(&epilogue, train);
        let op = LinearBatchNormOp {
            epilogue,
            rows: table,
            held,
            eps: bn.eps,
            train,
            precision,
            keep_preactivation: graph.keeps_for_backward(&[&x, &weight, &params]),
            running,
            saved: saved.clone(),
        };
        Ok(Self {
            op: Arc::new(Box::new(op)),
            saved,
            rows: table,
            x,
            weight,
            params,
        })
    }
}

/// BatchNorm's eps must be positive, and stay positive as the f32 that the CUDA kernels take
/// (an eps under f32's smallest value would be 0 there, and a constant feature's 1/σ infinite).
pub(crate) fn check_eps(eps: f64) -> std::result::Result<(), String> {
    if eps.is_nan() || eps <= 0.0 {
        return Err(format!("eps must be positive, got {eps}"));
    }
    if eps as f32 == 0.0 {
        return Err(format!(
            "eps {eps:e} is 0 as an f32, which the GPU computes with: it must be at least {:e}",
            f32::from_bits(1)
        ));
    }
    Ok(())
}

impl Saved {
    /// The batch statistics that a train-mode forward on an `input` dtype kept, as
    /// [`BatchStats`]: f64 for f64 inputs, f32 otherwise. (The CPU keeps them in f64 for its
    /// backward whatever the input, as the variance of an f32 batch may overflow f32.)
    fn batch_stats(&self, train: bool, input: DType) -> Result<Option<BatchStats>> {
        if !train {
            return Ok(None);
        }
        let dtype = match input {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let stats = self.stats()?.to_dtype(dtype)?;
        Ok(Some(BatchStats {
            mean: stats.get(0)?,
            var: stats.get(1)?,
        }))
    }
}

impl LinearBatchNormOp {
    /// Runs the forward `f` with the running buffers open for writing, when it updates them.
    fn with_running<R>(&self, f: impl FnOnce(Option<RunningAccess>) -> Result<R>) -> Result<R> {
        match &self.running {
            Some(buffers) => buffers.access(|running| f(Some(running))),
            None => f(None),
        }
    }

    fn cpu_forward<A: Accum>(
        &self,
        (x, w, p): (&[A], &[A], &[A]),
        (m, n, k): (usize, usize, usize),
        dtype: DType,
        running: Option<RunningAccess>,
    ) -> Result<CpuStorage> {
        let row = |r: usize| &p[r * n..(r + 1) * n];
        let (mut y, z) = cpu::linear_epilogue(
            (x, w, p),
            (m, n, k),
            dtype,
            self.rows,
            &self.epilogue,
            self.keep_preactivation,
        );
        let (mean, var) = match self.rows.running_mean {
            None => {
                // Train mode normalises u as a 16-bit tensor holds it, as PyTorch's BatchNorm
                // and the GPU do, and the backward rebuilds the same values from z.
                let round = A::rounding(dtype);
                y.iter_mut().for_each(|v| *v = round(*v));
                cpu::column_stats(&y, n)
            }
            Some(r) => {
                let to_f64 = |v: &[A]| v.iter().map(|x| x.to_f64().unwrap()).collect::<Vec<_>>();
                (to_f64(row(r)), to_f64(row(r + 1)))
            }
        };
        if let Some(running) = running {
            running.update_cpu(&mean, &var, m)?;
        }
        let gamma = self.rows.batch_norm_gamma("fused_linear_batch_norm")?;
        cpu::normalize(&mut y, &mean, &var, row(gamma), row(gamma + 1), self.eps);
        if let Some(z) = z {
            self.saved
                .keep_preactivation(Storage::Cpu(A::to_storage(z, dtype)?), (m, n))?;
        }
        // Kept in f64 whatever `A`: an f32 batch's variance may overflow f32 where `1/σ` does not.
        let stats: Vec<f64> = mean.iter().chain(&var).copied().collect();
        self.saved.keep_stats(f64::host_tensor(stats, (2, n))?)?;
        A::to_storage(y, dtype)
    }

    fn cpu_backward<A: Accum>(&self, dy: &Tensor, p: &Tensor) -> Result<(Tensor, Tensor)> {
        let (z, dtype) = match self.saved.preactivation()? {
            Some(z) => (A::host_vec(&z)?, z.dtype()),
            None => candle_core::bail!(
                "fused_linear_batch_norm: backward without a kept pre-activation"
            ),
        };
        let stats = f64::host_vec(&self.saved.stats()?)?;
        let n = p.dim(1)?;
        let (dz, dparams) = cpu::batch_norm_backward(
            &A::host_vec(dy)?,
            &z,
            &A::host_vec(p)?,
            self.rows,
            stats.split_at(n),
            n,
            dtype,
            &self.epilogue,
            self.eps,
            self.train,
        );
        autograd::host_grads(dz, dparams, dy, p)
    }
}

impl CustomOp3 for LinearBatchNormOp {
    fn name(&self) -> &'static str {
        "fused-linear-batch-norm"
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
            candle_core::bail!(
                "fused_linear_batch_norm: per-feature vectors held outside a table on the CPU"
            );
        }
        let forward = |running: Option<RunningAccess>| match x.dtype() {
            DType::F64 => self.cpu_forward(
                (
                    &f64::slice(x, x_l)?,
                    &f64::slice(w, w_l)?,
                    &f64::slice(p, p_l)?,
                ),
                dims,
                x.dtype(),
                running,
            ),
            dtype => self.cpu_forward(
                (
                    &f32::slice(x, x_l)?,
                    &f32::slice(w, w_l)?,
                    &f32::slice(p, p_l)?,
                ),
                dims,
                dtype,
                running,
            ),
        };
        let y = self.with_running(forward)?;
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
        let forward = |params: &[crate::cuda::Operand]| {
            let problem =
                super::cuda_problem((x, x_l), (w, w_l), params, self.epilogue, self.precision)?;
            self.with_running(|running| {
                let targets = running.map(RunningAccess::cuda_targets).transpose()?;
                crate::cuda::linear_batch_norm_forward(
                    &problem,
                    self.eps,
                    self.train,
                    self.keep_preactivation,
                    targets,
                )
            })
        };
        let (y, z, stats) = super::with_cuda_param_rows((p, p_l), &self.held, n, forward)?;
        if let Some(z) = z {
            self.saved.keep_preactivation(Storage::Cuda(z), (m, n))?;
        }
        self.saved
            .keep_stats(autograd::detached(Storage::Cuda(stats), (2, n)))?;
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
        let dy = dy.contiguous()?;
        // With held vectors the third gradient is still the whole table's, `(rows, out)`: only a
        // trace (nothing tracks gradients then) calls this, and it takes the rows it needs.
        let p = &ParamOperand::table(p, &self.held)?;
        let (dz, dparams) = match dy.device() {
            Device::Cpu => match dy.dtype() {
                DType::F64 => self.cpu_backward::<f64>(&dy, p)?,
                _ => self.cpu_backward::<f32>(&dy, p)?,
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => autograd::cuda_batch_norm_backward(
                &dy,
                self.saved.preactivation()?.as_ref(),
                p,
                &self.saved.stats()?,
                &self.epilogue,
                self.eps,
                self.train,
            )?,
            device => autograd::unsupported_device(self.name(), device)?,
        };
        let (dx, dw) = autograd::input_and_weight_grads(&dz, x, w, self.precision)?;
        Ok((Some(dx), Some(dw), Some(dparams)))
    }
}
