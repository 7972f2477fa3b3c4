// The operands of the exact f32 weight gradient of a small batch, split into TF32 parts laid
// side by side along the contraction, so that the whole 3xTF32 product is one TF32 GEMM.
//
// Why: with x = big + small (big: x truncated to TF32, as tensor cores read it; small: the TF32
// remainder), dz·x ≈ small_dz·big_x + big_dz·small_x + big_dz·big_x to 2^-22 relative, and
//   dW (n, k) = [small(dzᵀ) | big(dzᵀ) | big(dzᵀ)] · [big(xᵀ) | small(xᵀ) | big(xᵀ)]ᵀ,
// a TF32 GEMM contracting over 3m. For a batch of m ≤ 128 rows that GEMM is cuBLAS's
// (`linear_input_and_weight_grads`): on SwishScale's 32768×32768 gradient it took 2.83 ms on an
// H200, where the fused 3xTF32 GEMM, whose 128×128 tiles reload both operands and run three
// products per k step, took 5.45 ms. Every part is exactly a TF32 value, so a GEMM that rounds
// its inputs to TF32 leaves them as they are.
//
// The remainders come first along the contraction: they are summed while the accumulator is
// still small, so the tensor cores' truncating accumulation loses nothing that shows. With the
// big parts first, the error against float64 (relative to the largest value, 128×32768×32768)
// was 3.5e-6; remainders first, 5.8e-7, next to cuBLAS fp32's 4.9e-7.
#include <algorithm>

#include "common.cuh"
#include "fused_linear.h"

namespace fused {

// out (rows, 3m): row r of in (rows, m) three times over, with the TF32 remainders in part
// `small_at` (0, 1 or 2) and the truncated values in the other two. Consecutive threads take
// consecutive elements of a row, so that reads and writes are whole rows of a warp.
__global__ void split_rows_kernel(const float* in, float* out, int64_t rows, int64_t m, int small_at) {
  const int64_t count = rows * m, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t r = i / m, l = i - r * m;
    const float x = in[i];
    const float big = tf32_truncate(x), small = tf32_remainder(x);
    float* parts = out + r * 3 * m + l;
    for (int part = 0; part < 3; ++part) parts[part * m] = part == small_at ? small : big;
  }
}

}  // namespace fused

cudaError_t fused_split_rows_tf32(const float* in, float* out, int64_t rows, int64_t m, int32_t small_at,
                                  cudaStream_t stream) {
  using namespace fused;
  if (rows < 1 || m < 1 || small_at < 0 || small_at > 2) return cudaErrorInvalidValue;
  constexpr int threads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(rows * m, threads), 4096));
  split_rows_kernel<<<blocks, threads, 0, stream>>>(in, out, rows, m, small_at);
  return cudaGetLastError();
}
