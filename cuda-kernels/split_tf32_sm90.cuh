// The Hopper mainloop of the fp32-accurate ("exact") f32 GEMM: three TF32 wgmma products per
// k step, on operands split in shared memory.
//
// Why: an f32 value x splits into big = tf32(x) and small = tf32(x − big), and
//   x·w ≈ small_x·big_w + big_x·small_w + big_x·big_w
// is accurate to about 2^-22 relative (the dropped small·small term is below f32 resolution).
// That is three TF32 products, which Hopper's tensor cores run about three times faster than
// fp32 FMA runs one. The portable kernel (linear_forward.cu) does the same with mma.sync; here
// the operands arrive by TMA as raw fp32 and the multiplies are wgmma, reading shared memory.
//
// The mainloop is CUTLASS's sm90 TMA warp-specialised cooperative one, with its producer side
// unchanged; what this file replaces is the consumer side (`mma`):
//   1. when a stage lands, the two consumer warpgroups split it together: small goes to one
//      of two buffers of the stage's layout (the split is elementwise, so the TMA swizzle needs
//      no attention), then a proxy fence makes those writes visible to wgmma. Two small
//      buffers suffice (one being read by the products in flight, one being written), which
//      leaves room for four stages of raw operands instead of three. Big is the raw
//      value itself: TF32 wgmma reads an f32 operand truncated to its top 19 bits, so big is
//      taken as that truncation and small as what it drops, which saves writing big back (a
//      third of the split's shared-memory traffic). The GPU tests' float64 comparisons would
//      fail by three orders of magnitude if the hardware rounded instead;
//   2. the three products of a stage accumulate into a fresh register tile, which is then
//      added to the running sum in IEEE f32. The tensor cores' own accumulation truncates;
//      over a long k that bias costs more than the split gains (the portable kernel does the
//      same, for the same reason). (Two such tiles, alternating so that the next stage's
//      products queue before this stage's are added, need more registers than the 168 that
//      ptxas allows here: the spills made it 14% slower on an H200);
//   3. the split of the next stage runs while this stage's products are in flight.
// The raw fp32 must reach shared memory unrounded, so the collective is built for
// cutlass::tfloat32_t elements, whose TMA copy moves the bits as they are (for `float`, CUTLASS
// has TMA round to TF32 on the way).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>

#include "common.cuh"

namespace fused::sm90 {

// Writes the TF32 remainders of `Count` fp32 values at `raw` (16-byte aligned) to `small`. Each
// of `Threads` threads takes every Threads-th float4.
template <int Count, int Threads>
__device__ __forceinline__ void split_stage(const float* raw, float* small, int thread) {
  static_assert(Count % (4 * Threads) == 0, "the stage must split evenly over the threads");
  const float4* r = reinterpret_cast<const float4*>(raw);
  float4* s = reinterpret_cast<float4*>(small);
#pragma unroll
  for (int i = thread; i < Count / 4; i += Threads) {
    const float4 v = r[i];
    s[i] = make_float4(tf32_remainder(v.x), tf32_remainder(v.y), tf32_remainder(v.z), tf32_remainder(v.w));
  }
}

// `Base`: CUTLASS's sm90 TMA warp-specialised cooperative collective for tfloat32_t operands
// (both K-major), as its CollectiveBuilder makes it. The stage count must leave room for the
// second (small) copy of every stage; see `split_tf32_stages`.
template <class Base>
struct SplitTf32Mainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::Params;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutAtomA;
  using typename Base::SmemLayoutAtomB;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  using typename Base::TiledMma;
  using Element = typename TiledMma::ValTypeA;
  static_assert(cute::is_same_v<Element, cutlass::tfloat32_t> &&
                    cute::is_same_v<typename TiledMma::ValTypeB, cutlass::tfloat32_t>,
                "the split mainloop multiplies TF32 operands");

  // Both consumer warpgroups take part in every split (they share the B tile).
  static constexpr int kConsumerThreads = cute::size(TiledMma{});
  static_assert(kConsumerThreads == 2 * cutlass::NumThreadsPerWarpGroup, "built for the cooperative schedule");
  // The named barrier of the split: the first user id (CUTLASS offsets it past its own).
  static constexpr uint32_t kSplitBarrier = 0;

  // Elements of one stage of each operand: a stage is the outermost mode of the smem layouts.
  static constexpr int kStageA = cute::size<0>(TileShape{}) * cute::size<2>(TileShape{});
  static constexpr int kStageB = cute::size<1>(TileShape{}) * cute::size<2>(TileShape{});
  static_assert(cute::cosize_v<SmemLayoutA> == kStageA * cute::size<2>(SmemLayoutA{}) &&
                    cute::cosize_v<SmemLayoutB> == kStageB * cute::size<2>(SmemLayoutB{}),
                "each stage must be one contiguous block of shared memory");

  // The small buffers: the stage layouts with two stages.
  using SmallLayoutA = decltype(cute::tile_to_shape(
      SmemLayoutAtomA{}, cute::make_shape(cute::size<0>(TileShape{}), cute::size<2>(TileShape{}), cute::_2{})));
  using SmallLayoutB = decltype(cute::tile_to_shape(
      SmemLayoutAtomB{}, cute::make_shape(cute::size<1>(TileShape{}), cute::size<2>(TileShape{}), cute::_2{})));
  static_assert(cute::is_same_v<decltype(SmallLayoutA{}(cute::_, cute::_, 0)), decltype(SmemLayoutA{}(cute::_, cute::_, 0))>,
                "a small buffer must have the layout of a stage");

  struct TensorStorage : Base::TensorStorage {
    cute::array_aligned<Element, cute::cosize_v<SmallLayoutA>> smem_A_small;
    cute::array_aligned<Element, cute::cosize_v<SmallLayoutB>> smem_B_small;
  };
  using PipelineStorage = typename Base::PipelineStorage;
  struct SharedStorage {
    TensorStorage tensors;
    PipelineStorage pipeline;
  };

  // Splits stage `stage` of both operands into small buffer `small`; every consumer thread
  // calls it.
  CUTLASS_DEVICE static void split(TensorStorage& smem, int stage, int small, int thread) {
    split_stage<kStageA, kConsumerThreads>(reinterpret_cast<const float*>(smem.smem_A.data()) + stage * kStageA,
                                           reinterpret_cast<float*>(smem.smem_A_small.data()) + small * kStageA,
                                           thread);
    split_stage<kStageB, kConsumerThreads>(reinterpret_cast<const float*>(smem.smem_B.data()) + stage * kStageB,
                                           reinterpret_cast<float*>(smem.smem_B_small.data()) + small * kStageB,
                                           thread);
    // The split's generic-proxy writes must be visible to wgmma's async-proxy reads.
    cutlass::arch::fence_view_async_shared();
  }

  // The consumer side: accum = Σ over k tiles of the three products, each tile's sum added in
  // IEEE f32. Leaves the last stage unreleased, as the base's mma does (its mma_tail releases it).
  //
  // Step t (for t ≥ 1): wait for stage t and split it into small buffer t % 2 while tile t − 1
  // multiplies; wait for tile t − 1, add its part to the sum and release its stage; once both
  // warpgroups are there, queue tile t's products. The barrier also means that no warpgroup
  // writes small buffer t % 2 before both have finished tile t − 2, its previous reader.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& smem, Params const&) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
    Tensor sA_small = make_tensor(make_smem_ptr(smem.smem_A_small.data()), SmallLayoutA{});  // (BLK_M,BLK_K,2)
    Tensor sB_small = make_tensor(make_smem_ptr(smem.smem_B_small.data()), SmallLayoutB{});  // (BLK_N,BLK_K,2)

    TiledMma tiled_mma;
    const int warp_group = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    auto thread_mma = tiled_mma.get_slice(warp_group * cutlass::NumThreadsPerWarpGroup);
    // wgmma descriptors, (MMA, MMA_M or MMA_N, MMA_K, PIPE)
    Tensor big_a = thread_mma.make_fragment_A(thread_mma.partition_A(sA));
    Tensor big_b = thread_mma.make_fragment_B(thread_mma.partition_B(sB));
    Tensor small_a = thread_mma.make_fragment_A(thread_mma.partition_A(sA_small));
    Tensor small_b = thread_mma.make_fragment_B(thread_mma.partition_B(sB_small));

    PipelineState smem_pipe_release = smem_pipe_read;
    Tensor part = make_fragment_like(accum);
    clear(accum);

    // Queues the three products of stage `stage`, split into small buffer `small`, into `part`,
    // overwriting it.
    auto issue = [&](int stage, int small) {
      warpgroup_fence_operand(part);
      warpgroup_arrive();
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(big_a); ++k_block) {
        cute::gemm(tiled_mma, small_a(_, _, k_block, small), big_b(_, _, k_block, stage), part);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        cute::gemm(tiled_mma, big_a(_, _, k_block, stage), small_b(_, _, k_block, small), part);
        cute::gemm(tiled_mma, big_a(_, _, k_block, stage), big_b(_, _, k_block, stage), part);
      }
      warpgroup_commit_batch();
      warpgroup_fence_operand(part);
    };
    // Waits for the products in flight and adds them to the sum.
    auto add = [&] {
      warpgroup_wait<0>();
      warpgroup_fence_operand(part);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accum); ++i) accum(i) += part(i);
    };
    // Waits for the stage that `smem_pipe_read` names to land and splits it into `small`.
    auto land_and_split = [&](int small) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      split(smem, smem_pipe_read.index(), small, thread_idx);
    };
    auto all_consumers = [] { cutlass::arch::NamedBarrier::sync(kConsumerThreads, kSplitBarrier); };

    // The previous work tile's last products may still be reading small buffer 0 in the other
    // warpgroup. After a whole tile the epilogue's barriers order them before this split, but
    // stream-K moves on from a tile's partial sum without an epilogue.
    all_consumers();
    int small = 0;
    land_and_split(small);
    all_consumers();
    issue(smem_pipe_read.index(), small);
    for (; k_tile_count > 1; --k_tile_count) {
      ++smem_pipe_read;
      small ^= 1;
      land_and_split(small);
      add();
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
      all_consumers();
      issue(smem_pipe_read.index(), small);
    }
    add();
    warpgroup_fence_operand(accum);
  }
};

// Pipeline stages of raw operands that fit next to the two small buffers, the epilogue's
// `epilogue_bytes` of shared memory and the pipeline's barriers.
template <class TileShape>
constexpr int split_tf32_stages(int epilogue_bytes) {
  constexpr int stage_bytes = 4 * (cute::size<0>(TileShape{}) + cute::size<1>(TileShape{})) *
                              cute::size<2>(TileShape{});
  constexpr int barrier_bytes = 16;  // a full and an empty barrier per stage
  constexpr int capacity = 232448;   // sm_90's shared memory per block
  constexpr int kernel_bytes = 256;  // the kernel's own: scheduler and epilogue barriers
  return (capacity - epilogue_bytes - kernel_bytes - 2 * stage_bytes) / (stage_bytes + barrier_bytes);
}

}  // namespace fused::sm90
