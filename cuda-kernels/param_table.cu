// The op's (rows, n) parameter table gathered from its per-feature vectors in one launch.
//
// Why: the table is built before the GEMM of every call, so whatever it costs delays the GEMM.
// Stacking the vectors with framework ops costs one allocation and one copy launch per vector;
// this kernel reads all of them at once (blockIdx.y picks the vector).
#include "common.cuh"

namespace fused {

constexpr int PARAM_TABLE_THREADS = 256;

template <class T>
__global__ void __launch_bounds__(PARAM_TABLE_THREADS) param_table_kernel(const FusedParamRows rows, T* out,
                                                                          int64_t n) {
  const int64_t c = int64_t(blockIdx.x) * PARAM_TABLE_THREADS + threadIdx.x;
  if (c >= n) return;
  out[int64_t(blockIdx.y) * n + c] = static_cast<const T*>(rows.row[blockIdx.y])[c];
}

}  // namespace fused

extern "C" cudaError_t fused_param_table(const FusedParamRows* rows, void* out, int64_t n, int32_t dtype,
                                         cudaStream_t stream) {
  using namespace fused;
  if (rows->count < 1 || rows->count > FUSED_MAX_PARAM_ROWS || n < 1 || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  for (int32_t r = 0; r < rows->count; ++r) {
    if (rows->row[r] == nullptr) return cudaErrorInvalidValue;
  }
  const dim3 grid(unsigned(ceil_div(n, PARAM_TABLE_THREADS)), unsigned(rows->count));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    param_table_kernel<T><<<grid, PARAM_TABLE_THREADS, 0, stream>>>(*rows, static_cast<T*>(out), n);
    return cudaGetLastError();
  });
}
