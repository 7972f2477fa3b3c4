// Training-mode BatchNorm after the fused GEMM: merge the per-tile statistics, normalise y.
//
// The GEMM kernel left, for every (row tile, column), the mean and the sum of squared
// deviations (M2) of u over that tile. Merging them with Chan's parallel update is exact in
// the way the textbook Σu² − (Σu)²/n is not: no cancellation when |mean| ≫ std. One light
// kernel does both jobs: a block first merges the partials of its 64 columns (each block of a
// column strip repeats this small merge instead of paying a second launch), then rewrites its
// rows of y as (u − mean) / sqrt(var + eps) · gamma + beta. Threads run along the columns, so
// every row access is coalesced.
#include "common.cuh"
#include "epilogue.cuh"

namespace fused {

constexpr int FINALIZE_COLS = 64, FINALIZE_ROWS = 4;

template <class T>
__global__ void __launch_bounds__(FINALIZE_COLS* FINALIZE_ROWS)
    batch_norm_finalize_kernel(const FusedLinearArgs a, int64_t row_tile, int64_t rows_per_block) {
  __shared__ BatchNormFold fold[FINALIZE_COLS];
  const int64_t m = a.m, n = a.n;
  const int64_t c = int64_t(blockIdx.x) * FINALIZE_COLS + threadIdx.x;
  if (threadIdx.y == 0 && c < n) {
    const int64_t tiles = ceil_div(m, row_tile);
    const float* ws_mean = a.workspace;
    const float* ws_m2 = a.workspace + tiles * n;
    float count = 0.f, mean = 0.f, m2 = 0.f;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const float nb = float(min(row_tile, m - tile * row_tile));
      const float mb = ws_mean[tile * n + c];
      const float total = count + nb;
      const float delta = mb - mean;
      mean += delta * (nb / total);
      m2 += ws_m2[tile * n + c] + delta * delta * (count * nb / total);
      count = total;
    }
    const float var = m2 / float(m);
    if (blockIdx.y == 0) {
      a.stats[c] = mean;
      a.stats[n + c] = var;
    }
    const T* p = static_cast<const T*>(a.params);
    const int64_t gamma_row = 1 + a.has_scale;
    fold[threadIdx.x] =
        batch_norm_fold(mean, var, to_float(p[gamma_row * n + c]), to_float(p[(gamma_row + 1) * n + c]), a.eps);
  }
  __syncthreads();
  if (c >= n) return;
  const BatchNormFold f = fold[threadIdx.x];
  T* y = static_cast<T*>(a.y);
  const int64_t r_end = min(m, int64_t(blockIdx.y + 1) * rows_per_block);
  for (int64_t r = int64_t(blockIdx.y) * rows_per_block + threadIdx.y; r < r_end; r += FINALIZE_ROWS) {
    y[r * n + c] = from_float<T>(f.apply(to_float(y[r * n + c])));
  }
}

cudaError_t batch_norm_train_finalize(const FusedLinearArgs& a, int64_t row_tile, cudaStream_t stream) {
  // At most 32 row blocks per column strip, so the repeated merge stays a small fraction.
  const int64_t rows_per_block = max(int64_t(64), ceil_div(a.m, 32));
  const dim3 grid(unsigned(ceil_div(a.n, FINALIZE_COLS)), unsigned(ceil_div(a.m, rows_per_block)));
  const dim3 block(FINALIZE_COLS, FINALIZE_ROWS);
  return with_dtype(a.dtype, [&](auto tag) {
    batch_norm_finalize_kernel<decltype(tag)><<<grid, block, 0, stream>>>(a, row_tile, rows_per_block);
    return cudaGetLastError();
  });
}

// BatchNorm's running-statistics update, one thread per feature:
// running = (1 − factor)·running + factor·weight·batch, computed in f32 and rounded once to the
// buffer's type. It replaces the convert/scale/add/convert chain of a framework-level update
// with one launch per buffer.
template <class T>
__global__ void batch_norm_update_running_kernel(T* running, const float* batch, int64_t n, float factor,
                                                 float weight) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  running[c] = from_float<T>((1.f - factor) * to_float(running[c]) + factor * weight * batch[c]);
}

}  // namespace fused

extern "C" cudaError_t batch_norm_update_running(void* running, const float* batch, int64_t n, int32_t dtype,
                                                 float factor, float weight, cudaStream_t stream) {
  if (n <= 0 || running == nullptr || batch == nullptr) return cudaErrorInvalidValue;
  constexpr int threads = 256;
  const unsigned blocks = unsigned(fused::ceil_div(n, threads));
  return fused::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fused::batch_norm_update_running_kernel<T>
        <<<blocks, threads, 0, stream>>>(static_cast<T*>(running), batch, n, factor, weight);
    return cudaGetLastError();
  });
}
