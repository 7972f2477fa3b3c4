//! The C interface of `cuda-kernels/` (`fused_linear.h`), built and linked by `build.rs`.

use std::ffi::{c_char, c_int, c_void};

/// `FusedDType`: the element type of the operands.
pub(crate) const DTYPE_F32: i32 = 0;
/// `FusedDType`: f16 operands.
pub(crate) const DTYPE_F16: i32 = 1;
/// `FusedDType`: bf16 operands.
pub(crate) const DTYPE_BF16: i32 = 2;

/// `FusedBatchNorm`: no BatchNorm after the epilogue.
pub(crate) const BN_NONE: i32 = 0;
/// `FusedBatchNorm`: BatchNorm with the running statistics.
pub(crate) const BN_EVAL: i32 = 1;
/// `FusedBatchNorm`: BatchNorm with the batch statistics.
pub(crate) const BN_TRAIN: i32 = 2;

/// `FusedLinearArgs`: the operands of `fused_linear_forward`, device pointers included.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct FusedLinearArgs {
    /// `x` (m, k).
    pub x: *const c_void,
    /// `w` (n, k).
    pub w: *const c_void,
    /// The per-feature vectors, each (n), by their own addresses.
    pub params: FusedParamRows,
    /// The output (m, n).
    pub y: *mut c_void,
    /// The pre-activation (m, n), or null.
    pub z: *mut c_void,
    /// `fused_linear_workspace_floats` floats; null when that is 0.
    pub workspace: *mut f32,
    /// BatchNorm: the (2, n) f32 statistics; null otherwise (and in train mode until the
    /// finish).
    pub stats: *mut f32,
    /// BatchNorm train: the running mean (n), updated in place; null to leave it alone.
    pub running_mean: *mut c_void,
    /// BatchNorm train: the running variance (n), updated with `running_mean`.
    pub running_var: *mut c_void,
    /// BatchNorm train: `num_batches_tracked`, incremented with the running statistics; or null.
    pub num_batches_tracked: *mut i64,
    /// Rows of `x`.
    pub m: i64,
    /// Rows of `w`.
    pub n: i64,
    /// The reduction length.
    pub k: i64,
    /// A `DTYPE_*` constant.
    pub dtype: i32,
    /// f32 only: 1 for plain TF32, 0 for 3xTF32.
    pub tf32: i32,
    /// `Activation::code()`.
    pub activation: i32,
    /// Whether params row 1 is a per-feature scale.
    pub has_scale: i32,
    /// Whether z is added back.
    pub residual: i32,
    /// A `BN_*` constant.
    pub batch_norm: i32,
    /// The scalar factor.
    pub scale: f32,
    /// BatchNorm epsilon.
    pub eps: f32,
    /// BatchNorm train with running statistics: the batch statistics' weight in the blend.
    pub running_factor: f32,
}

impl Default for FusedLinearArgs {
    /// Null pointers, zero extents, f32, no epilogue: a base for the fields a call sets.
    fn default() -> Self {
        FusedLinearArgs {
            x: std::ptr::null(),
            w: std::ptr::null(),
            params: FusedParamRows::default(),
            y: std::ptr::null_mut(),
            z: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            stats: std::ptr::null_mut(),
            running_mean: std::ptr::null_mut(),
            running_var: std::ptr::null_mut(),
            num_batches_tracked: std::ptr::null_mut(),
            m: 0,
            n: 0,
            k: 0,
            dtype: DTYPE_F32,
            tf32: 0,
            activation: 0,
            has_scale: 0,
            residual: 0,
            batch_norm: BN_NONE,
            scale: 1.0,
            eps: 0.0,
            running_factor: 0.0,
        }
    }
}

/// `FusedBackwardArgs`: the operands of `fused_backward`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct FusedBackwardArgs {
    /// The gradient of y (m, n).
    pub g: *const c_void,
    /// The pre-activation (m, n), or null when the epilogue does not need it.
    pub z: *const c_void,
    /// The parameter table (rows, n).
    pub params: *const c_void,
    /// BatchNorm: the (2, n) f32 statistics of the forward; null otherwise.
    pub stats: *const f32,
    /// The gradient of z (m, n).
    pub dz: *mut c_void,
    /// The gradient of the parameter table (rows, n).
    pub dparams: *mut c_void,
    /// `fused_backward_workspace_floats` floats.
    pub workspace: *mut f32,
    /// Rows.
    pub m: i64,
    /// Columns.
    pub n: i64,
    /// A `DTYPE_*` constant.
    pub dtype: i32,
    /// `Activation::code()`.
    pub activation: i32,
    /// Whether params row 1 is a per-feature scale.
    pub has_scale: i32,
    /// Whether z was added back.
    pub residual: i32,
    /// A `BN_*` constant.
    pub batch_norm: i32,
    /// The scalar factor.
    pub scale: f32,
    /// BatchNorm epsilon.
    pub eps: f32,
}

/// `FUSED_MAX_PARAM_ROWS`: the most per-feature vectors an op has.
pub(crate) const MAX_PARAM_ROWS: usize = 6;

/// `FusedParamRows`: per-feature vectors, each by its device address.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct FusedParamRows {
    /// Device addresses of the vectors; the first `count` are used.
    pub row: [*const c_void; MAX_PARAM_ROWS],
    /// Vectors in use.
    pub count: i32,
}

impl Default for FusedParamRows {
    /// No vectors.
    fn default() -> Self {
        FusedParamRows {
            row: [std::ptr::null(); MAX_PARAM_ROWS],
            count: 0,
        }
    }
}

extern "C" {
    /// Floats of workspace that `fused_linear_forward` needs.
    pub(crate) fn fused_linear_workspace_floats(args: *const FusedLinearArgs) -> i64;
    /// The fused forward on `stream`; returns a `cudaError_t`. In BatchNorm train mode it
    /// leaves the per-tile statistics for `fused_linear_batch_norm_finish`, over tiles of the
    /// rows it writes to `stats_row_tile`.
    pub(crate) fn fused_linear_forward(
        args: *const FusedLinearArgs,
        stream: *mut c_void,
        stats_row_tile: *mut i64,
    ) -> c_int;
    /// BatchNorm train, after `fused_linear_forward`: merges the statistics into `args.stats`
    /// and normalises y in place, on `stream`; returns a `cudaError_t`.
    pub(crate) fn fused_linear_batch_norm_finish(
        args: *const FusedLinearArgs,
        stats_row_tile: i64,
        stream: *mut c_void,
    ) -> c_int;
    /// Floats of workspace that `fused_backward` needs.
    pub(crate) fn fused_backward_workspace_floats(args: *const FusedBackwardArgs) -> i64;
    /// The epilogue (and BatchNorm) backward on `stream`; returns a `cudaError_t`.
    pub(crate) fn fused_backward(args: *const FusedBackwardArgs, stream: *mut c_void) -> c_int;
    /// BatchNorm's running-statistics update of one buffer, in place on `stream`.
    pub(crate) fn batch_norm_update_running(
        running: *mut c_void,
        batch: *const f32,
        n: i64,
        dtype: i32,
        factor: f32,
        weight: f32,
        stream: *mut c_void,
    ) -> c_int;
    /// `out (count, n)` = the vectors of `rows` stacked, on `stream`; returns a `cudaError_t`.
    pub(crate) fn fused_param_table(
        rows: *const FusedParamRows,
        out: *mut c_void,
        n: i64,
        dtype: i32,
        stream: *mut c_void,
    ) -> c_int;
    /// `out (cols, rows) = in (rows, cols)ᵀ` on `stream`; returns a `cudaError_t`.
    pub(crate) fn fused_transpose(
        input: *const c_void,
        out: *mut c_void,
        rows: i64,
        cols: i64,
        dtype: i32,
        stream: *mut c_void,
    ) -> c_int;
    /// `dW (n, k) = dzᵀ·x` in TF32 from `dz_t (n, m)` and `x_t (k, m)` on the Hopper
    /// weight-gradient kernel, on `stream`: sets `*taken` to 1 and launches it when that kernel
    /// takes the problem, or to 0 having launched nothing; returns a `cudaError_t`.
    pub(crate) fn fused_weight_grad_tf32(
        dz_t: *const f32,
        x_t: *const f32,
        dw: *mut f32,
        m: i64,
        n: i64,
        k: i64,
        taken: *mut i32,
        stream: *mut c_void,
    ) -> c_int;
    /// `dW (n, k) = dzᵀ·x` in f16 or bf16 (`dtype`) from `dz (m, n)` and `x (m, k)` as they
    /// lie, on the same kernel, on `stream`: `*taken` as for [`fused_weight_grad_tf32`];
    /// returns a `cudaError_t`.
    pub(crate) fn fused_weight_grad_16bit(
        dz: *const c_void,
        x: *const c_void,
        dw: *mut c_void,
        m: i64,
        n: i64,
        k: i64,
        dtype: i32,
        taken: *mut i32,
        stream: *mut c_void,
    ) -> c_int;
    /// `dx (m, k) = dz·W` in exact f32 (`tf32 == 0`) or TF32, from `w (n, k)` as it lies, with
    /// `dz_part` an `(m, n)` scratch, on the Hopper small-batch input-gradient kernel, on
    /// `stream`: sets `*taken` to 1 and launches it when that kernel takes the problem, or to 0
    /// having launched nothing; returns a `cudaError_t`.
    pub(crate) fn fused_input_grad_f32(
        dz: *const f32,
        w: *const f32,
        dx: *mut f32,
        dz_part: *mut f32,
        m: i64,
        n: i64,
        k: i64,
        tf32: i32,
        taken: *mut i32,
        stream: *mut c_void,
    ) -> c_int;
    /// `out (rows, 3m)` = each row of `input (rows, m)` as three TF32 parts side by side, the
    /// remainder in part `small_at`, on `stream`; returns a `cudaError_t`.
    pub(crate) fn fused_split_rows_tf32(
        input: *const f32,
        out: *mut f32,
        rows: i64,
        m: i64,
        small_at: i32,
        stream: *mut c_void,
    ) -> c_int;
    /// The CUDA runtime's description of an error code.
    pub(crate) fn cudaGetErrorString(error: c_int) -> *const c_char;
}
