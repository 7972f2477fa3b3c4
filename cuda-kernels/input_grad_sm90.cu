// The Hopper (sm_90a) f32 input gradient dx (m, k) = dz (m, n) · W (n, k), in exact f32
// (fp32-accurate by the 3xTF32 split) or in TF32, reading W as it is stored.
//
// Why its own kernel: TF32 wgmma reads a shared-memory operand only along the contraction, which
// for dx runs down W's columns, across its rows. A GEMM on shared-memory operands therefore
// needs a transposed copy of W (SwishScale's 32768×32768 weight: 2.4 ms of copying for a 3.4 ms
// exact product), and cuBLAS's TF32 GEMM reads W at well under the copy rate. The kernel of
// register_operand_sm90.cuh loads W into wgmma's register operand, in any order, so dx is its
// out = B·Wᵀ with B = dz and out's columns W's columns (`ContractOverRows`).
// On an H200, SwishScale's input gradient takes 2.0 ms here in exact f32 (the transposed copy
// and the 3xTF32 GEMM take 2.4 + 3.4 ms, cuBLAS fp32 5.2 ms) and 1.1 ms in TF32 (cuBLAS TF32
// 1.3 ms); the 1024-row input gradient of the 1024x8192->8192 problems 1.0 ms in exact f32 (the
// copy and the GEMM 0.16 + 1.77 ms), but 0.45 ms in TF32, where cuBLAS takes 0.35 ms, so the
// crate runs TF32 here only for batches of at most 128 rows: scripts/sm90_tile_sweep.cu's
// input-grad part.
//
// Taken: n and k multiples of 4 (TMA's 16-byte row strides); 16-byte aligned pointers; at least
// half as many (128-column, 128-row) tiles of dx as the device has SMs.
#include "common.cuh"
#include "fused_linear.h"
#include "linear_sm90.cuh"
#include "register_operand_sm90.cuh"

#if defined(FUSED_SM90)

namespace fused {

namespace input_grad {

using register_operand::kBatch;

// Stages: the pipeline's depth; Exact: exact f32 (the 3xTF32 split) or TF32.
template <int Stages, bool Exact>
using Config = register_operand::Config<Stages, Exact, register_operand::ContractOverRows>;

// dx (m, k) = dz (m, n) · W (n, k); `dz_part` (m, n) receives dz's remainders (exact f32) or dz
// rounded to TF32 (TF32).
struct Problem {
  const float* dz;
  const float* w;
  float* dx;
  float* dz_part;
  int64_t m, n, k;
};

// The epilogue: dx's values stored as they are.
struct StoreDx {
  float* dx;
  int64_t m, k;

  template <class Acc>
  __device__ void operator()(const Acc& sum, const int64_t (&columns)[2], int64_t row0, int64_t) const {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      if (columns[h] >= k) continue;
      CUTE_UNROLL
      for (int j = 0; j < kBatch / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int64_t row = row0 + 8 * j + e;
          if (row < m) dx[row * k + columns[h]] = sum(4 * j + 2 * h + e);
        }
      }
    }
  }
};

register_operand::Operands operands(const Problem& a) { return {a.w, a.dz, a.dz_part, a.m, a.k, a.n}; }

// Launches configuration C on `a`.
template <class C>
cudaError_t launch(const Problem& a, int device, cudaStream_t stream) {
  return register_operand::launch<C>(operands(a), StoreDx{a.dx, a.m, a.k}, device, stream);
}

// The configurations shipped: in exact f32 four 48 KB stages, in TF32 six 32 KB ones.
using ShippedExact = Config<4, true>;
using ShippedTf32 = Config<6, false>;

bool takes(const Problem& a, int sm_count) {
  return register_operand::takes<register_operand::ContractOverRows>(operands(a), sm_count) &&
         sm90::aligned16(a.dz) && sm90::aligned16(a.w) && sm90::aligned16(a.dx) && sm90::aligned16(a.dz_part);
}

}  // namespace input_grad

}  // namespace fused

extern "C" cudaError_t fused_input_grad_f32(const float* dz, const float* w, float* dx, float* dz_part, int64_t m,
                                            int64_t n, int64_t k, int32_t tf32, int32_t* taken, cudaStream_t stream) {
  using namespace fused;
  const input_grad::Problem problem{dz, w, dx, dz_part, m, n, k};
  int device = 0, sm_count = 0;
  *taken = 0;
  if (!sm90::usable_device(&device, &sm_count) || !input_grad::takes(problem, sm_count)) return cudaSuccess;
  *taken = 1;
  return tf32 ? input_grad::launch<input_grad::ShippedTf32>(problem, device, stream)
              : input_grad::launch<input_grad::ShippedExact>(problem, device, stream);
}

#else  // !FUSED_SM90: built without the sm_90a target (or CUTLASS); the caller runs the general path.

extern "C" cudaError_t fused_input_grad_f32(const float*, const float*, float*, float*, int64_t, int64_t, int64_t,
                                            int32_t, int32_t* taken, cudaStream_t) {
  *taken = 0;
  return cudaSuccess;
}

#endif
