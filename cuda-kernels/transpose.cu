// out (cols, rows) = in (rows, cols)ᵀ, for the backward's products.
//
// Why: tensor-core TF32 products read both operands along the contraction (K-major), and in the
// backward the contraction of the weight gradient is the batch, and that of the input gradient
// runs down the columns of w. A copy that reads rows and writes columns directly touches a
// different 32-byte sector for every element on one side; staging tiles in shared memory makes
// both the read and the write whole rows of a warp. Two kernels, one job each:
//   - the wide kernel, for f32 with both extents multiples of 4 and 16-byte aligned buffers (the
//     backward's operands at any size worth timing): 64x64 tiles moved in 16-byte accesses on
//     both sides, every thread with all of its loads of a tile in flight at once. The copy of an
//     8192x8192 weight is 512 MB of traffic, and of SwishScale's 32768x32768 one 8.6 GB: on an
//     H200 they took 164 µs and 2.72 ms with the scalar kernel, 149 µs and 2.43 ms with this one;
//   - the scalar kernel, for any shape and alignment: 32x32 tiles, one element per access.
// The tiles are padded by one column so that the column-wise reads of a tile spread over the
// banks (at most two threads of a warp share one).
#include "common.cuh"

namespace fused {

constexpr int TRANSPOSE_TILE = 32, TRANSPOSE_ROWS = 8;  // a block: 32 x 8 threads

template <class T>
__global__ void __launch_bounds__(TRANSPOSE_TILE* TRANSPOSE_ROWS)
    transpose_kernel(const T* in, T* out, int64_t rows, int64_t cols) {
  __shared__ T tile[TRANSPOSE_TILE][TRANSPOSE_TILE + 1];
  const int64_t c0 = int64_t(blockIdx.x) * TRANSPOSE_TILE;
  const int64_t row_tiles = ceil_div(rows, TRANSPOSE_TILE);
  // Row tiles beyond the grid's 65535 limit are taken in a grid-stride loop.
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * TRANSPOSE_TILE;
    for (int i = threadIdx.y; i < TRANSPOSE_TILE; i += TRANSPOSE_ROWS) {
      const int64_t r = r0 + i, c = c0 + threadIdx.x;
      if (r < rows && c < cols) tile[i][threadIdx.x] = in[r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < TRANSPOSE_TILE; i += TRANSPOSE_ROWS) {
      const int64_t c = c0 + i, r = r0 + threadIdx.x;
      if (r < rows && c < cols) out[c * rows + r] = tile[threadIdx.x][i];
    }
    __syncthreads();  // the tile is refilled by the next row tile
  }
}

constexpr int WIDE_TILE = 64, WIDE_THREADS = 256;

__global__ void __launch_bounds__(WIDE_THREADS)
    transpose_wide_kernel(const float* in, float* out, int64_t rows, int64_t cols) {
  constexpr int V = 4;                        // floats per 16-byte access
  constexpr int LANES = WIDE_TILE / V;        // threads along a tile row
  constexpr int STEP = WIDE_THREADS / LANES;  // tile rows per pass
  constexpr int PASSES = WIDE_TILE / STEP;
  __shared__ float tile[WIDE_TILE][WIDE_TILE + 1];
  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  const int64_t c0 = int64_t(blockIdx.x) * WIDE_TILE;
  const int64_t row_tiles = ceil_div(rows, WIDE_TILE);
  // Row tiles beyond the grid's 65535 limit are taken in a grid-stride loop. Both extents are
  // multiples of V, so an access lies wholly inside the matrix or wholly outside.
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * WIDE_TILE;
    float4 v[PASSES] = {};
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int64_t r = r0 + row + p * STEP, c = c0 + lane * V;
      if (r < rows && c < cols) v[p] = *reinterpret_cast<const float4*>(in + r * cols + c);
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      float* t = &tile[row + p * STEP][lane * V];
      t[0] = v[p].x;
      t[1] = v[p].y;
      t[2] = v[p].z;
      t[3] = v[p].w;
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int tc = row + p * STEP;  // the tile's column: a row of out
      const int64_t c = c0 + tc, r = r0 + lane * V;
      if (c < cols && r < rows) {
        const float4 w = make_float4(tile[lane * V][tc], tile[lane * V + 1][tc], tile[lane * V + 2][tc],
                                     tile[lane * V + 3][tc]);
        *reinterpret_cast<float4*>(out + c * rows + r) = w;
      }
    }
    __syncthreads();  // the tile is refilled by the next row tile
  }
}

}  // namespace fused

namespace {

// The grid of a transpose in tiles of `tile`: the column tiles, and the row tiles up to the
// grid's 65535 limit (the kernels take the rest in a grid-stride loop).
dim3 tile_grid(int64_t rows, int64_t cols, int64_t tile) {
  const int64_t row_tiles = fused::ceil_div(rows, tile);
  return dim3(unsigned(fused::ceil_div(cols, tile)), unsigned(row_tiles < 65535 ? row_tiles : 65535));
}

}  // namespace

extern "C" cudaError_t fused_transpose(const void* in, void* out, int64_t rows, int64_t cols, int32_t dtype,
                                       cudaStream_t stream) {
  using fused::TRANSPOSE_TILE;
  if (rows <= 0 || cols <= 0 || in == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (fused::ceil_div(cols, TRANSPOSE_TILE) > INT32_MAX) return cudaErrorInvalidValue;
  // The wide kernel's 16-byte accesses run along the rows of both `in` and `out`.
  if (dtype == FUSED_F32 && fused::packs_fit<float, 4>(cols, {in}) && fused::packs_fit<float, 4>(rows, {out})) {
    fused::transpose_wide_kernel<<<tile_grid(rows, cols, fused::WIDE_TILE), fused::WIDE_THREADS, 0, stream>>>(
        static_cast<const float*>(in), static_cast<float*>(out), rows, cols);
    return cudaGetLastError();
  }
  const dim3 block(TRANSPOSE_TILE, fused::TRANSPOSE_ROWS);
  return fused::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fused::transpose_kernel<T><<<tile_grid(rows, cols, TRANSPOSE_TILE), block, 0, stream>>>(
        static_cast<const T*>(in), static_cast<T*>(out), rows, cols);
    return cudaGetLastError();
  });
}
