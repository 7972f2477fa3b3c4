// The Hopper (sm_90a) f32 GEMM that feeds W to the tensor cores through registers, in exact f32
// (fp32-accurate by the 3xTF32 split) or in TF32: the mainloop of the input gradient
// (input_grad_sm90.cu) and of the exact f32 forward (linear_exact_sm90.cu).
//
// The product: out (batch, columns) = B (batch, depth) · Wᵀ, where out's columns are W's rows or
// W's columns (`WLayout`), and B's rows run along the contraction. A CTA owns 128 of out's
// columns (the M side of wgmma, 64 per consumer warpgroup) and 128 of its batch rows (wgmma's N),
// streams the W tile and B's rows for them through a TMA pipeline, and each consumer loads its W
// values into wgmma's register operand (A) with plain shared-memory loads, splitting them into
// TF32 parts on the way; B is wgmma's shared-memory operand, as it lies. The CTAs of one column
// tile are launched next to each other, so that they read its W values from L2 together and W
// comes from device memory about once. Each consumer loads the next stage's A fragment while the
// tensor cores work on this stage's.
//
// Why registers:
//   - TF32 wgmma reads a shared-memory operand only along the contraction, which for the input
//     gradient runs down W's columns; registers can be loaded in any order, so W is read as it
//     lies instead of from a transposed copy;
//   - the split of W's values costs registers and a few instructions, where a split in shared
//     memory (split_tf32_sm90.cuh) writes every remainder back and reads it again: on an H200
//     this kernel's exact products run at about 410 TFLOP/s of TF32 work against about 240 for
//     the CUTLASS mainloop with the shared-memory split.
//
// Exact f32 is small_w·big_b + big_w·small_b + big_w·big_b, big being the value truncated to TF32
// (as tensor cores read an f32) and small the TF32 remainder. B's remainders come from a pass
// before (B is the small operand: 16 MB for SwishScale); its big part is B itself, moved
// unrounded. Each stage's products accumulate into a fresh register tile, remainder products
// first, which is then added to the running sum in IEEE f32: the tensor cores' accumulation
// truncates, and over a long contraction that costs more accuracy than the split gains. TF32
// rounds both operands to the nearest TF32, as cuBLAS does (B in the pass before, W as it is
// loaded), rather than let the tensor cores truncate them: truncation errs in one direction, and
// over a long contraction that triples the error.
//
// The contraction's tail and the batch rows past `batch` are zero-filled by TMA; the epilogue
// (the user's functor) is told which columns and rows it holds and stores only those inside.
#pragma once

#include "common.cuh"

#if defined(FUSED_SM90)

#include <algorithm>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

namespace fused::register_operand {

using namespace cute;

constexpr int kRows = 64;           // out columns per consumer warpgroup: one wgmma row block
constexpr int kTile = 2 * kRows;    // out columns per CTA
constexpr int kBatch = 128;         // the batch rows a CTA covers: wgmma's N
constexpr int kDepth = 32;          // contraction per stage: one 128-byte line of f32
constexpr int kSteps = kDepth / 8;  // wgmma k steps per stage
constexpr int kThreads = 384;       // a producer warpgroup and two consumer warpgroups

// W (n, k) contracted over its rows, out's columns being W's columns: the input gradient.
// The tile is MN-major with a 128-byte swizzle: a 128-byte line holds 32 consecutive columns of
// one W row, its 16-byte chunks permuted by the row. The A fragment gives each thread rows
// (out columns) g and g+8 of its warp's 16 at contraction steps t and t+4 (g = lane/4,
// t = lane%4); read as such, the four t of a load fall on two chunk pairs that the swizzle maps
// onto the same banks. So the warp's 16 logical rows map to physical columns whose chunks the
// swizzle keeps apart: rows g < 4 and g ≥ 4 sit four chunks apart, and every load of the warp
// then covers the 32 banks once.
struct ContractOverRows {
  template <int Stages>
  using Layout = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<float>{},
                                        Shape<Int<kTile>, Int<kDepth>, Int<Stages>>{}, Step<_2, _1, _3>{}));
  // W as (columns, depth) = (k, n).
  static auto gmem(const float* w, int columns, int depth) {
    return make_tensor(make_gmem_ptr(w), make_shape(columns, depth), make_stride(_1{}, int64_t(columns)));
  }
  // TMA moves 16-byte aligned rows of W: k floats each.
  static bool strides_fit(int64_t columns, int64_t) { return columns % 4 == 0; }
  // The tile column of row g + 8h of warp `warp`'s 16 in consumer `consumer`'s A fragment:
  // warps 0-1 take the first 32 columns, 2-3 the next; within them chunk
  // 2·(warp % 2) + h + 4·(g / 4), word g % 4.
  __device__ static int column(int consumer, int warp, int g, int h) {
    return kRows * consumer + 32 * (warp / 2) + 4 * (2 * (warp % 2) + h + 4 * (g / 4)) + g % 4;
  }
  // Floats from a value of k step 0 to the same value of k step s: eight W rows, one atom on.
  __device__ static int step_offset(int s, int) { return 8 * 32 * s; }
};

// W (n, k) contracted along its rows, out's columns being W's rows: the forward, y = x·Wᵀ.
// The tile is K-major with a 128-byte swizzle: a 128-byte line holds 32 consecutive contraction
// values of one W row, its 16-byte chunks c stored at c ^ (row % 8). The lanes of a load read
// rows g (or g + 8) at chunk 2s + v/2, word t: eight distinct chunks over g, so every load of the
// warp covers the 32 banks once, with rows in their natural order.
struct ContractAlongRows {
  template <int Stages>
  using Layout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{},
                                        Shape<Int<kTile>, Int<kDepth>, Int<Stages>>{}));
  // W as (columns, depth) = (n, k).
  static auto gmem(const float* w, int columns, int depth) {
    return make_tensor(make_gmem_ptr(w), make_shape(columns, depth), make_stride(int64_t(depth), _1{}));
  }
  static bool strides_fit(int64_t, int64_t) { return true; }  // k % 4 == 0 is asked of B anyway
  __device__ static int column(int consumer, int warp, int g, int h) { return kRows * consumer + 16 * warp + g + 8 * h; }
  // Floats from a value of k step 0 to the same value of k step s: its chunk moves from
  // (v/2) ^ g to (v/2 + 2s) ^ g, and since g's bit 0 acts on v/2 and its bits 1-2 on s, that is
  // 2·((s ^ g/2) − g/2) chunks of four floats.
  __device__ static int step_offset(int s, int g) { return 8 * ((s ^ (g >> 1)) - (g >> 1)); }
};

// Stages: the pipeline's depth; Exact: exact f32 (the 3xTF32 split) or TF32; W: how W lies.
template <int Stages, bool Exact, class W>
struct Config {
  static constexpr int stages = Stages;
  static constexpr bool exact = Exact;
  using WLayout = W;
  static constexpr int b_parts = Exact ? 2 : 1;  // B, and in exact f32 its remainders
  using LayoutW = typename W::template Layout<Stages>;  // (out columns, contraction, stage)
  using LayoutB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<tfloat32_t>{},
                                         Shape<Int<kBatch>, Int<kDepth>, Int<Stages>>{}));
  using TiledMma = decltype(make_tiled_mma(SM90_64x128x8_F32TF32TF32_RS_TN<>{}));
  static constexpr int stage_w = kTile * kDepth;  // f32 elements of a stage of W
  // W's tile, B's and in exact f32 its remainders'.
  static constexpr uint32_t stage_bytes = uint32_t((kTile + b_parts * kBatch) * kDepth * sizeof(float));
  static_assert(cosize_v<LayoutW> == stage_w * Stages, "W's stages must lie one after the other");

  struct SharedStorage {
    alignas(1024) ArrayEngine<float, cosize_v<LayoutW>> w;
    alignas(1024) ArrayEngine<tfloat32_t, cosize_v<LayoutB>> b[b_parts];
    uint64_t full[Stages];
    uint64_t empty[Stages];
  };
};

// The kernel's parameters. `Epilogue` is a functor that every consumer thread calls once, at the
// end, as epilogue(sum, columns, row, tile_row): sum is its accumulator fragment, whose value
// 4j + 2h + e is out's element (row + 8j + e, columns[h]); tile_row is the CTA's first batch row.
// Columns past `columns` and rows past `batch` are the epilogue's to skip; it may overwrite sum.
template <class TmaW, class TmaB, class Epilogue>
struct Params {
  TmaW tma_w;         // W as (columns, depth)
  TmaB tma_b;         // B (batch, depth), or in TF32 B rounded
  TmaB tma_b_small;   // in exact f32, B's TF32 remainders
  Epilogue epilogue;
  int batch, columns, depth;
  int batch_tiles;  // CTAs per 128-column tile of out: ceil(batch / 128)
};

// out = B · Wᵀ as above; `b_part` (batch, depth) receives B's remainders (exact f32) or B rounded
// to TF32 (TF32).
struct Operands {
  const float* w;
  const float* b;
  float* b_part;
  int64_t batch, columns, depth;
};

using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
using EmptyBarrier = cutlass::arch::ClusterBarrier;

template <class C, class P>
__global__ void __launch_bounds__(kThreads, 1) register_operand_kernel(const __grid_constant__ P p) {
  using Storage = typename C::SharedStorage;
  using W = typename C::WLayout;
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
  const int steps = int(ceil_div(p.depth, kDepth));
  const int batch_tile = int(blockIdx.x) % p.batch_tiles, column_tile = int(blockIdx.x) / p.batch_tiles;

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x != 0) return;
    Tensor gW = local_tile(p.tma_w.get_tma_tensor(make_shape(p.columns, p.depth)), Shape<Int<kTile>, Int<kDepth>>{},
                           make_coord(column_tile, _));  // (128, 32, steps)
    auto [tWg, tWs] = tma_partition(p.tma_w, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sW), group_modes<0, 2>(gW));
    auto b_tiles = [&](const auto& tma, int part) {
      Tensor sB = make_tensor(make_smem_ptr(smem.b[part].begin()), typename C::LayoutB{});
      Tensor gB = local_tile(tma.get_tma_tensor(make_shape(p.batch, p.depth)), Shape<Int<kBatch>, Int<kDepth>>{},
                             make_coord(batch_tile, _));  // (128, 32, steps)
      return tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    };
    auto [tBg, tBs] = b_tiles(p.tma_b, 0);
    auto [tSg, tSs] = b_tiles(p.tma_b_small, C::b_parts - 1);
    for (int step = 0, stage = 0, phase = 0; step < steps; ++step) {
      EmptyBarrier::wait(&smem.empty[stage], phase ^ 1);
      FullBarrier::arrive_and_expect_tx(&smem.full[stage], C::stage_bytes);
      copy(p.tma_w.with(smem.full[stage]), tWg(_, step), tWs(_, stage));
      copy(p.tma_b.with(smem.full[stage]), tBg(_, step), tBs(_, stage));
      if constexpr (C::exact) copy(p.tma_b_small.with(smem.full[stage]), tSg(_, step), tSs(_, stage));
      if (++stage == C::stages) {
        stage = 0;
        phase ^= 1;
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  const int consumer = warp_group - 1;  // takes out columns [64·consumer, 64·consumer + 64) of the tile
  const int thread = threadIdx.x - warp_group * cutlass::NumThreadsPerWarpGroup;
  const int warp = thread / 32, lane = thread % 32, g = lane / 4, t = lane % 4;
  typename C::TiledMma mma;
  auto thread_mma = mma.get_thread_slice(thread);
  Tensor sB = make_tensor(make_smem_ptr(smem.b[0].begin()), typename C::LayoutB{});
  Tensor sBSmall = make_tensor(make_smem_ptr(smem.b[C::b_parts - 1].begin()), typename C::LayoutB{});
  Tensor big_b = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, 1, steps, stages)
  Tensor small_b = thread_mma.make_fragment_B(thread_mma.partition_B(sBSmall));
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

  // Where value v of k step 0 lies in stage 0 of W's tile.
  int a_offset[4];
  CUTE_UNROLL
  for (int v = 0; v < 4; ++v) {
    a_offset[v] = int(&sW(W::column(consumer, warp, g, v % 2), t + 4 * (v / 2), 0) - &sW(0, 0, 0));
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
        const float raw = w_stage[a_offset[v] + W::step_offset(s, g)];
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
  // warp's 16, which is out's column columns[h], and at batch row 8j + 2t + e of the tile. Every
  // thread of both consumers makes the call (an epilogue may shuffle within a warp).
  const int64_t columns[2] = {int64_t(column_tile) * kTile + W::column(consumer, warp, g, 0),
                              int64_t(column_tile) * kTile + W::column(consumer, warp, g, 1)};
  p.epilogue(sum, columns, int64_t(batch_tile) * kBatch + 2 * t, int64_t(batch_tile) * kBatch);
}

// The operand that the kernel reads beside (exact f32) or instead of (TF32) B: part[i] = the TF32
// remainder of b[i], or b[i] rounded to TF32; four at a time (count is a multiple of 4, both
// pointers 16-byte aligned).
template <bool Exact>
__global__ void b_part_kernel(const float4* b, float4* part, int64_t count4) {
  const auto convert = [](float x) { return Exact ? tf32_remainder(x) : __uint_as_float(to_tf32(x)); };
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count4; i += stride) {
    const float4 v = b[i];
    part[i] = make_float4(convert(v.x), convert(v.y), convert(v.z), convert(v.w));
  }
}

// Whether configuration family W takes `o` on a device of `sm_count` SMs: B's rows and W's
// 16-byte aligned for TMA, and at least half as many (128-column, 128-row) tiles of out as the
// device has SMs (one tile per CTA; a smaller out leaves SMs idle that the general path would
// use).
template <class W>
bool takes(const Operands& o, int sm_count) {
  if (o.batch < 1 || o.columns < 1 || o.depth < 1 || o.depth % 4 != 0 || !W::strides_fit(o.columns, o.depth) ||
      o.batch > INT32_MAX || o.columns > INT32_MAX || o.depth > INT32_MAX) {
    return false;
  }
  const int64_t tiles = ceil_div(o.columns, kTile) * ceil_div(o.batch, kBatch);
  return 2 * tiles >= sm_count && tiles <= INT32_MAX;
}

// Launches the pass over B, builds the TMA descriptors and launches the kernel of configuration
// C with `epilogue`.
template <class C, class Epilogue>
cudaError_t launch(const Operands& o, const Epilogue& epilogue, int device, cudaStream_t stream) {
  const int batch = int(o.batch), columns = int(o.columns), depth = int(o.depth);
  constexpr int threads = 256;
  const int64_t count4 = o.batch * o.depth / 4;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(count4, threads), 4096));
  b_part_kernel<C::exact><<<blocks, threads, 0, stream>>>(reinterpret_cast<const float4*>(o.b),
                                                          reinterpret_cast<float4*>(o.b_part), count4);
  FUSED_TRY(cudaGetLastError());
  const auto stage_w = typename C::LayoutW{}(_, _, 0);
  auto tma_w = make_tma_copy(SM90_TMA_LOAD{}, C::WLayout::gmem(o.w, columns, depth), stage_w,
                             product_each(shape(stage_w)), _1{});
  // B moves unrounded (as 32-bit words): its big part is what TF32 tensor cores read of it.
  const auto stage_b = typename C::LayoutB{}(_, _, 0);
  auto b_tma = [&](const float* ptr) {
    auto b = make_tensor(make_gmem_ptr(ptr), make_shape(batch, depth), make_stride(int64_t(depth), _1{}));
    return make_tma_copy<uint32_t>(SM90_TMA_LOAD{}, b, stage_b, product_each(shape(stage_b)), _1{});
  };
  auto tma_b = b_tma(C::exact ? o.b : o.b_part);
  using P = Params<decltype(tma_w), decltype(tma_b), Epilogue>;
  const int batch_tiles = int(ceil_div(batch, kBatch));
  const P params{tma_w, tma_b, b_tma(o.b_part), epilogue, batch, columns, depth, batch_tiles};
  constexpr int smem_bytes = int(sizeof(typename C::SharedStorage));
  FUSED_TRY(allow_dynamic_smem<register_operand_kernel<C, P>>(smem_bytes, device));
  // The batch tiles of a column tile run side by side (see the file comment).
  const unsigned ctas = unsigned(ceil_div(columns, kTile) * batch_tiles);
  register_operand_kernel<C, P><<<ctas, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace fused::register_operand

#endif  // FUSED_SM90
