// The Hopper (sm_90a) f32 input gradient dx (m, k) = dz (m, n) · W (n, k), in exact f32
// (fp32-accurate by the 3xTF32 split) or in TF32, reading W as it is stored.
//
// Why its own kernel: TF32 wgmma reads a shared-memory operand only along the contraction, which
// for dx runs down W's columns, across its rows. A GEMM on shared-memory operands therefore
// needs a transposed copy of W (SwishScale's 32768×32768 weight: 2.4 ms of copying for a 3.4 ms
// exact product), and cuBLAS's TF32 GEMM reads W at well under the copy rate. wgmma also takes
// its A operand from registers, and registers can be loaded from shared memory in any order. So
// this kernel computes dxᵀ = Wᵀ·dzᵀ: a CTA owns 128 columns of dx (the M side of wgmma, 64 per
// consumer warpgroup), streams W's rows for them and dz's columns through a TMA pipeline, and
// each consumer loads its W values into the A fragment with plain shared-memory loads, splitting
// them into TF32 parts on the way. dz, whose rows do run along the contraction, is wgmma's B
// operand, as it lies. The batch is wgmma's N: a CTA covers 128 rows of it, and the CTAs of one
// column tile are launched next to each other, so that they read its W rows from L2 together and
// W comes from device memory about once. Each consumer loads the next stage's A fragment while
// the tensor cores work on this stage's.
// On an H200, SwishScale's input gradient takes 2.0 ms here in exact f32 (the transposed copy
// and the 3xTF32 GEMM take 2.4 + 3.4 ms, cuBLAS fp32 5.2 ms) and 1.1 ms in TF32 (cuBLAS TF32
// 1.3 ms); the 1024-row input gradient of the 1024x8192->8192 problems 1.0 ms in exact f32 (the
// copy and the GEMM 0.16 + 1.77 ms), but 0.45 ms in TF32, where cuBLAS takes 0.35 ms, so the
// crate runs TF32 here only for batches of at most 128 rows: scripts/sm90_tile_sweep.cu's
// input-grad part.
//
// Exact f32 is the 3xTF32 split of split_tf32_sm90.cuh: small_w·big_dz + big_w·small_dz +
// big_w·big_dz, big being the value truncated to TF32 (as tensor cores read an f32) and small the
// TF32 remainder. dz's remainders come from a pass before (dz is small: 16 MB for SwishScale);
// its big part is dz itself, moved unrounded. Each stage's products accumulate into a fresh
// register tile, remainder products first, which is then added to the running sum in IEEE f32:
// the tensor cores' accumulation truncates, and over a long contraction that costs more accuracy
// than the split gains. TF32 rounds both operands to the nearest TF32, as cuBLAS does (dz in the
// pass before, W as it is loaded), rather than let the tensor cores truncate them: truncation
// errs in one direction, and over a long contraction that triples the error.
//
// W's shared-memory tile is MN-major with a 128-byte swizzle: a 128-byte line holds 32
// consecutive columns of one W row, its 16-byte chunks permuted by the row. The A fragment gives
// each thread rows (dx columns) g and g+8 of its warp's 16 at contraction steps t and t+4
// (g = lane/4, t = lane%4); read as such, the four t of a load fall on two chunk pairs that the
// swizzle maps onto the same banks. So the warp's 16 logical rows map to physical columns whose
// chunks the swizzle keeps apart: rows g < 4 and g ≥ 4 sit four chunks apart, and every load of
// the warp then covers the 32 banks once. The output is written through the same map.
//
// Taken: n and k multiples of 4 (TMA's 16-byte row strides); 16-byte aligned pointers; at least
// half as many (128-column, 128-row) tiles of dx as the device has SMs (one tile per CTA; a
// smaller dx leaves SMs idle that the general path would use). The contraction's tail and the
// batch rows past m are zero-filled by TMA; dx's columns past k and rows past m are not stored.
#include "common.cuh"
#include "fused_linear.h"
#include "linear_sm90.cuh"

#if defined(FUSED_SM90)

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

namespace fused {

namespace input_grad {

using namespace cute;

constexpr int kRows = 64;         // dx columns per consumer warpgroup: one wgmma row block
constexpr int kTile = 2 * kRows;  // dx columns per CTA
constexpr int kBatch = 128;       // the batch rows a CTA covers: wgmma's N
constexpr int kDepth = 32;        // contraction per stage: one 128-byte line of f32
constexpr int kSteps = kDepth / 8;  // wgmma k steps per stage
constexpr int kThreads = 384;     // a producer warpgroup and two consumer warpgroups

// Stages: the pipeline's depth; Exact: exact f32 (the 3xTF32 split) or TF32.
template <int Stages, bool Exact>
struct Config {
  static constexpr int stages = Stages;
  static constexpr bool exact = Exact;
  static constexpr int dz_parts = Exact ? 2 : 1;  // dz, and in exact f32 its remainders
  // W's tile, (dx columns, contraction, stage): 128-byte lines of 32 columns, one per W row,
  // eight rows to a swizzle atom, the atoms running down the contraction first.
  using LayoutW = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<float>{},
                                         Shape<Int<kTile>, Int<kDepth>, Int<Stages>>{}, Step<_2, _1, _3>{}));
  using LayoutDz = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<tfloat32_t>{},
                                          Shape<Int<kBatch>, Int<kDepth>, Int<Stages>>{}));
  using TiledMma = decltype(make_tiled_mma(SM90_64x128x8_F32TF32TF32_RS_TN<>{}));
  static constexpr int stage_w = kTile * kDepth;  // f32 elements of a stage of W
  // W's tile, dz's and in exact f32 its remainders'.
  static constexpr uint32_t stage_bytes = uint32_t((kTile + dz_parts * kBatch) * kDepth * sizeof(float));
  // The consumers' loads step through the layout by these strides (see `a_offset`): whole
  // 1024-byte atoms, which the swizzle (of address bits 4-9) leaves as they are.
  static_assert(LayoutW{}.layout_b()(0, 8, 0) == 8 * 32 && LayoutW{}.layout_b()(0, 0, 1) == stage_w,
                "eight contraction steps must be one swizzle atom on, a stage one tile on");

  struct SharedStorage {
    alignas(1024) ArrayEngine<float, cosize_v<LayoutW>> w;
    alignas(1024) ArrayEngine<tfloat32_t, cosize_v<LayoutDz>> dz[dz_parts];
    uint64_t full[Stages];
    uint64_t empty[Stages];
  };
};

template <class TmaW, class TmaDz>
struct Params {
  TmaW tma_w;           // W as (k, n), MN-major
  TmaDz tma_dz;         // dz (m, n), or in TF32 dz rounded
  TmaDz tma_dz_small;   // in exact f32, dz's TF32 remainders
  float* dx;
  int m, n, k;
  int batch_tiles;  // CTAs per 128-column tile of dx: ceil(m / 128)
};

// dx (m, k) = dz (m, n) · W (n, k); `dz_part` (m, n) receives dz's remainders (exact f32) or dz
// rounded to TF32 (TF32).
struct Problem {
  const float* dz;
  const float* w;
  float* dx;
  float* dz_part;
  int64_t m, n, k;
};

using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
using EmptyBarrier = cutlass::arch::ClusterBarrier;

// The dx column (within the warpgroup's 64) of row g + 8h of warp `warp`'s 16 in the A
// fragment: warps 0-1 take the first 32 columns, 2-3 the next; within them chunk
// 2·(warp % 2) + h + 4·(g / 4), word g % 4 (see the file comment).
__device__ __forceinline__ int fragment_column(int warp, int g, int h) {
  return 32 * (warp / 2) + 4 * (2 * (warp % 2) + h + 4 * (g / 4)) + g % 4;
}

template <class C, class P>
__global__ void __launch_bounds__(kThreads, 1) input_grad_kernel(const __grid_constant__ P p) {
  using Storage = typename C::SharedStorage;
  extern __shared__ __align__(1024) unsigned char shared[];
  Storage& smem = *reinterpret_cast<Storage*>(shared);
  Tensor sW = make_tensor(make_smem_ptr(smem.w.begin()), typename C::LayoutW{});  // (128, 32, stages)

  const int warp_group = cutlass::canonical_warp_group_idx();
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::stages; ++s) {
      FullBarrier::init(&smem.full[s], 1);
      EmptyBarrier::init(&smem.empty[s], 2 * cutlass::NumThreadsPerWarpGroup);  // both consumers
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  const int steps = int(ceil_div(p.n, kDepth));
  const int batch_tile = int(blockIdx.x) % p.batch_tiles, column_tile = int(blockIdx.x) / p.batch_tiles;

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x != 0) return;
    Tensor gW = local_tile(p.tma_w.get_tma_tensor(make_shape(p.k, p.n)), Shape<Int<kTile>, Int<kDepth>>{},
                           make_coord(column_tile, _));  // (128, 32, steps)
    auto [tWg, tWs] = tma_partition(p.tma_w, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sW), group_modes<0, 2>(gW));
    auto dz_tiles = [&](const auto& tma, int part) {
      Tensor sDz = make_tensor(make_smem_ptr(smem.dz[part].begin()), typename C::LayoutDz{});
      Tensor gDz = local_tile(tma.get_tma_tensor(make_shape(p.m, p.n)), Shape<Int<kBatch>, Int<kDepth>>{},
                              make_coord(batch_tile, _));  // (128, 32, steps)
      return tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sDz), group_modes<0, 2>(gDz));
    };
    auto [tDg, tDs] = dz_tiles(p.tma_dz, 0);
    auto [tSg, tSs] = dz_tiles(p.tma_dz_small, C::dz_parts - 1);
    for (int step = 0, stage = 0, phase = 0; step < steps; ++step) {
      EmptyBarrier::wait(&smem.empty[stage], phase ^ 1);
      FullBarrier::arrive_and_expect_tx(&smem.full[stage], C::stage_bytes);
      copy(p.tma_w.with(smem.full[stage]), tWg(_, step), tWs(_, stage));
      copy(p.tma_dz.with(smem.full[stage]), tDg(_, step), tDs(_, stage));
      if constexpr (C::exact) copy(p.tma_dz_small.with(smem.full[stage]), tSg(_, step), tSs(_, stage));
      if (++stage == C::stages) {
        stage = 0;
        phase ^= 1;
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  const int consumer = warp_group - 1;  // takes dx columns [64·consumer, 64·consumer + 64) of the tile
  const int thread = threadIdx.x - warp_group * cutlass::NumThreadsPerWarpGroup;
  const int warp = thread / 32, lane = thread % 32, g = lane / 4, t = lane % 4;
  typename C::TiledMma mma;
  auto thread_mma = mma.get_thread_slice(thread);
  Tensor sDz = make_tensor(make_smem_ptr(smem.dz[0].begin()), typename C::LayoutDz{});
  Tensor sDzSmall = make_tensor(make_smem_ptr(smem.dz[C::dz_parts - 1].begin()), typename C::LayoutDz{});
  Tensor big_b = thread_mma.make_fragment_B(thread_mma.partition_B(sDz));  // (MMA, 1, steps, stages)
  Tensor small_b = thread_mma.make_fragment_B(thread_mma.partition_B(sDzSmall));
  // The A fragments of two stages, (value, 1, k step): value v is row g + 8·(v % 2), contraction
  // t + 4·(v / 2) of the step. One stage's are loaded while the tensor cores read the other's.
  // The remainders (small_*) and the per-stage tile `part` serve exact f32 only; TF32 adds its
  // products straight into `sum`.
  const auto shape_a = partition_shape_A(mma, Shape<Int<kRows>, Int<kDepth>>{});
  Tensor big_a0 = make_tensor<tfloat32_t>(shape_a);
  Tensor small_a0 = make_tensor<tfloat32_t>(shape_a);
  Tensor big_a1 = make_tensor<tfloat32_t>(shape_a);
  Tensor small_a1 = make_tensor<tfloat32_t>(shape_a);
  Tensor part = partition_fragment_C(mma, Shape<Int<kRows>, Int<kBatch>>{});
  Tensor sum = partition_fragment_C(mma, Shape<Int<kRows>, Int<kBatch>>{});
  clear(sum);

  // Where value v of k step 0 lies in stage 0 of W's tile; step s is 8 rows (one atom) on.
  int a_offset[4];
  CUTE_UNROLL
  for (int v = 0; v < 4; ++v) {
    const int column = kRows * consumer + fragment_column(warp, g, v % 2);
    a_offset[v] = int(&sW(column, t + 4 * (v / 2), 0) - &sW(0, 0, 0));
  }
  // Waits for stage `step` and loads its W values into big (and in exact f32, small).
  auto load_a = [&](int step, auto& big, auto& small) {
    const int stage = step % C::stages;
    FullBarrier::wait(&smem.full[stage], uint32_t(step / C::stages) & 1);
    const float* w_stage = smem.w.begin() + stage * C::stage_w;
    CUTE_UNROLL
    for (int s = 0; s < kSteps; ++s) {
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const float raw = w_stage[a_offset[v] + 8 * 32 * s];
        if constexpr (C::exact) {
          big(v, 0, s) = tfloat32_t::bitcast(__float_as_uint(tf32_truncate(raw)));
          small(v, 0, s) = tfloat32_t::bitcast(__float_as_uint(tf32_remainder(raw)));
        } else {
          big(v, 0, s) = tfloat32_t::bitcast(to_tf32(raw));
        }
      }
    }
  };
  // Stage `step`'s products from the A fragments big and small, while the next stage's W values
  // are loaded into big_next and small_next.
  auto multiply = [&](int step, auto& big, auto& small, auto& big_next, auto& small_next) {
    const int stage = step % C::stages;
    if constexpr (C::exact) {
      // Into a fresh tile, remainder products first, then added to the sum in IEEE f32.
      warpgroup_fence_operand(part);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int s = 0; s < kSteps; ++s) {
        gemm(mma, small(_, _, s), big_b(_, _, s, stage), part);
        mma.accumulate_ = GMMA::ScaleOut::One;
        gemm(mma, big(_, _, s), small_b(_, _, s, stage), part);
      }
      CUTE_UNROLL
      for (int s = 0; s < kSteps; ++s) gemm(mma, big(_, _, s), big_b(_, _, s, stage), part);
      warpgroup_commit_batch();
      if (step + 1 < steps) load_a(step + 1, big_next, small_next);
      warpgroup_wait<0>();
      // The products read the A registers until they finish: keep them live until here.
      warpgroup_fence_operand(part);
      warpgroup_fence_operand(big);
      warpgroup_fence_operand(small);
      EmptyBarrier::arrive(&smem.empty[stage]);
      CUTE_UNROLL
      for (int i = 0; i < size(sum); ++i) sum(i) += part(i);
    } else {
      warpgroup_fence_operand(sum);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int s = 0; s < kSteps; ++s) gemm(mma, big(_, _, s), big_b(_, _, s, stage), sum);
      warpgroup_commit_batch();
      // The previous stage's products are done: its A registers and its shared memory are free.
      warpgroup_wait<1>();
      warpgroup_fence_operand(sum);
      warpgroup_fence_operand(big_next);
      if (step > 0) EmptyBarrier::arrive(&smem.empty[(step - 1) % C::stages]);
      if (step + 1 < steps) load_a(step + 1, big_next, small_next);
    }
  };
  if (steps > 0) load_a(0, big_a0, small_a0);
  for (int step = 0; step < steps; step += 2) {
    multiply(step, big_a0, small_a0, big_a1, small_a1);
    if (step + 1 < steps) multiply(step + 1, big_a1, small_a1, big_a0, small_a0);
  }
  if constexpr (!C::exact) {
    warpgroup_wait<0>();
    warpgroup_fence_operand(sum);
  }

  // The accumulator's layout (wgmma's): value 4j + 2h + e of a thread is at row g + 8h of its
  // warp's 16, batch row 8j + 2t + e of the tile.
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int64_t column = int64_t(column_tile) * kTile + kRows * consumer + fragment_column(warp, g, h);
    if (column >= p.k) continue;
    CUTE_UNROLL
    for (int j = 0; j < kBatch / 8; ++j) {
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t row = int64_t(batch_tile) * kBatch + 8 * j + 2 * t + e;
        if (row < p.m) p.dx[row * p.k + column] = sum(4 * j + 2 * h + e);
      }
    }
  }
}

// The operand that the kernel reads beside (exact f32) or instead of (TF32) dz: part[i] = the TF32
// remainder of dz[i], or dz[i] rounded to TF32; four at a time (count is a multiple of 4, both
// pointers 16-byte aligned).
template <bool Exact>
__global__ void dz_part_kernel(const float4* dz, float4* part, int64_t count4) {
  const auto convert = [](float x) { return Exact ? tf32_remainder(x) : __uint_as_float(to_tf32(x)); };
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count4; i += stride) {
    const float4 v = dz[i];
    part[i] = make_float4(convert(v.x), convert(v.y), convert(v.z), convert(v.w));
  }
}

// Launches the pass over dz, builds the TMA descriptors and launches the kernel of configuration C.
template <class C>
cudaError_t launch(const Problem& a, int device, cudaStream_t stream) {
  const int m = int(a.m), n = int(a.n), k = int(a.k);
  constexpr int threads = 256;
  const int64_t count4 = a.m * a.n / 4;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(count4, threads), 4096));
  dz_part_kernel<C::exact><<<blocks, threads, 0, stream>>>(reinterpret_cast<const float4*>(a.dz),
                                                           reinterpret_cast<float4*>(a.dz_part), count4);
  FUSED_TRY(cudaGetLastError());
  auto w = make_tensor(make_gmem_ptr(a.w), make_shape(k, n), make_stride(_1{}, int64_t(k)));
  const auto stage_w = typename C::LayoutW{}(_, _, 0);
  auto tma_w = make_tma_copy(SM90_TMA_LOAD{}, w, stage_w, product_each(shape(stage_w)), _1{});
  // dz moves unrounded (as 32-bit words): its big part is what TF32 tensor cores read of it.
  const auto stage_dz = typename C::LayoutDz{}(_, _, 0);
  auto dz_tma = [&](const float* ptr) {
    auto dz = make_tensor(make_gmem_ptr(ptr), make_shape(m, n), make_stride(int64_t(n), _1{}));
    return make_tma_copy<uint32_t>(SM90_TMA_LOAD{}, dz, stage_dz, product_each(shape(stage_dz)), _1{});
  };
  auto tma_dz = dz_tma(C::exact ? a.dz : a.dz_part);
  using P = Params<decltype(tma_w), decltype(tma_dz)>;
  const int batch_tiles = int(ceil_div(m, kBatch));
  const P params{tma_w, tma_dz, dz_tma(a.dz_part), a.dx, m, n, k, batch_tiles};
  constexpr int smem_bytes = int(sizeof(typename C::SharedStorage));
  FUSED_TRY(allow_dynamic_smem<input_grad_kernel<C, P>>(smem_bytes, device));
  // The batch tiles of a column tile run side by side (see the file comment).
  const unsigned ctas = unsigned(ceil_div(k, kTile) * batch_tiles);
  input_grad_kernel<C, P><<<ctas, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// The configurations shipped: in exact f32 four 48 KB stages, in TF32 six 32 KB ones.
using ShippedExact = Config<4, true>;
using ShippedTf32 = Config<6, false>;

bool takes(const Problem& a, int sm_count) {
  if (a.m < 1 || a.n < 1 || a.n % 4 != 0 || a.k < 1 || a.k % 4 != 0 || a.m > INT32_MAX || a.n > INT32_MAX ||
      a.k > INT32_MAX) {
    return false;
  }
  const int64_t tiles = ceil_div(a.k, kTile) * ceil_div(a.m, kBatch);
  return 2 * tiles >= sm_count && tiles <= INT32_MAX && sm90::aligned16(a.dz) && sm90::aligned16(a.w) &&
         sm90::aligned16(a.dx) && sm90::aligned16(a.dz_part);
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
