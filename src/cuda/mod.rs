//! The GPU half of the fused ops: a thin safe layer over the kernels of `cuda-kernels/`.
//!
//! Every function checks dtypes and extents, allocates its outputs (and any workspace) through
//! candle's allocator on the operands' device, and enqueues the kernels on candle's stream, so
//! that they are ordered with the rest of the graph: no synchronisation, no host round trip.
//! The forward and the epilogue backward keep their workspace (up to 64 MiB: a train-mode
//! BatchNorm's partial statistics, the exact f32 GEMM's scratch, the backward's per-feature
//! partial sums) per host thread, device and stream from call to call, and a train-mode
//! BatchNorm allocates its statistics after the GEMM's launch: the host work before a
//! forward's first kernel is time that an idle GPU waits.
//! A failed launch comes back as a [`candle_core::Error`] naming the kernel and CUDA's message.

mod ffi;

use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda::CudaStorageSlice;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result};

use crate::epilogue::Epilogue;
use crate::ops::Precision;

/// A contiguous operand: its storage and the offset of its first element.
pub(crate) type Operand<'a> = (&'a CudaStorage, usize);

/// A fused linear problem on the GPU: contiguous operands, element offsets into their storage.
pub(crate) struct LinearProblem<'a> {
    /// `x` (m, k) and its offset in elements.
    pub x: (&'a CudaStorage, usize),
    /// `w` (n, k) and its offset in elements.
    pub w: (&'a CudaStorage, usize),
    /// The per-feature vectors, `n` elements each, in the order bias, [scale], [gamma, beta,
    /// [running_mean, running_var]].
    pub params: &'a [Operand<'a>],
    /// Rows of `x`.
    pub m: usize,
    /// Rows of `w` (output features).
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// What follows the product.
    pub epilogue: Epilogue,
    /// How f32 products are computed (ignored for f16/bf16).
    pub precision: Precision,
}

/// y (m,n) and, if `keep_preactivation`, z (m,n).
pub(crate) fn linear_forward(
    p: &LinearProblem,
    keep_preactivation: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let params_rows = 1 + p.epilogue.has_scale_param() as usize;
    let (y, z, _) = forward(p, params_rows, None, keep_preactivation, None)?;
    Ok((y, z))
}

/// BatchNorm's running statistics, for a train-mode forward to update in place: the running
/// mean and variance (`n` elements each, of the operands' dtype, from the given element
/// offsets), optionally `num_batches_tracked` (one int64, incremented), and the weight of the
/// batch statistics in the blend.
pub(crate) struct RunningTargets<'a> {
    /// `bn.running_mean` and the offset of its first element.
    pub mean: (&'a mut CudaStorage, usize),
    /// `bn.running_var` and the offset of its first element.
    pub var: (&'a mut CudaStorage, usize),
    /// `bn.num_batches_tracked` and the offset of its element, if it is to be counted.
    pub num_batches_tracked: Option<(&'a mut CudaStorage, usize)>,
    /// The batch statistics' weight: BatchNorm's momentum, or its cumulative-average factor.
    pub factor: f64,
}

/// y, optional z, and stats (2, n) f32: [mean, biased var] (batch stats in train; in eval, the
/// running stats converted to f32). In train mode, `running` is updated in place when given.
pub(crate) fn linear_batch_norm_forward(
    p: &LinearProblem,
    eps: f64,
    train: bool,
    keep_preactivation: bool,
    running: Option<RunningTargets>,
) -> Result<(CudaStorage, Option<CudaStorage>, CudaStorage)> {
    if running.is_some() && !train {
        bail!("fused_linear_batch_norm: eval mode leaves the running statistics alone");
    }
    let params_rows = batch_norm_rows(&p.epilogue, train);
    let (y, z, stats) = forward(
        p,
        params_rows,
        Some((eps, train)),
        keep_preactivation,
        running,
    )?;
    match stats {
        Some(stats) => Ok((y, z, stats)),
        None => bail!("fused_linear_batch_norm: the forward produced no statistics"),
    }
}

/// (dz, dparams)
pub(crate) fn epilogue_backward(
    g: (&CudaStorage, usize),
    z: Option<(&CudaStorage, usize)>,
    params: (&CudaStorage, usize),
    m: usize,
    n: usize,
    epilogue: Epilogue,
) -> Result<(CudaStorage, CudaStorage)> {
    if z.is_none() && epilogue.backward_needs_preactivation() {
        bail!("fused_linear backward: the epilogue {epilogue:?} needs the pre-activation z");
    }
    let rows = 1 + epilogue.has_scale_param() as usize;
    backward(g, z, params, None, m, n, rows, epilogue)
}

/// (dz, dparams)
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_backward(
    g: (&CudaStorage, usize),
    z: (&CudaStorage, usize),
    params: (&CudaStorage, usize),
    stats: (&CudaStorage, usize),
    m: usize,
    n: usize,
    epilogue: Epilogue,
    eps: f64,
    train: bool,
) -> Result<(CudaStorage, CudaStorage)> {
    let rows = batch_norm_rows(&epilogue, train);
    backward(
        g,
        Some(z),
        params,
        Some((stats, eps, train)),
        m,
        n,
        rows,
        epilogue,
    )
}

/// Rows of the BatchNorm op's parameter table: bias, [scale], gamma, beta, and in eval mode
/// running_mean, running_var.
fn batch_norm_rows(epilogue: &Epilogue, train: bool) -> usize {
    1 + epilogue.has_scale_param() as usize + if train { 2 } else { 4 }
}

/// The forward, with `batch_norm = Some((eps, train))` for the BatchNorm op.
fn forward(
    p: &LinearProblem,
    params_rows: usize,
    batch_norm: Option<(f64, bool)>,
    keep_preactivation: bool,
    mut running: Option<RunningTargets>,
) -> Result<(CudaStorage, Option<CudaStorage>, Option<CudaStorage>)> {
    const OP: &str = "fused_linear forward";
    let (m, n, k) = (p.m, p.n, p.k);
    if m == 0 || n == 0 || k == 0 {
        bail!("{OP}: every dimension must be at least 1, got m={m} n={n} k={k}");
    }
    if p.params.len() != params_rows {
        bail!(
            "{OP}: the epilogue takes {params_rows} per-feature vectors, got {}",
            p.params.len()
        );
    }
    let mut operands = vec![("x", p.x.0), ("w", p.w.0)];
    operands.extend(p.params.iter().map(|row| ("a per-feature vector", row.0)));
    if let Some(r) = &running {
        operands.extend([("running_mean", &*r.mean.0), ("running_var", &*r.var.0)]);
    }
    let dtype = operand_dtype(OP, &operands)?;
    let dev = p.x.0.device().clone();
    let stream = dev.cuda_stream();
    let train = matches!(batch_norm, Some((_, true)));
    let mut y = alloc(&dev, dtype, m * n)?;
    let mut z = match keep_preactivation {
        true => Some(alloc(&dev, dtype, m * n)?),
        false => None,
    };
    // Eval mode writes the statistics before the GEMM; train mode allocates them after the
    // GEMM's launch (below), off the path that an idle GPU waits out.
    let mut stats = match batch_norm {
        Some((_, false)) => Some(alloc_stats(&dev, n)?),
        _ => None,
    };
    let mut args = ffi::FusedLinearArgs {
        m: m as i64,
        n: n as i64,
        k: k as i64,
        dtype: ffi_dtype(dtype)?,
        tf32: (p.precision == Precision::Tf32) as i32,
        activation: p.epilogue.activation.code() as i32,
        has_scale: p.epilogue.has_scale_param() as i32,
        residual: p.epilogue.residual as i32,
        batch_norm: match batch_norm {
            None => ffi::BN_NONE,
            Some((_, false)) => ffi::BN_EVAL,
            Some((_, true)) => ffi::BN_TRAIN,
        },
        scale: p.epilogue.scalar_scale() as f32,
        eps: batch_norm.map_or(0.0, |(eps, _)| eps as f32),
        running_factor: running.as_ref().map_or(0.0, |r| r.factor as f32),
        ..Default::default()
    };
    // SAFETY: the function only reads the plain fields of `args`.
    let workspace_len =
        usize::try_from(unsafe { ffi::fused_linear_workspace_floats(&args) }).unwrap_or(0);
    let batch_stats = with_workspace(&dev, &stream, workspace_len, |workspace| {
        bind(&stream, OP)?;
        let (x, _gx) = input_ptr(p.x.0, p.x.1, m * k, &stream, "x")?;
        let (w, _gw) = input_ptr(p.w.0, p.w.1, n * k, &stream, "w")?;
        let (params, _params_guards) = param_rows(p.params, n, &stream)?;
        let (yp, _gy) = output_ptr(&mut y, &stream)?;
        let zp = z.as_mut().map(|z| output_ptr(z, &stream)).transpose()?;
        let sp = stats.as_mut().map(|s| output_ptr(s, &stream)).transpose()?;
        let wsp = workspace.map(|ws| ws.device_ptr_mut(&stream));
        let mut running_guards = Vec::new();
        if let Some(r) = running.as_mut() {
            if let Some((count, _)) = &r.num_batches_tracked {
                if count.dtype() != DType::I64 {
                    bail!(
                        "{OP}: num_batches_tracked must be int64, got {:?}",
                        count.dtype()
                    );
                }
            }
            let targets = [
                (Some(&mut r.mean), "running_mean", n),
                (Some(&mut r.var), "running_var", n),
                (r.num_batches_tracked.as_mut(), "num_batches_tracked", 1),
            ];
            let mut ptrs = [std::ptr::null_mut(); 3];
            for (ptr, (target, name, len)) in ptrs.iter_mut().zip(targets) {
                if let Some((storage, offset)) = target {
                    let (p, guard) = inout_ptr(storage, *offset, len, &stream, name)?;
                    *ptr = p;
                    running_guards.push(guard);
                }
            }
            args.running_mean = ptrs[0];
            args.running_var = ptrs[1];
            args.num_batches_tracked = ptrs[2].cast();
        }
        args.x = x;
        args.w = w;
        args.params = params;
        args.y = yp;
        args.z = zp.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p);
        args.stats = sp
            .as_ref()
            .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut f32);
        args.workspace = wsp
            .as_ref()
            .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut f32);
        let cu_stream = stream.cu_stream() as *mut c_void;
        let mut stats_row_tile = 0i64;
        // SAFETY: every pointer is a live device allocation of the extent checked above, and
        // the guards keep candle's stream ordering for them until the launch is enqueued.
        check(
            unsafe { ffi::fused_linear_forward(&args, cu_stream, &mut stats_row_tile) },
            "fused_linear_forward",
        )?;
        if !train {
            return Ok(None);
        }
        let mut batch_stats = alloc_stats(&dev, n)?;
        {
            let (sp, _gs) = output_ptr(&mut batch_stats, &stream)?;
            args.stats = sp as *mut f32;
            // SAFETY: as for the forward, and `stats` holds the 2n floats just allocated.
            check(
                unsafe { ffi::fused_linear_batch_norm_finish(&args, stats_row_tile, cu_stream) },
                "fused_linear_batch_norm_finish",
            )?;
        }
        Ok(Some(batch_stats))
    })?;
    Ok((y, z, batch_stats.or(stats)))
}

/// The (2, n) f32 statistics of a BatchNorm forward.
fn alloc_stats(dev: &CudaDevice, n: usize) -> Result<CudaStorage> {
    // SAFETY: the kernels write every element before anything reads it.
    let slice = unsafe { dev.alloc::<f32>(2 * n)? };
    Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
}

/// Workspaces of up to this many floats (64 MiB) are kept from call to call by
/// [`with_workspace`]; larger ones are allocated for the call.
const KEPT_WORKSPACE_FLOATS: usize = 16 << 20;

/// A workspace kept for the next forward or backward on the same device and stream.
struct KeptWorkspace {
    device: candle_core::cuda::DeviceId,
    stream: usize,
    floats: CudaSlice<f32>,
}

thread_local! {
    /// This thread's workspaces, one per device and stream it ran a forward or backward on.
    static KEPT_WORKSPACES: RefCell<Vec<KeptWorkspace>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` floats of workspace on `dev` (`None` when `len` is 0). Up to
/// [`KEPT_WORKSPACE_FLOATS`], it is this thread's kept workspace for the device and stream, grown
/// when too small: an allocation less before a forward's first kernel, which an idle GPU waits
/// out, and none in a training step's backward. Reuse is safe because the kernels that use the
/// workspace are all enqueued on `stream` (inside `f`), so a later call's kernels start after
/// them.
fn with_workspace<R>(
    dev: &CudaDevice,
    stream: &CudaStream,
    len: usize,
    f: impl FnOnce(Option<&mut CudaSlice<f32>>) -> Result<R>,
) -> Result<R> {
    // SAFETY (every allocation below): the kernels write every float of a workspace before they
    // read it: the partials before the merge, the merged factors before the normalisation,
    // stream-K's partial tiles before their sums, x's TF32 remainders before the exact GEMM that
    // reads them, the backward's partial sums before their reduction; the launch zeroes
    // stream-K's flags first.
    if len == 0 {
        return f(None);
    }
    if len > KEPT_WORKSPACE_FLOATS {
        return f(Some(&mut unsafe { dev.alloc::<f32>(len)? }));
    }
    KEPT_WORKSPACES.with(|cell| {
        // Nothing inside `f` runs another forward or backward, so the cell is never borrowed
        // here already; if it were, a fresh workspace would still be correct.
        let Ok(mut kept) = cell.try_borrow_mut() else {
            return f(Some(&mut unsafe { dev.alloc::<f32>(len)? }));
        };
        let key = (dev.id(), stream.cu_stream() as usize);
        let at = match kept.iter().position(|w| (w.device, w.stream) == key) {
            Some(at) => at,
            None => {
                kept.push(KeptWorkspace {
                    device: key.0,
                    stream: key.1,
                    floats: unsafe { dev.alloc::<f32>(len)? },
                });
                kept.len() - 1
            }
        };
        if kept[at].floats.len() < len {
            // The smaller workspace is freed in stream order, after its last use.
            kept[at].floats = unsafe { dev.alloc::<f32>(len)? };
        }
        f(Some(&mut kept[at].floats))
    })
}

/// The backward, with `batch_norm = Some((stats, eps, train))` for the BatchNorm op.
#[allow(clippy::too_many_arguments)]
fn backward(
    g: (&CudaStorage, usize),
    z: Option<(&CudaStorage, usize)>,
    params: (&CudaStorage, usize),
    batch_norm: Option<((&CudaStorage, usize), f64, bool)>,
    m: usize,
    n: usize,
    params_rows: usize,
    epilogue: Epilogue,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "fused_linear backward";
    if m == 0 || n == 0 {
        bail!("{OP}: every dimension must be at least 1, got m={m} n={n}");
    }
    let mut operands = vec![("grad", g.0), ("params", params.0)];
    if let Some(z) = z {
        operands.push(("z", z.0));
    }
    let dtype = operand_dtype(OP, &operands)?;
    if let Some(((stats, _), _, _)) = batch_norm {
        if stats.dtype() != DType::F32 {
            bail!(
                "{OP}: the BatchNorm statistics must be f32, got {:?}",
                stats.dtype()
            );
        }
    }
    let dev = g.0.device().clone();
    let stream = dev.cuda_stream();
    let mut dz = alloc(&dev, dtype, m * n)?;
    let mut dparams = alloc(&dev, dtype, params_rows * n)?;
    let mut args = ffi::FusedBackwardArgs {
        g: std::ptr::null(),
        z: std::ptr::null(),
        params: std::ptr::null(),
        stats: std::ptr::null(),
        dz: std::ptr::null_mut(),
        dparams: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        m: m as i64,
        n: n as i64,
        dtype: ffi_dtype(dtype)?,
        activation: epilogue.activation.code() as i32,
        has_scale: epilogue.has_scale_param() as i32,
        residual: epilogue.residual as i32,
        batch_norm: match batch_norm {
            None => ffi::BN_NONE,
            Some((_, _, false)) => ffi::BN_EVAL,
            Some((_, _, true)) => ffi::BN_TRAIN,
        },
        scale: epilogue.scalar_scale() as f32,
        eps: batch_norm.map_or(0.0, |(_, eps, _)| eps as f32),
    };
    // SAFETY: the function only reads the plain fields of `args`.
    let workspace_len =
        usize::try_from(unsafe { ffi::fused_backward_workspace_floats(&args) }).unwrap_or(0);
    with_workspace(&dev, &stream, workspace_len, |workspace| {
        let Some(workspace) = workspace else {
            bail!("{OP}: the kernels reported an empty workspace for m={m} n={n}");
        };
        bind(&stream, OP)?;
        let (gp, _gg) = input_ptr(g.0, g.1, m * n, &stream, "grad")?;
        let zp = z
            .map(|(s, o)| input_ptr(s, o, m * n, &stream, "z"))
            .transpose()?;
        let (pp, _gp) = input_ptr(params.0, params.1, params_rows * n, &stream, "params")?;
        let sp = batch_norm
            .map(|((s, o), _, _)| input_ptr(s, o, 2 * n, &stream, "stats"))
            .transpose()?;
        let (dzp, _gdz) = output_ptr(&mut dz, &stream)?;
        let (dpp, _gdp) = output_ptr(&mut dparams, &stream)?;
        let (wsp, _gws) = workspace.device_ptr_mut(&stream);
        args.g = gp;
        args.z = zp.as_ref().map_or(std::ptr::null(), |(p, _)| *p);
        args.params = pp;
        args.stats = sp
            .as_ref()
            .map_or(std::ptr::null(), |(p, _)| *p as *const f32);
        args.dz = dzp;
        args.dparams = dpp;
        args.workspace = wsp as *mut f32;
        // SAFETY: as in `forward`.
        check(
            unsafe { ffi::fused_backward(&args, stream.cu_stream() as *mut c_void) },
            "fused_backward",
        )
    })?;
    Ok((dz, dparams))
}

/// Whether [`linear_input_and_weight_grads`] takes the batch-major copies `dzᵀ` (n, m) and
/// `xᵀ` (k, m) of the backward's operands for `dtype`. TF32 tensor cores read both operands
/// along the contraction, which for the weight gradient runs over the batch: exact f32 runs
/// that product on the fused kernels' 3xTF32 GEMM, which takes only that layout, and TF32 on
/// cuBLAS gains from it (0.05-0.1 ms off the 1024x8192->8192 train steps on an H200). bf16 and
/// f16 tensor cores take either layout, and the copies would only cost.
pub(crate) fn takes_batch_major(dtype: DType) -> bool {
    dtype == DType::F32
}

/// `(rows, cols)ᵀ` of a contiguous operand, as a new contiguous (cols, rows) buffer.
pub(crate) fn transpose(a: Operand, (rows, cols): (usize, usize)) -> Result<CudaStorage> {
    const OP: &str = "fused transpose";
    let dtype = operand_dtype(OP, &[("operand", a.0)])?;
    if rows == 0 || cols == 0 {
        bail!("{OP}: every dimension must be at least 1, got {rows}x{cols}");
    }
    let dev = a.0.device().clone();
    let stream = dev.cuda_stream();
    let mut out = alloc(&dev, dtype, rows * cols)?;
    {
        bind(&stream, OP)?;
        let (input, _gi) = input_ptr(a.0, a.1, rows * cols, &stream, "operand")?;
        let (output, _go) = output_ptr(&mut out, &stream)?;
        // SAFETY: both pointers are live device allocations of rows * cols elements, ordered on
        // candle's stream by the guards.
        check(
            unsafe {
                ffi::fused_transpose(
                    input,
                    output,
                    rows as i64,
                    cols as i64,
                    ffi_dtype(dtype)?,
                    stream.cu_stream() as *mut c_void,
                )
            },
            "fused_transpose",
        )?;
    }
    Ok(out)
}

/// The `(rows.len(), n)` parameter table of per-feature vectors, each `n` contiguous elements
/// of one dtype, stacked by one kernel launch.
pub(crate) fn param_table(rows: &[Operand], n: usize) -> Result<CudaStorage> {
    const OP: &str = "fused parameter table";
    // `param_rows` below refuses more than MAX_PARAM_ROWS.
    if rows.is_empty() {
        bail!("{OP}: takes at least one vector");
    }
    if n == 0 {
        bail!("{OP}: the vectors are empty");
    }
    let named: Vec<_> = ROW_NAMES
        .iter()
        .zip(rows)
        .map(|(name, r)| (*name, r.0))
        .collect();
    let dtype = operand_dtype(OP, &named)?;
    let dev = rows[0].0.device().clone();
    let stream = dev.cuda_stream();
    let mut out = alloc(&dev, dtype, rows.len() * n)?;
    {
        bind(&stream, OP)?;
        let (table, _row_guards) = param_rows(rows, n, &stream)?;
        let (output, _go) = output_ptr(&mut out, &stream)?;
        // SAFETY: every row pointer is a live device allocation of n elements and the output one
        // of rows * n, ordered on candle's stream by the guards.
        check(
            unsafe {
                ffi::fused_param_table(
                    &table,
                    output,
                    n as i64,
                    ffi_dtype(dtype)?,
                    stream.cu_stream() as *mut c_void,
                )
            },
            "fused_param_table",
        )?;
    }
    Ok(out)
}

/// The operands of a linear layer's backward products: `dz` (m, n), `x` (m, k), `w` (n, k),
/// and the transposed copies that [`takes_batch_major`] asks for.
pub(crate) struct BackwardOperands<'a> {
    /// The gradient at the pre-activation.
    pub dz: Operand<'a>,
    /// The layer's input.
    pub x: Operand<'a>,
    /// The weight.
    pub w: Operand<'a>,
    /// `dzᵀ` (n, m) and `xᵀ` (k, m).
    pub batch_major: Option<(Operand<'a>, Operand<'a>)>,
}

/// The products of a linear layer's backward, `dx = dz·W` (m, k) and `dW = dzᵀ·x` (n, k), in
/// the arithmetic that the dtype and `precision` ask for, whatever Candle's global
/// reduced-precision switches say:
/// - exact f32: the input gradient on the Hopper kernel that reads `W` as it lies
///   ([`input_grad_direct`]) when it takes the problem, else on the fused kernels'
///   fp32-accurate 3xTF32 GEMM from a transposed copy of `W` made here (`dx = dz·(Wᵀ)ᵀ`); the
///   weight gradient on that GEMM from the transposed copies, which it needs (`dW =
///   dzᵀ·(xᵀ)ᵀ`), but for a batch of at most 128 rows as one TF32 cuBLAS GEMM over split
///   operands laid side by side ([`exact_weight_grad_from_split`]), faster there;
/// - TF32: cuBLAS on TF32 tensor cores, the weight gradient from `dzᵀ` and `xᵀ` when given;
///   for a batch of at most 128 rows on an sm_90 device, both products on the crate's own
///   kernels where they take the problem (the input gradient on [`input_grad_direct`]'s, the
///   weight gradient on `cuda-kernels/weight_grad_sm90.cu`'s), which are faster there;
/// - f16 and bf16: cuBLAS with f32 accumulation, but for the weight gradient of a batch of at
///   most 128 rows on an sm_90 device, which runs on `cuda-kernels/weight_grad_sm90.cu`'s kernel
///   where it takes the problem.
pub(crate) fn linear_input_and_weight_grads(
    operands: &BackwardOperands,
    (m, n, k): (usize, usize, usize),
    precision: Precision,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "fused_linear backward GEMM";
    let BackwardOperands {
        dz,
        x,
        w,
        batch_major,
    } = *operands;
    let dtype = operand_dtype(OP, &[("grad", dz.0), ("x", x.0), ("w", w.0)])?;
    if dtype == DType::F32 && precision == Precision::Exact {
        let Some((dz_t, x_t)) = batch_major else {
            bail!("{OP}: exact f32 needs the transposed copies of dz and x");
        };
        let product = |a: Operand, b: Operand, (rows, cols, inner)| -> Result<CudaStorage> {
            let problem = LinearProblem {
                x: a,
                w: b,
                params: &[],
                m: rows,
                n: cols,
                k: inner,
                epilogue: Epilogue::IDENTITY,
                precision,
            };
            Ok(forward(&problem, 0, None, false, None)?.0)
        };
        let dw = if m <= SPLIT_WEIGHT_GRAD_ROWS {
            exact_weight_grad_from_split(dz_t, x_t, (m, n, k))?
        } else {
            product(dz_t, x_t, (n, k, m))?
        };
        let dx = match input_grad_direct(dz, w, (m, n, k), precision)? {
            Some(dx) => dx,
            None => product(dz, (&transpose(w, (n, k))?, 0), (m, k, n))?,
        };
        return Ok((dx, dw));
    }
    cublas_input_and_weight_grads(operands, (m, n, k), dtype)
}

/// [`linear_input_and_weight_grads`] for TF32 (f32), f16 and bf16: on cuBLAS, but for the
/// small-batch products that the crate's Hopper kernels take.
fn cublas_input_and_weight_grads(
    operands: &BackwardOperands,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "fused_linear backward GEMM";
    let BackwardOperands {
        dz,
        x,
        w,
        batch_major,
        ..
    } = *operands;
    let (mi, ni, ki) = (
        cublas_extent(OP, "m", m)?,
        cublas_extent(OP, "n", n)?,
        cublas_extent(OP, "k", k)?,
    );
    let dev = dz.0.device().clone();
    let stream = dev.cuda_stream();
    let gemm = Gemm::of(&dev, dtype, OP);
    let direct_dx = if dtype == DType::F32 {
        input_grad_direct(dz, w, (m, n, k), Precision::Tf32)?
    } else {
        None
    };
    let dx_on_cublas = direct_dx.is_none();
    let mut dx = match direct_dx {
        Some(dx) => dx,
        None => alloc(&dev, dtype, m * k)?,
    };
    let mut dw = alloc(&dev, dtype, n * k)?;
    {
        bind(&stream, OP)?;
        let (dzp, _gdz) = input_ptr(dz.0, dz.1, m * n, &stream, "grad")?;
        let (xp, _gx) = input_ptr(x.0, x.1, m * k, &stream, "x")?;
        let (wp, _gw) = input_ptr(w.0, w.1, n * k, &stream, "w")?;
        let (dxp, _gdx) = output_ptr(&mut dx, &stream)?;
        let (dwp, _gdw) = output_ptr(&mut dw, &stream)?;
        let k_major = match batch_major {
            Some(((dz_t, dz_o), (x_t, x_o))) => Some((
                input_ptr(dz_t, dz_o, m * n, &stream, "grad, transposed")?,
                input_ptr(x_t, x_o, m * k, &stream, "x, transposed")?,
            )),
            None => None,
        };
        // SAFETY (every product below): the pointers are live device allocations of the
        // extents checked above, and the guards order the accesses on candle's stream, which
        // the handle runs on.
        // dxᵀ (k, m) = Wᵀ (k, n) · dzᵀ (n, m), unless the direct kernel computed dx.
        if dx_on_cublas {
            unsafe { gemm.run((ki, mi, ni), (false, wp, ki), (false, dzp, ni), dxp) }?;
        }
        // dW from a batch of at most 128 rows: on the crate's Hopper kernel when it takes the
        // problem, in TF32 from the transposed copies, in f16 and bf16 from dz and x as they lie.
        let mut taken = 0i32;
        let cu_stream = stream.cu_stream() as *mut c_void;
        // SAFETY (both kernels): as above; the kernel runs on candle's stream and writes only dw.
        match (&k_major, dtype) {
            (Some(((dz_t, _), (x_t, _))), DType::F32) => check(
                unsafe {
                    ffi::fused_weight_grad_tf32(
                        *dz_t as *const f32,
                        *x_t as *const f32,
                        dwp as *mut f32,
                        m as i64,
                        n as i64,
                        k as i64,
                        &mut taken,
                        cu_stream,
                    )
                },
                "TF32 weight gradient",
            )?,
            (None, DType::F16 | DType::BF16) => check(
                unsafe {
                    ffi::fused_weight_grad_16bit(
                        dzp,
                        xp,
                        dwp,
                        m as i64,
                        n as i64,
                        k as i64,
                        ffi_dtype(dtype)?,
                        &mut taken,
                        cu_stream,
                    )
                },
                "16-bit weight gradient",
            )?,
            _ => {}
        }
        let taken = taken != 0;
        // Else cuBLAS: dWᵀ (k, n) = xᵀ (k, m) · dz (m, n), from the transposed copies when
        // given, so that both operands run along the contraction.
        if !taken {
            match &k_major {
                Some(((dz_t, _), (x_t, _))) => unsafe {
                    gemm.run((ki, ni, mi), (true, *x_t, mi), (false, *dz_t, mi), dwp)
                },
                None => unsafe { gemm.run((ki, ni, mi), (false, xp, ki), (true, dzp, ni), dwp) },
            }?;
        }
    }
    Ok((dx, dw))
}

/// TF32 batches of at most this many rows take the input gradient from `W` as it lies
/// ([`input_grad_direct`]) rather than from cuBLAS; exact f32 batches of any size do, rather
/// than from a transposed copy of `W`.
const DIRECT_TF32_INPUT_GRAD_ROWS: usize = 128;

/// The f32 input gradient `dx (m, k) = dz·W`, in exact f32 or TF32 as `precision` says, on the
/// Hopper kernel of `cuda-kernels/input_grad_sm90.cu`, which reads `w (n, k)` as it lies; or
/// `None` when that kernel does not take the problem: a TF32 batch of more than
/// [`DIRECT_TF32_INPUT_GRAD_ROWS`] rows (checked here, before anything is allocated), another
/// device, a shape or an alignment it does not take. Its scratch, dz's TF32 remainders or
/// rounded values (`m·n` f32 elements), is freed when it returns.
fn input_grad_direct(
    dz: Operand,
    w: Operand,
    (m, n, k): (usize, usize, usize),
    precision: Precision,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "f32 input gradient";
    if precision == Precision::Tf32 && m > DIRECT_TF32_INPUT_GRAD_ROWS {
        return Ok(None);
    }
    let dev = dz.0.device().clone();
    let stream = dev.cuda_stream();
    let mut dz_part = alloc(&dev, DType::F32, m * n)?;
    let mut dx = alloc(&dev, DType::F32, m * k)?;
    let mut taken = 0i32;
    {
        bind(&stream, OP)?;
        let (dzp, _gdz) = input_ptr(dz.0, dz.1, m * n, &stream, "grad")?;
        let (wp, _gw) = input_ptr(w.0, w.1, n * k, &stream, "w")?;
        let (partp, _gp) = output_ptr(&mut dz_part, &stream)?;
        let (dxp, _gdx) = output_ptr(&mut dx, &stream)?;
        // SAFETY: the pointers are live device allocations of the extents above (dz and
        // dz_part m·n elements, w n·k, dx m·k), ordered on candle's stream by the guards; the
        // kernels run on that stream and write only dz_part and dx.
        check(
            unsafe {
                ffi::fused_input_grad_f32(
                    dzp as *const f32,
                    wp as *const f32,
                    dxp as *mut f32,
                    partp as *mut f32,
                    m as i64,
                    n as i64,
                    k as i64,
                    i32::from(precision == Precision::Tf32),
                    &mut taken,
                    stream.cu_stream() as *mut c_void,
                )
            },
            "fused_input_grad_f32",
        )?;
    }
    Ok((taken != 0).then_some(dx))
}

/// Batches of at most this many rows take the exact f32 weight gradient as one TF32 GEMM over
/// split operands ([`exact_weight_grad_from_split`]).
const SPLIT_WEIGHT_GRAD_ROWS: usize = 128;

/// The exact f32 weight gradient `dW (n, k) = dzᵀ·x` as one TF32 cuBLAS GEMM contracting over
/// `3m`: `[small | big | big](dzᵀ) · [big | small | big](xᵀ)ᵀ`, the 3xTF32 split of
/// `cuda-kernels/weight_grad_split.cu`, from the transposed copies `dzᵀ (n, m)` and `xᵀ (k, m)`.
/// Its split operands are `3m·(n + k)` f32 elements, freed when it returns.
fn exact_weight_grad_from_split(
    dz_t: Operand,
    x_t: Operand,
    (m, n, k): (usize, usize, usize),
) -> Result<CudaStorage> {
    const OP: &str = "exact f32 weight gradient";
    let inner = m * 3;
    let (ii, ni, ki) = (
        cublas_extent(OP, "3m", inner)?,
        cublas_extent(OP, "n", n)?,
        cublas_extent(OP, "k", k)?,
    );
    let dev = dz_t.0.device().clone();
    let stream = dev.cuda_stream();
    let gemm = Gemm::of(&dev, DType::F32, OP);
    let mut dz_parts = alloc(&dev, DType::F32, n * inner)?;
    let mut x_parts = alloc(&dev, DType::F32, k * inner)?;
    let mut dw = alloc(&dev, DType::F32, n * k)?;
    {
        bind(&stream, OP)?;
        let (dzp, _gdz) = input_ptr(dz_t.0, dz_t.1, m * n, &stream, "grad, transposed")?;
        let (xp, _gx) = input_ptr(x_t.0, x_t.1, m * k, &stream, "x, transposed")?;
        let (dz_partsp, _gdzs) = output_ptr(&mut dz_parts, &stream)?;
        let (x_partsp, _gxs) = output_ptr(&mut x_parts, &stream)?;
        let (dwp, _gdw) = output_ptr(&mut dw, &stream)?;
        // The remainders of dz in the first part, those of x in the second.
        for (input, parts, rows, small_at) in [(dzp, dz_partsp, n, 0), (xp, x_partsp, k, 1)] {
            // SAFETY: `input` holds rows·m f32 elements and `parts` rows·3m (allocated above),
            // ordered on candle's stream by the guards; the kernel runs on that stream.
            check(
                unsafe {
                    ffi::fused_split_rows_tf32(
                        input as *const f32,
                        parts as *mut f32,
                        rows as i64,
                        m as i64,
                        small_at,
                        stream.cu_stream() as *mut c_void,
                    )
                },
                "TF32 split",
            )?;
        }
        // dWᵀ (k, n) = x_parts (k, 3m) · dz_partsᵀ (3m, n), as the TF32 product from the
        // transposed copies. SAFETY: as above, the parts holding rows·3m elements each.
        unsafe {
            gemm.run(
                (ki, ni, ii),
                (true, x_partsp, ii),
                (false, dz_partsp, ii),
                dwp,
            )
        }?;
    }
    Ok(dw)
}

/// `v` as a cuBLAS extent, or an error naming it.
fn cublas_extent(op: &str, name: &str, v: usize) -> Result<c_int> {
    match c_int::try_from(v) {
        Ok(v) if v > 0 => Ok(v),
        _ => bail!("{op}: {name} = {v} is outside cuBLAS's range 1..=2^31-1"),
    }
}

/// cuBLAS GEMMs in one element type with f32 accumulation (on TF32 tensor cores for f32),
/// whatever Candle's global reduced-precision switches say, on the device's handle.
struct Gemm<'a> {
    blas: std::sync::Arc<candle_core::cuda::cudarc::cublas::CudaBlas>,
    element: candle_core::cuda::cudarc::cublas::sys::cudaDataType_t,
    compute: candle_core::cuda::cudarc::cublas::sys::cublasComputeType_t,
    op: &'a str,
}

impl<'a> Gemm<'a> {
    /// GEMMs of `dtype` operands on `dev`'s handle, their errors naming `op`.
    fn of(dev: &CudaDevice, dtype: DType, op: &'a str) -> Self {
        use candle_core::cuda::cudarc::cublas::sys::{cublasComputeType_t, cudaDataType_t};
        let (element, compute) = match dtype {
            DType::F32 => (
                cudaDataType_t::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            DType::F16 => (
                cudaDataType_t::CUDA_R_16F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            _ => (
                cudaDataType_t::CUDA_R_16BF,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        Gemm {
            blas: dev.cublas_handle(),
            element,
            compute,
            op,
        }
    }

    /// `C (rows, cols) = op(A) · op(B)` in cuBLAS's column-major terms (a row-major (r, c)
    /// matrix is its (c, r) transpose there), each operand given as (transposed, device address,
    /// leading dimension), C with leading dimension `rows`.
    ///
    /// # Safety
    /// The addresses must be live device allocations of the extents that the shapes and leading
    /// dimensions imply, their accesses ordered on the stream that the handle runs on.
    unsafe fn run(
        &self,
        (rows, cols, inner): (c_int, c_int, c_int),
        (transa, a, lda): (bool, *const c_void, c_int),
        (transb, b, ldb): (bool, *const c_void, c_int),
        c: *mut c_void,
    ) -> Result<()> {
        use candle_core::cuda::cudarc::cublas::{result::gemm_ex, sys};
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        gemm_ex(
            *self.blas.handle(),
            op(transa),
            op(transb),
            rows,
            cols,
            inner,
            &alpha as *const f32 as *const c_void,
            a,
            self.element,
            lda,
            b,
            self.element,
            ldb,
            &beta as *const f32 as *const c_void,
            c,
            self.element,
            rows,
            self.compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| candle_core::Error::Cuda(format!("candle-fused {}: {e:?}", self.op).into()))
    }
}

/// BatchNorm's running-statistics update of one buffer, in place on the device:
/// `running = (1 − factor)·running + factor·weight·batch` over `n` features, `running` of the
/// model's dtype at element `running.1`, `batch` the f32 statistic at element `batch.1`.
pub(crate) fn batch_norm_update_running(
    running: (&mut CudaStorage, usize),
    batch: (&CudaStorage, usize),
    n: usize,
    factor: f64,
    weight: f64,
) -> Result<()> {
    const OP: &str = "batch_norm_update_running";
    if batch.0.dtype() != DType::F32 {
        bail!(
            "{OP}: the batch statistic must be f32, got {:?}",
            batch.0.dtype()
        );
    }
    let dtype = ffi_dtype(running.0.dtype())?;
    let stream = batch.0.device().cuda_stream();
    let (bp, _gb) = input_ptr(batch.0, batch.1, n, &stream, "batch statistic")?;
    let (rp, _gr) = inout_ptr(running.0, running.1, n, &stream, "the running buffer")?;
    bind(&stream, OP)?;
    // SAFETY: both ranges were checked against their allocations; the guards order the
    // accesses on candle's stream.
    check(
        unsafe {
            ffi::batch_norm_update_running(
                rp,
                bp as *const f32,
                n as i64,
                dtype,
                factor as f32,
                weight as f32,
                stream.cu_stream() as *mut c_void,
            )
        },
        OP,
    )
}

/// Errors unless elements `[offset, offset + len)` lie within an allocation of `capacity`.
fn check_extent(name: &str, offset: usize, len: usize, capacity: usize) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > capacity) {
        bail!(
            "fused_linear: {name} needs elements [{offset}, {offset} + {len}) but its storage holds {capacity}"
        );
    }
    Ok(())
}

/// The common dtype of the operands, which must be f32, f16 or bf16.
fn operand_dtype(op: &str, operands: &[(&str, &CudaStorage)]) -> Result<DType> {
    let dtype = operands[0].1.dtype();
    for (name, storage) in operands {
        if storage.dtype() != dtype {
            bail!(
                "{op}: {name} is {:?} but {} is {dtype:?}; all operands must share one dtype",
                storage.dtype(),
                operands[0].0
            );
        }
    }
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
        DType::F64 => bail!("{op}: f64 is CPU-only; use f32, f16 or bf16 on CUDA"),
        other => bail!("{op}: unsupported dtype {other:?}; expected f32, f16 or bf16"),
    }
}

fn ffi_dtype(dtype: DType) -> Result<i32> {
    match dtype {
        DType::F32 => Ok(ffi::DTYPE_F32),
        DType::F16 => Ok(ffi::DTYPE_F16),
        DType::BF16 => Ok(ffi::DTYPE_BF16),
        other => bail!("fused_linear: unsupported dtype {other:?} on CUDA"),
    }
}

/// An uninitialised buffer of `len` elements; the kernels write all of it.
fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    // SAFETY: every element is written by the kernels before it is read.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(len)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(len)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(len)?, dev.clone()),
            other => bail!("fused_linear: unsupported dtype {other:?} on CUDA"),
        }
    };
    Ok(storage)
}

/// The per-feature vectors as error messages name them.
const ROW_NAMES: [&str; ffi::MAX_PARAM_ROWS] = [
    "per-feature vector 0",
    "per-feature vector 1",
    "per-feature vector 2",
    "per-feature vector 3",
    "per-feature vector 4",
    "per-feature vector 5",
];

/// The addresses of per-feature vectors of `n` elements each, checked against their storages,
/// with the guards that order the reads on `stream`.
fn param_rows<'a>(
    rows: &'a [Operand<'a>],
    n: usize,
    stream: &'a CudaStream,
) -> Result<(ffi::FusedParamRows, Vec<SyncOnDrop<'a>>)> {
    if rows.len() > ffi::MAX_PARAM_ROWS {
        bail!(
            "fused_linear: at most {} per-feature vectors, got {}",
            ffi::MAX_PARAM_ROWS,
            rows.len()
        );
    }
    let mut table = ffi::FusedParamRows {
        count: rows.len() as i32,
        ..Default::default()
    };
    let mut guards = Vec::with_capacity(rows.len());
    for ((slot, name), (storage, offset)) in table.row.iter_mut().zip(ROW_NAMES).zip(rows) {
        let (ptr, guard) = input_ptr(storage, *offset, n, stream, name)?;
        *slot = ptr;
        guards.push(guard);
    }
    Ok((table, guards))
}

/// Makes the device's context current on this thread, for the runtime API.
fn bind(stream: &CudaStream, op: &str) -> Result<()> {
    stream.context().bind_to_thread().map_err(|e| {
        candle_core::Error::Cuda(format!("{op}: binding the CUDA context: {e:?}").into())
    })
}

/// A storage's device allocation: its address, element size and length in elements.
struct Allocation {
    base: u64,
    elem_bytes: usize,
    len: usize,
}

impl Allocation {
    fn of<T>(base: u64, slice_len: usize) -> Self {
        Allocation {
            base,
            elem_bytes: std::mem::size_of::<T>(),
            len: slice_len,
        }
    }

    /// The address of element `offset`, once `[offset, offset + len)` is checked to lie inside.
    fn at(&self, name: &str, offset: usize, len: usize) -> Result<u64> {
        check_extent(name, offset, len, self.len)?;
        Ok(self.base + (offset * self.elem_bytes) as u64)
    }
}

/// The allocation of a storage that a kernel reads, with the guard that orders the read on
/// `stream`.
fn read_allocation<'a>(
    s: &'a CudaStorage,
    stream: &'a CudaStream,
    name: &str,
) -> Result<(Allocation, SyncOnDrop<'a>)> {
    fn of<'a, T>(slice: &'a CudaSlice<T>, stream: &'a CudaStream) -> (Allocation, SyncOnDrop<'a>) {
        let (ptr, guard) = slice.device_ptr(stream);
        (Allocation::of::<T>(ptr, slice.len()), guard)
    }
    Ok(match &s.slice {
        CudaStorageSlice::F32(v) => of(v, stream),
        CudaStorageSlice::F16(v) => of(v, stream),
        CudaStorageSlice::BF16(v) => of(v, stream),
        _ => bail!(
            "fused_linear: {name} has unsupported dtype {:?} on CUDA",
            s.dtype()
        ),
    })
}

/// The allocation of a storage that a kernel writes, with the guard that orders the write on
/// `stream`.
fn write_allocation<'a>(
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
    name: &str,
) -> Result<(Allocation, SyncOnDrop<'a>)> {
    fn of<'a, T>(
        slice: &'a mut CudaSlice<T>,
        stream: &'a CudaStream,
    ) -> (Allocation, SyncOnDrop<'a>) {
        let len = slice.len();
        let (ptr, guard) = slice.device_ptr_mut(stream);
        (Allocation::of::<T>(ptr, len), guard)
    }
    let dtype = s.dtype();
    Ok(match &mut s.slice {
        CudaStorageSlice::F32(v) => of(v, stream),
        CudaStorageSlice::F16(v) => of(v, stream),
        CudaStorageSlice::BF16(v) => of(v, stream),
        CudaStorageSlice::I64(v) => of(v, stream),
        _ => bail!("fused_linear: {name} has unsupported dtype {dtype:?} on CUDA"),
    })
}

/// The device address of elements `[offset, offset + len)` of `s`, checked against its extent,
/// with the guard that orders the read on `stream`.
fn input_ptr<'a>(
    s: &'a CudaStorage,
    offset: usize,
    len: usize,
    stream: &'a CudaStream,
    name: &str,
) -> Result<(*const c_void, SyncOnDrop<'a>)> {
    let (allocation, guard) = read_allocation(s, stream, name)?;
    Ok((allocation.at(name, offset, len)? as *const c_void, guard))
}

/// The device address of elements `[offset, offset + len)` of `s`, which the kernels read and
/// write in place, checked against its extent, with the guard that orders the write on `stream`.
fn inout_ptr<'a>(
    s: &'a mut CudaStorage,
    offset: usize,
    len: usize,
    stream: &'a CudaStream,
    name: &str,
) -> Result<(*mut c_void, SyncOnDrop<'a>)> {
    let (allocation, guard) = write_allocation(s, stream, name)?;
    Ok((allocation.at(name, offset, len)? as *mut c_void, guard))
}

/// The device address of a whole output buffer, with the guard that orders the write.
fn output_ptr<'a>(
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
) -> Result<(*mut c_void, SyncOnDrop<'a>)> {
    let (allocation, guard) = write_allocation(s, stream, "the output")?;
    Ok((allocation.base as *mut c_void, guard))
}

/// Turns a `cudaError_t` into an error naming the kernel and CUDA's description.
fn check(code: c_int, kernel: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let message = unsafe { CStr::from_ptr(ffi::cudaGetErrorString(code)) }.to_string_lossy();
    Err(candle_core::Error::Cuda(
        format!("candle-fused {kernel}: CUDA error {code}: {message}").into(),
    ))
}

/// Keeps the memory that freed tensors return to the device's stream-ordered pool instead of
/// handing it back to the driver at every synchronisation, so that a training loop's large
/// per-step buffers (gradients, activations) are reused rather than mapped again each step.
pub(crate) fn keep_freed_memory(device: &CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let context = stream.context();
    let driver = |what: &str, e: candle_core::cuda::cudarc::driver::DriverError| {
        candle_core::Error::Cuda(format!("candle-fused {what}: {e:?}").into())
    };
    context
        .bind_to_thread()
        .map_err(|e| driver("binding the context", e))?;
    // SAFETY: `pool` is written by the driver before it is read; the attribute takes a u64.
    unsafe {
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device())
            .result()
            .map_err(|e| driver("cuDeviceGetDefaultMemPool", e))?;
        let mut threshold = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| driver("cuMemPoolSetAttribute", e))?;
    }
    Ok(())
}
