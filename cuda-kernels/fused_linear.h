// The C interface of the fused linear kernels, mirrored by `src/cuda/ffi.rs`.
//
// Every operand is contiguous and row-major; x is (m, k), w is (n, k) (the PyTorch Linear
// layout). The per-feature vectors are, in order, bias, [scale], [gamma, beta, [running_mean,
// running_var]]: the forward takes each by its own pointer (none for a product without bias,
// scale or BatchNorm: y = act(x·wᵀ) * scale), the backward as one (rows, n) table. All launches
// go on the caller's stream; every entry point returns the first CUDA error it meets
// (cudaSuccess otherwise) and never synchronises.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of x, w, params and of every output but the f32 statistics.
enum FusedDType { FUSED_F32 = 0, FUSED_F16 = 1, FUSED_BF16 = 2 };

// What follows the pointwise epilogue.
enum FusedBatchNorm { FUSED_BN_NONE = 0, FUSED_BN_EVAL = 1, FUSED_BN_TRAIN = 2 };

// The per-feature vectors, each n contiguous elements of the operands' type.
#define FUSED_MAX_PARAM_ROWS 6
typedef struct {
  const void* row[FUSED_MAX_PARAM_ROWS];
  int32_t count;  // rows in use, 0..FUSED_MAX_PARAM_ROWS
} FusedParamRows;

// y = epilogue(x·wᵀ + bias), optionally followed by a BatchNorm over the rows.
typedef struct {
  const void* x;
  const void* w;
  FusedParamRows params;
  void* y;           // (m, n)
  void* z;           // (m, n) pre-activation, or NULL to skip it
  float* workspace;  // fused_linear_workspace_floats() floats; NULL when that is 0
  float* stats;      // BN: (2, n) [mean, biased variance]; NULL otherwise (and in train mode until the finish)
  // BN train, optional: BatchNorm's running statistics, (n) each of type dtype, updated
  // in place from the batch statistics by the finish's kernel that merges them, as
  // batch_norm_update_running does (the variance unbiased); NULL leaves them alone.
  void* running_mean;
  void* running_var;
  int64_t* num_batches_tracked;  // BN train, optional: incremented by one along with them
  int64_t m, n, k;
  int32_t dtype;       // FusedDType
  int32_t tf32;        // f32 only: 1 = one TF32 product, 0 = 3xTF32 (fp32 accuracy)
  int32_t activation;  // Activation::code()
  int32_t has_scale;   // params row 1 is a per-feature scale
  int32_t residual;    // add z back
  int32_t batch_norm;  // FusedBatchNorm
  float scale;         // the scalar factor (1 when per-feature)
  float eps;           // BN epsilon
  float running_factor;  // BN train with running statistics: the batch's weight in the blend
} FusedLinearArgs;

// Floats of workspace that fused_linear_forward needs for these arguments: BatchNorm's, and on
// Hopper the exact f32 GEMM's. Reads only the plain fields, not the pointers.
int64_t fused_linear_workspace_floats(const FusedLinearArgs* args);

// The forward: one GEMM kernel with the whole epilogue (after a small fold kernel in BN eval). For
// BN train it leaves y unnormalised and per-tile statistics in the workspace, sets
// *stats_row_tile to the rows per tile, and fused_linear_batch_norm_finish completes it; stats
// may still be NULL then. stats_row_tile may be NULL in the other modes.
cudaError_t fused_linear_forward(const FusedLinearArgs* args, cudaStream_t stream, int64_t* stats_row_tile);

// BN train, after fused_linear_forward with the same args and stats set: merges the per-tile
// statistics into stats (and the running statistics, when given) and normalises y in place. The
// split lets the caller allocate stats, which only these kernels write, after the GEMM's launch.
cudaError_t fused_linear_batch_norm_finish(const FusedLinearArgs* args, int64_t stats_row_tile, cudaStream_t stream);

// The backward of the epilogue (and BatchNorm): dz and the parameter gradients.
typedef struct {
  const void* g;       // (m, n) gradient of y
  const void* z;       // (m, n) pre-activation; NULL when the epilogue does not need it
  const void* params;  // (rows, n): the forward's vectors, stacked
  const float* stats;  // BN: (2, n) [mean, variance] used by the forward; NULL otherwise
  void* dz;            // (m, n)
  void* dparams;       // same rows as params; rows of running statistics are zeroed
  float* workspace;    // fused_backward_workspace_floats() floats (the kernels keep doubles in it)
  int64_t m, n;
  int32_t dtype;
  int32_t activation;
  int32_t has_scale;
  int32_t residual;
  int32_t batch_norm;  // FusedBatchNorm; eval carries running_mean/var rows in params
  float scale;
  float eps;
} FusedBackwardArgs;

// Floats of workspace that fused_backward needs for these arguments.
int64_t fused_backward_workspace_floats(const FusedBackwardArgs* args);

// dz = g * d epilogue/dz (through the BatchNorm when batch_norm != NONE) and dparams.
cudaError_t fused_backward(const FusedBackwardArgs* args, cudaStream_t stream);

// BatchNorm's running-statistics update over n features: running = (1 − factor)·running +
// factor·weight·batch, with running of type `dtype` (updated in place) and batch the f32
// statistic of fused_linear_forward (weight = n/(n − 1) makes the biased variance unbiased).
cudaError_t batch_norm_update_running(void* running, const float* batch, int64_t n, int32_t dtype, float factor,
                                      float weight, cudaStream_t stream);

// out (count, n) = the rows stacked, in one launch (count ≥ 1): the backward's table.
cudaError_t fused_param_table(const FusedParamRows* rows, void* out, int64_t n, int32_t dtype, cudaStream_t stream);

// out (cols, rows) = in (rows, cols)ᵀ, both contiguous, elements of type `dtype`.
cudaError_t fused_transpose(const void* in, void* out, int64_t rows, int64_t cols, int32_t dtype,
                            cudaStream_t stream);

// dW (n, k) = dzᵀ·x in TF32, from the transposed copies dz_t (n, m) and x_t (k, m), on the Hopper
// kernel for a batch of at most 128 rows (weight_grad_sm90.cu). Sets *taken to 1 and launches it
// when that kernel takes the problem (an sm_90 device, and the shapes and alignments listed
// there); sets *taken to 0 and launches nothing otherwise, and the caller computes dW another way.
cudaError_t fused_weight_grad_tf32(const float* dz_t, const float* x_t, float* dw, int64_t m, int64_t n, int64_t k,
                                   int32_t* taken, cudaStream_t stream);

// dW (n, k) = dzᵀ·x in f16 or bf16 (`dtype`, a FusedDType other than FUSED_F32) with f32
// accumulation, from dz (m, n) and x (m, k) as they lie, on the same Hopper kernel. *taken as for
// fused_weight_grad_tf32; an f32 `dtype` is cudaErrorInvalidValue.
cudaError_t fused_weight_grad_16bit(const void* dz, const void* x, void* dw, int64_t m, int64_t n, int64_t k,
                                    int32_t dtype, int32_t* taken, cudaStream_t stream);

// dx (m, k) = dz (m, n) · W (n, k) in exact f32 (tf32 = 0) or TF32, from W as it lies, on the
// Hopper kernel for a batch of at most 128 rows (input_grad_sm90.cu); dz_part (m, n) is its
// scratch for dz's TF32 remainders or rounded values. Sets *taken to 1 and launches it when that
// kernel takes the problem (an sm_90 device, and the shapes and alignments listed there); sets
// *taken to 0 and launches nothing otherwise, and the caller computes dx another way.
cudaError_t fused_input_grad_f32(const float* dz, const float* w, float* dx, float* dz_part, int64_t m, int64_t n,
                                 int64_t k, int32_t tf32, int32_t* taken, cudaStream_t stream);

// out (rows, 3m) = each row of in (rows, m) as three TF32 parts side by side: the TF32 remainder
// in part small_at (0, 1 or 2), the value truncated to TF32 in the other two; the operands of the
// exact f32 weight gradient as one TF32 GEMM (weight_grad_split.cu).
cudaError_t fused_split_rows_tf32(const float* in, float* out, int64_t rows, int64_t m, int32_t small_at,
                                  cudaStream_t stream);

#ifdef __cplusplus
}
#endif
