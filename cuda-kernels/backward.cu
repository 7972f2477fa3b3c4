// The backward of the fused epilogue (and of the BatchNorm after it): memory-bound kernels.
//
// Given g = dL/dy, the input gradient of the epilogue is elementwise, dz = g · dy/dz, but the
// parameter gradients are column sums over all rows (d_bias = Σ dz, d_scale = Σ g · act(z),
// d_gamma = Σ g · x̂, d_beta = Σ g). Column sums are done in two levels so that they are
// deterministic without atomics: blocks of 32 columns x 8 rows sweep a chunk of rows and leave
// one partial sum per (chunk, column) in a workspace, in a fixed order, and a small kernel
// adds the chunks of each column in order.
//
// The per-element gradients and every sum are carried in double. Under a training BatchNorm
// the gradients of the bias and of a per-feature scale are sums whose terms cancel almost
// exactly (the normalisation removes any shift and, up to eps, any scale of its input), so the
// rounding of f32 terms would dominate what is left; these kernels are memory-bound, and the
// doubles cost no time.
//
// The BatchNorm backward in training needs Σ g and Σ g · x̂ before it can form any du, so it
// runs one extra sweep (the same sums, which are also d_beta and d_gamma) first:
//   du = γ · invstd / m · (m · g − Σg − x̂ · Σ g·x̂)      (train)
//   du = g · γ · invstd                                   (eval, running statistics)
// and then the epilogue backward from du.
#include "common.cuh"
#include "epilogue.cuh"

namespace fused {

constexpr int BWD_COLS = 32, BWD_ROWS = 8, BWD_CHUNK = 128;

// Rows per chunk: BWD_CHUNK, or a multiple of it when the grid would grow too tall.
int64_t backward_chunk_rows(int64_t m) { return BWD_CHUNK * ceil_div(ceil_div(m, BWD_CHUNK), 65535); }

// Adds the per-thread values `v[s]` over the block's rows and writes one partial per column.
template <int NSUM>
__device__ __forceinline__ void write_column_partials(const double (&v)[NSUM], int nsum, double* partials,
                                                      int64_t n, int64_t c) {
  __shared__ double red[NSUM][BWD_ROWS][BWD_COLS];
#pragma unroll
  for (int s = 0; s < NSUM; ++s) red[s][threadIdx.y][threadIdx.x] = v[s];
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    for (int s = 0; s < nsum; ++s) {
      double total = 0.0;
#pragma unroll
      for (int r = 0; r < BWD_ROWS; ++r) total += red[s][r][threadIdx.x];
      partials[(int64_t(blockIdx.y) * nsum + s) * n + c] = total;
    }
  }
}

// Per-column constants of the backward.
struct ColumnBackward {
  float bias, scale;
  double mean, invstd, gamma;
};

template <class T>
__device__ __forceinline__ ColumnBackward load_column_backward(const FusedBackwardArgs& a, int64_t c) {
  const T* p = static_cast<const T*>(a.params);
  const int64_t n = a.n;
  ColumnBackward col{to_float(p[c]), a.has_scale ? to_float(p[n + c]) : a.scale, 0.0, 1.0, 1.0};
  if (a.batch_norm != FUSED_BN_NONE) {
    col.mean = a.stats[c];
    col.invstd = 1.0 / sqrt(double(a.stats[n + c]) + double(a.eps));
    col.gamma = to_float(p[(1 + a.has_scale) * n + c]);
  }
  return col;
}

// Sweep 1 of the BatchNorm backward: partial Σ g·x̂ and Σ g per column (rows d_gamma, d_beta).
template <class T>
__global__ void __launch_bounds__(BWD_COLS* BWD_ROWS)
    batch_norm_sums_kernel(const FusedBackwardArgs a, int64_t chunk_rows, double* partials) {
  const int64_t m = a.m, n = a.n;
  const int64_t c = int64_t(blockIdx.x) * BWD_COLS + threadIdx.x;
  const T* g = static_cast<const T*>(a.g);
  const T* z = static_cast<const T*>(a.z);
  double v[2] = {0.0, 0.0};
  if (c < n) {
    const ColumnBackward col = load_column_backward<T>(a, c);
    const int64_t r_end = min(m, int64_t(blockIdx.y + 1) * chunk_rows);
    dispatch_epilogue(a.activation, a.residual != 0, [&](auto epi) {
      for (int64_t r = int64_t(blockIdx.y) * chunk_rows + threadIdx.y; r < r_end; r += BWD_ROWS) {
        const double gv = to_float(g[r * n + c]);
        const double u = epi.apply(to_float(z[r * n + c]), col.scale);
        v[0] += gv * (u - col.mean) * col.invstd;
        v[1] += gv;
      }
    });
  }
  write_column_partials<2>(v, 2, partials, n, c);
}

// The epilogue backward, from g (no BatchNorm) or from the du of the BatchNorm: writes dz and
// partial Σ dz, Σ du·act(z) per column.
template <class T>
__global__ void __launch_bounds__(BWD_COLS* BWD_ROWS)
    epilogue_backward_kernel(const FusedBackwardArgs a, int64_t chunk_rows, double* partials,
                             const double* bn_sums) {
  const int64_t m = a.m, n = a.n;
  const int64_t c = int64_t(blockIdx.x) * BWD_COLS + threadIdx.x;
  const T* g = static_cast<const T*>(a.g);
  const T* z = static_cast<const T*>(a.z);
  T* dz = static_cast<T*>(a.dz);
  double v[2] = {0.0, 0.0};
  if (c < n) {
    const ColumnBackward col = load_column_backward<T>(a, c);
    // du = du_g · g + du_x · x̂ + du_0 covers every case.
    double du_g = 1.0, du_x = 0.0, du_0 = 0.0;
    if (a.batch_norm == FUSED_BN_TRAIN) {
      const double k = col.gamma * col.invstd;
      du_g = k;
      du_x = -k * bn_sums[c] / double(m);
      du_0 = -k * bn_sums[n + c] / double(m);
    } else if (a.batch_norm == FUSED_BN_EVAL) {
      du_g = col.gamma * col.invstd;
    }
    // Without z the epilogue is linear: dy/dz = s (+ 1 with the residual).
    const float constant_grad = col.scale + (a.residual ? 1.f : 0.f);
    const int64_t r_end = min(m, int64_t(blockIdx.y + 1) * chunk_rows);
    dispatch_epilogue(a.activation, a.residual != 0, [&](auto epi) {
      for (int64_t r = int64_t(blockIdx.y) * chunk_rows + threadIdx.y; r < r_end; r += BWD_ROWS) {
        const int64_t i = r * n + c;
        const double gv = to_float(g[i]);
        double d;
        if (z != nullptr) {
          const float zv = to_float(z[i]);
          const double xhat = (double(epi.apply(zv, col.scale)) - col.mean) * col.invstd;
          const double du = du_g * gv + du_x * xhat + du_0;
          d = du * double(epi.grad(zv, col.scale));
          if (a.has_scale) v[1] += du * double(epi.act(zv));
        } else {
          d = gv * double(constant_grad);
        }
        dz[i] = from_float<T>(float(d));
        v[0] += d;
      }
    });
  }
  write_column_partials<2>(v, 1 + a.has_scale, partials, n, c);
}

// Adds the chunks of each column in order: `out` gets `nsum` rows in T, `out_f64` (optional)
// the same rows in double.
template <class T>
__global__ void reduce_partials_kernel(const double* partials, int64_t chunks, int nsum, int64_t n, T* out,
                                       double* out_f64) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  for (int s = 0; s < nsum; ++s) {
    double total = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) total += partials[(ch * nsum + s) * n + c];
    out[s * n + c] = from_float<T>(float(total));
    if (out_f64 != nullptr) out_f64[s * n + c] = total;
  }
}

template <class T>
cudaError_t launch_backward(const FusedBackwardArgs& a, cudaStream_t stream) {
  const int64_t chunk_rows = backward_chunk_rows(a.m);
  const int64_t chunks = ceil_div(a.m, chunk_rows);
  // The workspace holds doubles: the partials, then [d_gamma; d_beta].
  double* partials = reinterpret_cast<double*>(a.workspace);
  double* bn_sums = partials + chunks * 2 * a.n;
  T* dparams = static_cast<T*>(a.dparams);
  const dim3 grid(unsigned(ceil_div(a.n, BWD_COLS)), unsigned(chunks));
  const dim3 block(BWD_COLS, BWD_ROWS);
  const unsigned reduce_blocks = unsigned(ceil_div(a.n, 256));
  const int64_t gamma_row = 1 + a.has_scale;
  if (a.batch_norm != FUSED_BN_NONE) {
    batch_norm_sums_kernel<T><<<grid, block, 0, stream>>>(a, chunk_rows, partials);
    FUSED_TRY(cudaGetLastError());
    reduce_partials_kernel<T><<<reduce_blocks, 256, 0, stream>>>(partials, chunks, 2, a.n,
                                                                 dparams + gamma_row * a.n, bn_sums);
    FUSED_TRY(cudaGetLastError());
  }
  epilogue_backward_kernel<T><<<grid, block, 0, stream>>>(a, chunk_rows, partials, bn_sums);
  FUSED_TRY(cudaGetLastError());
  reduce_partials_kernel<T><<<reduce_blocks, 256, 0, stream>>>(partials, chunks, 1 + a.has_scale, a.n, dparams,
                                                               nullptr);
  FUSED_TRY(cudaGetLastError());
  if (a.batch_norm == FUSED_BN_EVAL) {
    // The running statistics are buffers, not parameters: their gradient rows are zero.
    FUSED_TRY(cudaMemsetAsync(dparams + (gamma_row + 2) * a.n, 0, 2 * a.n * sizeof(T), stream));
  }
  return cudaSuccess;
}

}  // namespace fused

extern "C" int64_t fused_backward_workspace_floats(const FusedBackwardArgs* a) {
  const int64_t chunks = fused::ceil_div(a->m, fused::backward_chunk_rows(a->m));
  const int64_t doubles = chunks * 2 * a->n + 2 * a->n;
  return 2 * doubles;  // the workspace holds doubles; cudaMalloc's alignment suits them
}

extern "C" cudaError_t fused_backward(const FusedBackwardArgs* a, cudaStream_t stream) {
  using namespace fused;
  if (a->m < 1 || a->n < 1 || a->workspace == nullptr || ceil_div(a->n, BWD_COLS) > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const bool needs_z = a->activation != ACT_IDENTITY || a->has_scale || a->batch_norm != FUSED_BN_NONE;
  if (needs_z && a->z == nullptr) return cudaErrorInvalidValue;
  if (a->batch_norm != FUSED_BN_NONE && a->stats == nullptr) return cudaErrorInvalidValue;
  return with_dtype(a->dtype, [&](auto tag) { return launch_backward<decltype(tag)>(*a, stream); });
}
