// out (cols, rows) = in (rows, cols)ᵀ, for the backward's products.
//
// Why: tensor-core TF32 products read both operands along the contraction (K-major), and in the
// backward the contraction of the weight gradient is the batch, and that of the input gradient
// runs down the columns of w. A copy that reads rows and writes columns directly touches a
// different 32-byte sector for every element on one side; staging 32x32 tiles in shared memory
// makes both the read and the write whole rows of a warp. The tile is padded by one column so
// that the column-wise reads of the tile hit 32 different banks.
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

}  // namespace fused

extern "C" cudaError_t fused_transpose(const void* in, void* out, int64_t rows, int64_t cols, int32_t dtype,
                                       cudaStream_t stream) {
  using fused::TRANSPOSE_TILE;
  if (rows <= 0 || cols <= 0 || in == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const int64_t col_tiles = fused::ceil_div(cols, TRANSPOSE_TILE), row_tiles = fused::ceil_div(rows, TRANSPOSE_TILE);
  if (col_tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(col_tiles), unsigned(row_tiles < 65535 ? row_tiles : 65535));
  const dim3 block(TRANSPOSE_TILE, fused::TRANSPOSE_ROWS);
  return fused::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fused::transpose_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), rows, cols);
    return cudaGetLastError();
  });
}
