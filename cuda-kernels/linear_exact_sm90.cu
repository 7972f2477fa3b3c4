// The Hopper (sm_90a) exact f32 forward: y = epilogue(x·Wᵀ + bias), fp32-accurate by the 3xTF32
// split, on the kernel of register_operand_sm90.cuh with the whole epilogue fused.
//
// Why not CUTLASS's GEMM, which runs the other precisions (linear_sm90.cu): its exact f32
// mainloop splits both operands in shared memory and reaches about 240 TFLOP/s of TF32 work on
// an H200, where the register-operand kernel, which splits W in registers and takes x's
// remainders from a pass before, reaches about 410. That kernel computes out = B·Wᵀ with B = x
// and out's columns W's rows (`ContractAlongRows`): out is y itself, and W is read as it lies.
// Its accumulator holds, per thread, two features (W rows) at 32 batch rows each, so the
// per-feature vectors are two loads a thread and the train-mode BatchNorm's column statistics are
// sums over a thread's own values and three lanes' (shuffles), without shared memory.
//
// The epilogue, per value (every step in f32, as the portable kernel and the CUTLASS path):
//   z = acc + bias_j                              stored to args.z when that is not null
//   u = act(z) · s_j + (residual ? z : 0)         s: the per-feature scale or the scalar one
//   y = u · f_j + d_j                             f, d: an eval-mode BatchNorm's fold (after the
//                                                 fold kernel that linear_sm90.cu launches first)
// and in train mode, y = u and, for every 128-row tile of the batch, the (mean, M2) of each
// column over the tile's rows in batch_norm.cu's partials layout (two exact passes, as the
// CUTLASS path's ColumnStatistics), which that file's kernels then merge before normalising y.
//
// Taken (exact_forward::takes): f32 with fp32 accuracy, k a multiple of 4, x, w and the
// workspace 16-byte aligned, and at least half as many 128x128 tiles of y as the device has SMs.
// y and z are stored by plain 4-byte stores: each warp store covers four whole 32-byte sectors.
#include "common.cuh"
#include "epilogue.cuh"
#include "linear_sm90.cuh"
#include "register_operand_sm90.cuh"

#if defined(FUSED_SM90)

namespace fused {

namespace exact_forward {

using register_operand::kBatch;
static_assert(kRowTile == kBatch, "the statistics' row tile is the kernel's batch tile");

// Four stages of W's tile, x's and x's remainders (48 KB each), as the input gradient's.
using Shipped = register_operand::Config<4, true, register_operand::ContractAlongRows>;

// The epilogue above, for the pointwise epilogue P (epilogue.cuh's PointwiseEpilogue).
template <class P>
struct FusedEpilogue {
  P pointwise;
  const float* bias;       // null: no bias
  const float* scale_row;  // null: the scalar `scale`
  float scale;
  const float* bn_factor;  // eval BatchNorm's fold, or null
  const float* bn_shift;
  float* partials;  // train BatchNorm's partial statistics, or null
  float* y;
  float* z;  // null: z is not kept
  int64_t m, n;

  template <class Acc>
  __device__ void operator()(Acc& sum, const int64_t (&columns)[2], int64_t row0, int64_t tile_row) const {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t c = columns[h];
      const bool inside = c < n;
      const int64_t read = inside ? c : 0;  // the vectors' reads stay in bounds
      const float b = bias != nullptr ? bias[read] : 0.f;
      const float s = scale_row != nullptr ? scale_row[read] : scale;
      const float f = bn_factor != nullptr ? bn_factor[read] : 1.f;
      const float d = bn_shift != nullptr ? bn_shift[read] : 0.f;
      CUTE_UNROLL
      for (int j = 0; j < kBatch / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * j + 2 * h + e;
          const int64_t row = row0 + 8 * j + e;
          const float zv = sum(i) + b;
          const float u = pointwise.apply(zv, s);
          if (inside && row < m) {
            if (z != nullptr) z[row * n + c] = zv;
            y[row * n + c] = bn_factor != nullptr ? u * f + d : u;
          }
          sum(i) = u;
        }
      }
    }
    if (partials != nullptr) column_statistics(sum, columns, row0, tile_row);
  }

  // The (mean, M2) of columns[h] over the tile's rows inside the batch, from the u values in
  // sum: the thread's 32 rows, then the three other lanes of its quad (the other t), which hold
  // the tile's other rows of the same columns. Every lane of the warp takes part in the shuffles.
  template <class Acc>
  __device__ void column_statistics(const Acc& sum, const int64_t (&columns)[2], int64_t row0,
                                    int64_t tile_row) const {
    const float rows = float(min(int64_t(kBatch), m - tile_row));
    const int64_t tiles = ceil_div(m, kBatch), tile = tile_row / kBatch;
    const auto quad_sum = [](float v) {
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      return v + __shfl_xor_sync(0xffffffffu, v, 2);
    };
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      float total = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < kBatch / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) total += row0 + 8 * j + e < m ? sum(4 * j + 2 * h + e) : 0.f;
      }
      const float mean = quad_sum(total) / rows;
      float m2 = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < kBatch / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float d = sum(4 * j + 2 * h + e) - mean;
          m2 += row0 + 8 * j + e < m ? d * d : 0.f;
        }
      }
      m2 = quad_sum(m2);
      const int64_t c = columns[h];
      if (row0 == tile_row && c < n) {  // the quad's first lane (t = 0)
        partials[tile * n + c] = mean;
        partials[(tiles + tile) * n + c] = m2;
      }
    }
  }
};

// Floats of the workspace before x's remainders: the BatchNorm's.
int64_t batch_norm_floats(const FusedLinearArgs& a) { return sm90::batch_norm_workspace_floats(a, kRowTile); }

float* x_remainders(const FusedLinearArgs& a) { return a.workspace + batch_norm_floats(a); }

register_operand::Operands operands(const FusedLinearArgs& a, float* x_part) {
  return {static_cast<const float*>(a.w), static_cast<const float*>(a.x), x_part, a.m, a.n, a.k};
}

bool takes_shape(const FusedLinearArgs& a, int sm_count) {
  return a.dtype == FUSED_F32 && a.tf32 == 0 &&
         register_operand::takes<register_operand::ContractAlongRows>(operands(a, nullptr), sm_count);
}

bool takes(const FusedLinearArgs& a, int sm_count) {
  return takes_shape(a, sm_count) && a.workspace != nullptr && sm90::aligned16(a.x) && sm90::aligned16(a.w) &&
         sm90::aligned16(x_remainders(a));
}

int64_t workspace_floats(const FusedLinearArgs& a) { return batch_norm_floats(a) + a.m * a.k; }

cudaError_t launch(const FusedLinearArgs& a, int device, cudaStream_t stream) {
  const bool eval = a.batch_norm == FUSED_BN_EVAL, train = a.batch_norm == FUSED_BN_TRAIN;
  return dispatch_epilogue(a.activation, a.residual != 0, [&](auto pointwise) {
    const FusedEpilogue<decltype(pointwise)> epilogue{
        pointwise,
        a.params.count > 0 ? static_cast<const float*>(a.params.row[0]) : nullptr,
        a.has_scale ? static_cast<const float*>(a.params.row[1]) : nullptr,
        a.scale,
        eval ? a.workspace : nullptr,
        eval ? a.workspace + a.n : nullptr,
        train ? a.workspace : nullptr,
        static_cast<float*>(a.y),
        static_cast<float*>(a.z),
        a.m,
        a.n};
    return register_operand::launch<Shipped>(operands(a, x_remainders(a)), epilogue, device, stream);
  });
}

}  // namespace exact_forward

}  // namespace fused

#endif  // FUSED_SM90
