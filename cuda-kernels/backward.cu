// The backward of the fused epilogue (and of the BatchNorm after it): memory-bound kernels.
//
// Given g = dL/dy, the input gradient of the epilogue is elementwise, dz = g · dy/dz, but the
// parameter gradients are column sums over all rows (d_bias = Σ dz, d_scale = Σ g · act(z),
// d_gamma = Σ g · x̂, d_beta = Σ g). Column sums are done in two levels so that they are
// deterministic without atomics: blocks of 32 column packs x a few rows sweep a chunk of rows
// and leave one partial sum per (chunk, column) in a workspace, in a fixed order, and a small
// kernel adds the chunks of each column in order. Where one chunk takes all the rows, its sums
// are the result and go straight to it.
//
// Every sum is carried in double, and under a BatchNorm so are the per-element gradients: in
// training the gradients of the bias and of a per-feature scale are sums whose terms cancel
// almost exactly (the normalisation removes any shift and, up to eps, any scale of its input),
// so the rounding of f32 terms would dominate what is left. Without a BatchNorm the
// per-element gradient is f32, as the dz it is stored to, and a thread adds a few rows' terms
// in f32 before its double sums: the doubles' registers and conversions cost occupancy and
// issue slots in these latency-bound kernels (docs/BENCHMARKS.md has the measurements).
//
// The BatchNorm backward in training needs Σ g and Σ g · x̂ before it can form any du, so it
// runs one extra sweep (the same sums, which are also d_beta and d_gamma) first:
//   du = γ · invstd / m · (m · g − Σg − x̂ · Σ g·x̂)      (train)
//   du = g · γ · invstd                                   (eval, running statistics)
// and then the epilogue backward from du.
#include <type_traits>

#include "common.cuh"
#include "epilogue.cuh"

namespace fused {

constexpr int BWD_COLS = 32, BWD_UNROLL = 4;

// A launch's shape: rows of threads per block, and about how many blocks in all.
struct BackwardShape {
  int rows, target_blocks;
};

// Without a BatchNorm: blocks of 8 rows, about 1024 of them (every SM busy with several). The
// BatchNorm kernels, whose per-element arithmetic is double, ran faster on an H200 with fewer,
// taller blocks that sweep more rows each: ScaleBatchNorm's whole backward took 42-45 µs in
// bf16 with 128 blocks of 32 rows (one per SM) against 55-58 µs with the shape above, and in f32
// (one column per thread, so twice the column blocks) 60-63 µs with 256 blocks of 16 rows
// against 65-68 µs. At its size that is one chunk of all the rows, whose sums then need no
// second kernel: 37-39 and 56-58 µs (docs/BENCHMARKS.md). The 16-bit blocks of 1024 threads
// leave 64 registers a thread, and ptxas spills a few bytes there (build.rs lists them).
__host__ __device__ constexpr BackwardShape backward_shape(bool batch_norm, bool four_byte_elements) {
  return !batch_norm ? BackwardShape{8, 1024} : four_byte_elements ? BackwardShape{16, 256} : BackwardShape{32, 128};
}

template <class T, bool BatchNorm>
constexpr int backward_rows = backward_shape(BatchNorm, sizeof(T) == 4).rows;

// A thread owns a 4-byte pack of neighbouring columns (one column where n or the pointers do
// not allow packs) and keeps several rows' loads in flight. Small packs keep the per-column
// constants few enough for a high occupancy, which these latency-bound kernels need more than
// wide accesses.
template <class T>
constexpr int backward_pack() {
  return pack_width<T, 4>();
}

// Rows per chunk: about the shape's target number of blocks in all, in whole block sweeps.
// Depends only on the problem, the element type and whether there is a BatchNorm, which the
// workspace size needs too; at most 65535 chunks.
int64_t backward_chunk_rows(int64_t m, int64_t n, int32_t dtype, bool batch_norm) {
  const bool four_byte_elements = dtype == FUSED_F32;
  const int64_t pack = four_byte_elements ? backward_pack<float>() : backward_pack<__half>();
  const BackwardShape shape = backward_shape(batch_norm, four_byte_elements);
  const int64_t col_blocks = ceil_div(n, BWD_COLS * pack);
  const int64_t chunks = min(int64_t(65535), max(int64_t(1), ceil_div(shape.target_blocks, col_blocks)));
  return shape.rows * ceil_div(ceil_div(m, chunks), shape.rows);
}

// Where a launch's column sums go: each chunk's to `partials` (chunks, nsum, n), for
// reduce_partials_kernel, or with a single chunk the sums themselves to `out` (nsum, n) in T and,
// when not null, to `out_f64` in double.
template <class T>
struct ColumnSums {
  double* partials;
  T* out;
  double* out_f64;
};

// Adds each thread's values v[s][i] over the block's ROWS rows and writes them as `sums` says,
// per (chunk, sum, column). `nsum` is the same for the whole launch.
template <int ROWS, int NSUM, int V, class T>
__device__ __forceinline__ void write_column_sums(const double (&v)[NSUM][V], int nsum, const ColumnSums<T>& sums,
                                                  int64_t n, int64_t c0, bool inside) {
  __shared__ double red[ROWS * V * BWD_COLS];
#pragma unroll
  for (int s = 0; s < NSUM; ++s) {
    if (s >= nsum) break;
#pragma unroll
    for (int i = 0; i < V; ++i) red[(threadIdx.y * V + i) * BWD_COLS + threadIdx.x] = v[s][i];
    __syncthreads();
    if (threadIdx.y == 0 && inside) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        double total = 0.0;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) total += red[(r * V + i) * BWD_COLS + threadIdx.x];
        if (gridDim.y == 1) {
          sums.out[s * n + c0 + i] = from_float<T>(float(total));
          if (sums.out_f64 != nullptr) sums.out_f64[s * n + c0 + i] = total;
        } else {
          sums.partials[(int64_t(blockIdx.y) * nsum + s) * n + c0 + i] = total;
        }
      }
    }
    __syncthreads();
  }
}

// Loads the packs at column c0 of g and of z (when not null) for rows r0, r0 + ROWS, ... below
// r_end, U of them at most, and returns how many. Every load is issued before any value is
// used: the rows are independent, and the compiler does not move loads above dz's stores.
template <class T, int V, int U, int ROWS>
__device__ __forceinline__ int load_rows(const T* __restrict__ g, const T* __restrict__ z, int64_t r0,
                                         int64_t r_end, int64_t n, int64_t c0, float (&gv)[U][V], float (&zv)[U][V]) {
  int rows = 0;
#pragma unroll
  for (int j = 0; j < U; ++j) {
    const int64_t r = r0 + j * ROWS;
    if (r < r_end) {
      load_pack<T, V>(g + r * n + c0, gv[j]);
      if (z != nullptr) load_pack<T, V>(z + r * n + c0, zv[j]);
      rows = j + 1;
    }
  }
  return rows;
}

// Per-column constants of the backward.
struct ColumnBackward {
  float scale;
  double mean, invstd, gamma;
};

template <class T>
__device__ __forceinline__ ColumnBackward load_column_backward(const FusedBackwardArgs& a, int64_t c) {
  const T* p = static_cast<const T*>(a.params);
  const int64_t n = a.n;
  ColumnBackward col{a.has_scale ? to_float(p[n + c]) : a.scale, 0.0, 1.0, 1.0};
  if (a.batch_norm != FUSED_BN_NONE) {
    col.mean = a.stats[c];
    col.invstd = 1.0 / sqrt(double(a.stats[n + c]) + double(a.eps));
    col.gamma = to_float(p[(1 + a.has_scale) * n + c]);
  }
  return col;
}

// u as the forward normalised it: in training, the statistics and the normalisation were of u
// rounded to T (the y that the GEMM stored), so x̂ = (u − mean)·invstd must start from the same
// rounded u. Otherwise each x̂ moves by up to ulp(u)·invstd, and the gradients that should
// cancel (that of a shift of u, Σ du) are swamped where a column's mean is far from its spread.
// In eval the forward normalised u unrounded, with the running statistics.
template <class T>
__device__ __forceinline__ float train_u(float u, bool train) {
  return train ? rounded_to<T>(u) : u;
}

// Sweep 1 of the BatchNorm backward: partial Σ g·x̂ and Σ g per column (rows d_gamma, d_beta).
template <class T, int V, class Epilogue>
__global__ void __launch_bounds__(BWD_COLS* backward_rows<T, true>)
    batch_norm_sums_kernel(const FusedBackwardArgs a, const Epilogue epi, int64_t chunk_rows,
                           const ColumnSums<T> sums) {
  constexpr int ROWS = backward_rows<T, true>;
  const int64_t m = a.m, n = a.n;
  const int64_t c0 = (int64_t(blockIdx.x) * BWD_COLS + threadIdx.x) * V;
  const bool inside = c0 < n;  // V divides n: a pack is wholly inside or outside
  const T* __restrict__ g = static_cast<const T*>(a.g);
  const T* __restrict__ z = static_cast<const T*>(a.z);
  const bool train = a.batch_norm == FUSED_BN_TRAIN;
  double v[2][V] = {};
  if (inside) {
    ColumnBackward col[V];
#pragma unroll
    for (int i = 0; i < V; ++i) col[i] = load_column_backward<T>(a, c0 + i);
    const int64_t r_end = min(m, int64_t(blockIdx.y + 1) * chunk_rows);
#pragma unroll BWD_UNROLL
    for (int64_t r = int64_t(blockIdx.y) * chunk_rows + threadIdx.y; r < r_end; r += ROWS) {
      float gv[V], zv[V];
      load_pack<T, V>(g + r * n + c0, gv);
      load_pack<T, V>(z + r * n + c0, zv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const double u = train_u<T>(epi.apply(zv[i], col[i].scale), train);
        v[0][i] += double(gv[i]) * (u - col[i].mean) * col[i].invstd;
        v[1][i] += gv[i];
      }
    }
  }
  write_column_sums<ROWS, 2, V>(v, 2, sums, n, c0, inside);
}

// du = k · g + du_u · u + du_1: the gradient at u of a BatchNorm's output gradient g, per column.
struct BatchNormGrad {
  double k = 1.0, du_u = 0.0, du_1 = 0.0;
};

// The epilogue backward, from g (no BatchNorm) or from the du of the BatchNorm: writes dz and
// partial Σ dz, Σ du·act(z) per column. Without a BatchNorm nothing cancels, so the per-element
// gradient is computed in f32 (as the stored dz is): that instantiation keeps fewer registers,
// loads BWD_UNROLL rows before using any, and adds each step's BWD_UNROLL terms in f32 before
// adding them to the double sums, which saves a conversion to double per element (a
// quarter-rate instruction on Hopper). It also compiles the rows twice, with and without the
// per-feature scale's sum, and picks one at run time. On an H200, SigmoidResidual's bf16
// backward took 28 µs that way, against 35 µs with a kernel instantiated per case and 34 µs
// with more registers allowed (both without the 12 bytes that ptxas spills here; build.rs
// lists the spill as measured), while the same split made the f32 BatchNorm backward 75
// instead of 66 µs. The BatchNorm instantiation, whose per-element arithmetic is double, keeps
// one loop, takes one row per step (it measured slower with BWD_UNROLL: its whole bf16
// backward 75 instead of 64 µs) and leaves the unrolling to the compiler.
template <class T, int V, bool BatchNorm, class Epilogue>
__global__ void __launch_bounds__(BWD_COLS* backward_rows<T, BatchNorm>)
    epilogue_backward_kernel(const FusedBackwardArgs a, const Epilogue epi, int64_t chunk_rows,
                             const ColumnSums<T> sums, const double* bn_sums) {
  constexpr int ROWS = backward_rows<T, BatchNorm>;
  using Real = std::conditional_t<BatchNorm, double, float>;  // the per-element arithmetic
  constexpr int U = BatchNorm ? 1 : BWD_UNROLL;                // rows loaded before any is used
  const int64_t m = a.m, n = a.n;
  const int64_t c0 = (int64_t(blockIdx.x) * BWD_COLS + threadIdx.x) * V;
  const bool inside = c0 < n;  // V divides n: a pack is wholly inside or outside
  const T* __restrict__ g = static_cast<const T*>(a.g);
  const T* __restrict__ z = static_cast<const T*>(a.z);
  T* __restrict__ dz = static_cast<T*>(a.dz);
  double v[2][V] = {};
  if (inside) {
    // Under a BatchNorm, du = k · g + du_x · x̂ + du_0 with k = γ · invstd and x̂ = (u − mean) ·
    // invstd (du_x and du_0 zero in eval): du = k · g + du_u · u + du_1 keeps three constants per
    // column instead of five (the register budget of three blocks per SM), and in double
    // u · du_u − mean · du_u loses nothing that matters. Without z the epilogue is linear and
    // dy/dz = s (+ 1 with the residual).
    ColumnBackward col[V];
    BatchNormGrad bn[V];
    float constant_grad[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      col[i] = load_column_backward<T>(a, c0 + i);
      if constexpr (BatchNorm) {
        const double k = col[i].gamma * col[i].invstd;
        const bool train = a.batch_norm == FUSED_BN_TRAIN;
        const double du_x = train ? -k * bn_sums[c0 + i] / double(m) : 0.0;
        const double du_0 = train ? -k * bn_sums[n + c0 + i] / double(m) : 0.0;
        const double du_u = du_x * col[i].invstd;
        bn[i] = BatchNormGrad{k, du_u, du_0 - du_u * col[i].mean};
      }
      constant_grad[i] = col[i].scale + (a.residual ? 1.f : 0.f);
    }
    const int64_t r_end = min(m, int64_t(blockIdx.y + 1) * chunk_rows);
    // The rows, with the per-feature scale's sum compiled in or out (HasScale); see above.
    const auto sweep = [&](auto has_scale) {
      constexpr bool HasScale = decltype(has_scale)::value;
#pragma unroll(BatchNorm ? BWD_UNROLL : 1)
      for (int64_t r0 = int64_t(blockIdx.y) * chunk_rows + threadIdx.y; r0 < r_end; r0 += ROWS * U) {
        float gv[U][V], zv[U][V];
        const int rows = load_rows<T, V, U, ROWS>(g, z, r0, r_end, n, c0, gv, zv);
        [[maybe_unused]] float step[2][V] = {};  // without a BatchNorm: this step's terms of the sums
#pragma unroll
        for (int j = 0; j < U; ++j) {
          if (j >= rows) break;
          float out[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            Real du = gv[j][i];
            if constexpr (BatchNorm) {
              const float u = train_u<T>(epi.apply(zv[j][i], col[i].scale), a.batch_norm == FUSED_BN_TRAIN);
              du = bn[i].k * du + bn[i].du_u * double(u) + bn[i].du_1;
            }
            const auto add = [&](int sum, Real term) {
              if constexpr (BatchNorm) {
                v[sum][i] += term;
              } else {
                step[sum][i] += term;
              }
            };
            Real d;
            if (!BatchNorm && z == nullptr) {  // a BatchNorm always comes with z
              d = du * Real(constant_grad[i]);
            } else {
              d = du * Real(epi.grad(zv[j][i], col[i].scale));
              if (HasScale && a.has_scale) add(1, du * Real(epi.act(zv[j][i])));
            }
            out[i] = float(d);
            add(0, d);
          }
          store_pack<T, V>(dz + (r0 + j * ROWS) * n + c0, out);
        }
        if constexpr (!BatchNorm) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            v[0][i] += double(step[0][i]);
            if (HasScale && a.has_scale) v[1][i] += double(step[1][i]);
          }
        }
      }
    };
    if (!BatchNorm && !a.has_scale) {
      sweep(std::false_type{});
    } else {
      sweep(std::true_type{});
    }
  }
  write_column_sums<ROWS, 2, V>(v, 1 + a.has_scale, sums, n, c0, inside);
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

template <class T, int V>
cudaError_t launch_backward(const FusedBackwardArgs& a, cudaStream_t stream) {
  const bool batch_norm = a.batch_norm != FUSED_BN_NONE;
  const int64_t chunk_rows = backward_chunk_rows(a.m, a.n, a.dtype, batch_norm);
  const int64_t chunks = ceil_div(a.m, chunk_rows);
  // The workspace holds doubles: the partials, then [d_gamma; d_beta].
  double* partials = reinterpret_cast<double*>(a.workspace);
  double* bn_sums = partials + chunks * 2 * a.n;
  T* dparams = static_cast<T*>(a.dparams);
  const dim3 grid(unsigned(ceil_div(a.n, BWD_COLS * V)), unsigned(chunks));
  const dim3 block(BWD_COLS, backward_shape(batch_norm, sizeof(T) == 4).rows);
  const unsigned reduce_blocks = unsigned(ceil_div(a.n, 256));
  const int64_t gamma_row = 1 + a.has_scale;
  const ColumnSums<T> param_sums{partials, dparams, nullptr};
  // One instantiation per activation: a kernel that could run any of them would hold the
  // registers of the largest (the erf GELU) whatever it runs, and these kernels need occupancy.
  FUSED_TRY(dispatch_epilogue(a.activation, a.residual != 0, [&](auto epi) {
    using Epilogue = decltype(epi);
    if (batch_norm) {
      const ColumnSums<T> bn_param_sums{partials, dparams + gamma_row * a.n, bn_sums};
      batch_norm_sums_kernel<T, V, Epilogue><<<grid, block, 0, stream>>>(a, epi, chunk_rows, bn_param_sums);
      FUSED_TRY(cudaGetLastError());
      if (chunks > 1) {
        reduce_partials_kernel<T><<<reduce_blocks, 256, 0, stream>>>(partials, chunks, 2, a.n,
                                                                     dparams + gamma_row * a.n, bn_sums);
        FUSED_TRY(cudaGetLastError());
      }
      epilogue_backward_kernel<T, V, true, Epilogue>
          <<<grid, block, 0, stream>>>(a, epi, chunk_rows, param_sums, bn_sums);
    } else {
      epilogue_backward_kernel<T, V, false, Epilogue>
          <<<grid, block, 0, stream>>>(a, epi, chunk_rows, param_sums, bn_sums);
    }
    return cudaGetLastError();
  }));
  if (chunks > 1) {
    reduce_partials_kernel<T><<<reduce_blocks, 256, 0, stream>>>(partials, chunks, 1 + a.has_scale, a.n, dparams,
                                                                 nullptr);
    FUSED_TRY(cudaGetLastError());
  }
  if (a.batch_norm == FUSED_BN_EVAL) {
    // The running statistics are buffers, not parameters: their gradient rows are zero.
    FUSED_TRY(cudaMemsetAsync(dparams + (gamma_row + 2) * a.n, 0, 2 * a.n * sizeof(T), stream));
  }
  return cudaSuccess;
}

}  // namespace fused

extern "C" int64_t fused_backward_workspace_floats(const FusedBackwardArgs* a) {
  const int64_t chunks = fused::ceil_div(a->m, fused::backward_chunk_rows(a->m, a->n, a->dtype, a->batch_norm != FUSED_BN_NONE));
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
  return with_dtype(a->dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = backward_pack<T>();
    return packs_fit<T, V>(a->n, {a->g, a->z, a->dz}) ? launch_backward<T, V>(*a, stream)
                                                       : launch_backward<T, 1>(*a, stream);
  });
}
