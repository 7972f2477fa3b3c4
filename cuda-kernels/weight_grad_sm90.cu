// The Hopper (sm_90a) weight gradient of a small batch, in TF32, f16 or bf16: dW (n, k) = dzᵀ·x,
// the contraction running over the batch's m ≤ 128 rows.
//
// Why its own kernel: a GEMM whose contraction is that short spends its time moving dW, not
// multiplying (SwishScale's 32768×32768 gradient is 4.3 GB to write in f32, 2.1 GB in bf16, from
// 0.27 TFLOP of products). A general GEMM loads both operand tiles for every output tile; here
// each CTA keeps one operand in shared memory for its whole run and streams only the other:
//   - x's rows for a strip of BN output columns stay in shared memory (the contraction fits: at
//     most 128 deep), loaded once per strip;
//   - a producer warp streams dz's 64-row tiles through a pipeline by TMA;
//   - two consumer warpgroups take alternate tiles, each multiplying its 64×BN output tile with
//     wgmma and then storing it: its accumulators go to swizzled shared-memory subtiles, which
//     TMA stores write out as whole rows, while the other warpgroup multiplies or stores.
// On an H200, SwishScale's TF32 gradient takes 1.12–1.15 ms here against cuBLAS's 1.78–1.81 ms,
// its bf16 gradient 0.58–0.59 ms against 0.72–0.73 ms; what sets their pace is under "The
// schedule" below.
//
// Operands (`Operands<T>` below):
//   - TF32: dzᵀ (n, m) and xᵀ (k, m), K-major (TF32 wgmma reads both operands along the
//     contraction), as the backward's transposed copies have them; TMA rounds the f32 values to
//     TF32 on the way in, as cuBLAS's TF32 GEMMs do. xᵀ's rows come in eights, reordered on the
//     way in for the output's stores (see `launch`). Taken: m a multiple of 4 (TMA's 16-byte row
//     strides) and k a multiple of 8 (whole eights).
//   - f16 and bf16: dz (m, n) and x (m, k) as they lie, MN-major (16-bit wgmma reads either
//     layout), so no transposed copies. Taken: n and k multiples of 8 (the rows' 16 bytes).
// Both: any n and k otherwise, m ≤ 128, 16-byte aligned pointers. The contraction's tail and the
// tiles past n and k are zero-filled by TMA and cut by the TMA stores. Anything else is not
// taken, and the caller runs cuBLAS.
//
// The schedule: the output is BN-column strips of 64-row tiles, each strip cut into `parts`
// bands of rows. Unit u is band u / strips of strip u % strips, and CTA i of G (one per SM) takes
// units i, i + G, ...: the CTAs in flight work on neighbouring strips of one band, so that
// together they write whole stretches of dW's rows and read the same dz tiles at about the same
// time. Each unit starts by loading its strip's stationary operand, once both consumers are done
// with the last one. `parts` (chosen at launch) is 1 unless more bands spread the units over the
// CTAs markedly more evenly: 1 for SwishScale's gradient (256 strips on 132 SMs). On an H200 this
// order took SwishScale's TF32 gradient from 1.57 to 1.16 ms against the order before it, which
// gave each CTA one contiguous run of tiles, strip by strip: with the CTAs spread over the whole
// of dW, each writing 512-byte pieces of rows far apart, dW went out at 2.7 TB/s, where a plain
// write kernel reaches 4.2 TB/s. The stores, not the products, set the pace (that order took
// 1.62 ms without the products, 0.50 ms without the stores; the bf16 gradient, with its output
// staged by stmatrix, took 0.60 ms, and 0.33 ms without the stores). Even so dW goes out below a
// plain write kernel's rate with the same strips (an H200's memory 75% busy against 88%): the
// stores' L2 policy (`kEvictFirst`) takes back part of that.
#include "common.cuh"
#include "fused_linear.h"
#include "linear_sm90.cuh"

#if defined(FUSED_SM90)

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

namespace fused {

namespace weight_grad {

using namespace cute;

constexpr int kTileRows = 64;    // output rows per consumer tile: one wgmma row block
constexpr int kInner = 128;      // the contraction that shared memory holds
constexpr int kThreads = 384;    // a producer warpgroup and two consumer warpgroups
// The output stores' L2 policy, evict-first, as CUTLASS's TMA::CacheHintSm90 encodes it. dW is
// written once and not read here: so marked, its lines leave L2 for memory sooner and nearer the
// order they were written in. On an H200 SwishScale's bf16 gradient took 0.585-0.594 ms so
// against 0.636-0.656 ms with the default policy (the shipped configuration), and its train step
// 1.63-1.66 ms against 1.65-1.68 ms; the TF32 gradient 1.15-1.16 ms against 1.17 ms.
constexpr uint64_t kEvictFirst = 0x12F0000000000000ull;

// How the kernel reads and writes elements of type T: `Smem` is the operands' type in shared
// memory, `Out` dW's; `mn_major` says whether the operands run along dW's rows and columns (the
// originals dz and x) or along the contraction (the transposed copies); `Atom` is the wgmma
// swizzle atom of that layout.
template <class T>
struct Operands;
template <>
struct Operands<float> {
  using Smem = tfloat32_t;
  using Out = float;
  static constexpr bool mn_major = false;
  using Atom = GMMA::Layout_K_SW128_Atom<Smem>;
};
// f16 and bf16, as CuTe's type S.
template <class S>
struct SixteenBitOperands {
  using Smem = S;
  using Out = S;
  static constexpr bool mn_major = true;
  using Atom = GMMA::Layout_MN_SW128_Atom<Smem>;
};
template <>
struct Operands<__half> : SixteenBitOperands<half_t> {};
template <>
struct Operands<__nv_bfloat16> : SixteenBitOperands<bfloat16_t> {};

// T: the element type; BN: output columns per strip; Stages: dz tiles in flight; EpiBuffers:
// staged output subtiles per consumer, each of 64 rows by EpiWidth 128-byte swizzle rows.
template <class T, int BN, int Stages, int EpiBuffers, int EpiWidth>
struct Config {
  // Tile t goes to consumer t % 2 through stage t % Stages; with an even stage count every stage
  // serves one consumer, which waits for a stage's next fill only after consuming its previous
  // one. Shared between the consumers, a stage could be waited on two fills ahead of the one in
  // flight, and a parity wait cannot tell those apart (with three stages it ran on unfilled
  // tiles and failed).
  static_assert(Stages % 2 == 0, "each pipeline stage must belong to one consumer");
  using Element = T;
  using Smem = typename Operands<T>::Smem;
  using Out = typename Operands<T>::Out;
  static constexpr bool mn_major = Operands<T>::mn_major;
  static constexpr GMMA::Major major = mn_major ? GMMA::Major::MN : GMMA::Major::K;
  static constexpr int strip = BN;
  static constexpr int stages = Stages;
  static constexpr int atom_cols = 128 / int(sizeof(Out));  // a swizzle atom's row: 128 bytes
  static constexpr int epi_cols = EpiWidth * atom_cols;
  static constexpr int epi_buffers = EpiBuffers;
  // MN-major atoms are stacked along the contraction first, as CUTLASS's collectives do.
  using Order = conditional_t<mn_major, Step<_2, _1, _3>, Step<_1, _2, _3>>;
  using Atom = typename Operands<T>::Atom;
  using SmemLayoutA = decltype(tile_to_shape(Atom{}, Shape<Int<kTileRows>, Int<kInner>, Int<Stages>>{}, Order{}));
  using SmemLayoutB = decltype(tile_to_shape(Atom{}, Shape<Int<BN>, Int<kInner>, _1>{}, Order{}));
  // Each consumer's subtile buffers: with more than one, one is filled while TMA stores the
  // others (the shipped 16-bit configuration has one, the whole tile).
  using SmemLayoutC = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Out>{},
                                             Shape<Int<kTileRows>, Int<epi_cols>, Int<EpiBuffers>>{}));
  // What one TMA store writes: a column of the subtile's atoms, 64 rows by 128 bytes.
  using StoreBox = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Out>{}, Shape<Int<kTileRows>, Int<atom_cols>>{}));
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Smem, Smem, float, Shape<Int<kTileRows>, Int<BN>, Int<kInner>>, major, major>()));
  // The shape of x's view that TMA loads strips from (see `launch`): (k, m) as it lies for 16-bit
  // operands; for TF32 the rows in eights ((2, 4, eights), m), spanning whole strips.
  CUTE_HOST_DEVICE static auto b_shape(int k, int strips, int m) {
    if constexpr (mn_major) {
      return make_shape(k, m);
    } else {
      return make_shape(make_shape(_2{}, _4{}, strips * (BN / 8)), m);
    }
  }
  static constexpr uint32_t tile_bytes = kTileRows * kInner * sizeof(Smem);
  static constexpr uint32_t strip_bytes = BN * kInner * sizeof(Smem);

  struct SharedStorage {
    alignas(1024) ArrayEngine<Smem, cosize_v<SmemLayoutB>> b;
    alignas(1024) ArrayEngine<Smem, cosize_v<SmemLayoutA>> a;
    alignas(1024) ArrayEngine<Out, cosize_v<SmemLayoutC>> c[2];
    uint64_t a_full[Stages];
    uint64_t a_empty[Stages];
    uint64_t b_full;
    uint64_t b_empty;
  };
};

template <class TmaA, class TmaB, class TmaC>
struct Params {
  TmaA tma_a;  // dz's tiles: (n, m)
  TmaB tma_b;  // x's strips: (k, m)
  TmaC tma_c;  // dW (n, k), row-major, in StoreBox pieces
  int n, k, m;
  int row_tiles;  // ceil(n / 64)
  int strips;     // ceil(k / BN)
  int parts;      // bands per strip
  int units;      // strips · parts
};

// dW (n, k) = dzᵀ·x of elements of type T, from dz and x laid out as Operands<T> says: dz_t
// (n, m) and x_t (k, m) for TF32, dz (m, n) and x (m, k) for f16 and bf16.
template <class T>
struct Problem {
  const T* dz;
  const T* x;
  T* dw;
  int64_t m, n, k;
};

// A TMA store of the 2-D box at `smem` to element (row, col) of the tensor map's tensor, under
// the L2 policy `policy` (CuTe's SM90_TMA_STORE_2D takes no cache hint).
__device__ __forceinline__ void store_box(const void* map, const void* smem, int col, int row, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group.L2::cache_hint [%0, {%2, %3}], [%1], %4;" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(cast_smem_ptr_to_uint(smem)), "r"(col), "r"(row), "l"(policy)
      : "memory");
}

using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
using EmptyBarrier = cutlass::arch::ClusterBarrier;

template <class C, class P>
__global__ void __launch_bounds__(kThreads, 1) weight_grad_kernel(const __grid_constant__ P p) {
  using Storage = typename C::SharedStorage;
  extern __shared__ __align__(1024) unsigned char shared[];
  Storage& smem = *reinterpret_cast<Storage*>(shared);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename C::SmemLayoutA{});  // (64, 128, stages)
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename C::SmemLayoutB{});  // (BN, 128, 1)

  const int warp_group = cutlass::canonical_warp_group_idx();
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::stages; ++s) {
      FullBarrier::init(&smem.a_full[s], 1);
      EmptyBarrier::init(&smem.a_empty[s], cutlass::NumThreadsPerWarpGroup);  // one consumer per tile
    }
    FullBarrier::init(&smem.b_full, 1);
    EmptyBarrier::init(&smem.b_empty, 2 * cutlass::NumThreadsPerWarpGroup);  // both consumers per strip
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // Band b of a strip is its row tiles [band_start(b), band_start(b + 1)): one 64-bit product
  // per band, none per tile (the producer runs on 40 registers).
  const auto band_start = [&](int band) { return int(int64_t(band) * p.row_tiles / p.parts); };

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x != 0) return;
    Tensor gA = local_tile(p.tma_a.get_tma_tensor(make_shape(p.n, p.m)), Shape<Int<kTileRows>, Int<kInner>>{},
                           make_coord(_, 0));  // (64, 128, row tiles)
    Tensor gB = local_tile(p.tma_b.get_tma_tensor(C::b_shape(p.k, p.strips, p.m)), Shape<Int<C::strip>, Int<kInner>>{},
                           make_coord(_, 0));  // (BN, 128, strips)
    auto [tAgA, tAsA] = tma_partition(p.tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
    auto [tBgB, tBsB] = tma_partition(p.tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    int stage = 0;
    uint32_t phase = 0;
    for (int unit = blockIdx.x, segment = 0; unit < p.units; unit += gridDim.x, ++segment) {
      const int strip = unit % p.strips, band = unit / p.strips;
      // The strip's operand replaces the previous one once both consumers are done with it.
      if (segment > 0) EmptyBarrier::wait(&smem.b_empty, (segment - 1) & 1);
      FullBarrier::arrive_and_expect_tx(&smem.b_full, C::strip_bytes);
      copy(p.tma_b.with(smem.b_full), tBgB(_, strip), tBsB(_, 0));
      for (int r = band_start(band), end = band_start(band + 1); r < end; ++r) {
        EmptyBarrier::wait(&smem.a_empty[stage], phase ^ 1);
        FullBarrier::arrive_and_expect_tx(&smem.a_full[stage], C::tile_bytes);
        copy(p.tma_a.with(smem.a_full[stage]), tAgA(_, r), tAsA(_, stage));
        if (++stage == C::stages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  const int consumer = warp_group - 1;  // takes the CTA's tiles of this parity
  const int thread = threadIdx.x - warp_group * cutlass::NumThreadsPerWarpGroup;
  typename C::TiledMma mma;
  auto thread_mma = mma.get_thread_slice(thread);
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA, 1, k blocks, stages)
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, 1, k blocks, 1)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTileRows>, Int<C::strip>>{});

  // The output's way out: subtiles of 64 rows by epi_cols columns, staged in shared memory and
  // written by TMA stores, which move whole rows (the threads' own stores, each covering 8
  // rows' 32 bytes, made the kernel as slow as cuBLAS), one 64-row column of swizzle atoms
  // (128 bytes wide) per store.
  Tensor sC = make_tensor(make_smem_ptr(smem.c[consumer].begin()), typename C::SmemLayoutC{});  // (64, cols, buffers)
  const void* store_map = p.tma_c.get_tma_descriptor();
  // The accumulator's layout (wgmma's, for a 64-row tile): value 4j + 2h + e of a thread is at
  // row 16·warp + lane/4 + 8h, column 8j + 2·(lane % 4) + e.
  // stmatrix's lanes address its four 8×8 blocks' rows, lane l row l % 8 of block l / 8.
  const int lane = thread % 32, warp_row = 16 * (thread / 32), block = lane / 8;
  const uint32_t store_barrier = 1 + consumer;  // named barrier 0 is __syncthreads
  int buffer = 0;

  for (int unit = blockIdx.x, segment = 0, local = 0; unit < p.units; unit += gridDim.x, ++segment) {
    const int strip = unit % p.strips, band = unit / p.strips;
    FullBarrier::wait(&smem.b_full, segment & 1);
    // `local` numbers the CTA's tiles: tile `local` goes to consumer local % 2, through stage
    // local % stages.
    for (int r = band_start(band), end = band_start(band + 1); r < end; ++r, ++local) {
      if ((local & 1) != consumer) continue;
      const int stage = local % C::stages;
      FullBarrier::wait(&smem.a_full[stage], uint32_t(local / C::stages) & 1);
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, 0), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      EmptyBarrier::arrive(&smem.a_empty[stage]);

      CUTE_UNROLL
      for (int sub = 0; sub < C::strip / C::epi_cols; ++sub) {
        const int subtile = strip * (C::strip / C::epi_cols) + sub;
        if (int64_t(subtile) * C::epi_cols >= p.k) break;  // past dW's last column (uniform)
        // The buffer's previous store must have read it before it is overwritten.
        if (thread == 0) tma_store_wait<C::epi_buffers - 1>();
        cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, store_barrier);
        if constexpr (sizeof(typename C::Out) == 2) {
          // stmatrix stores four 8×8 blocks of 16-bit elements a warp, each thread giving one
          // pair of every block and each lane the address of one block row. The blocks here are
          // rows [8h, 8h + 8) of the warp's 16 by columns [8j, 8j + 8), in the order (j, 0),
          // (j, 1), (j + 1, 0), (j + 1, 1): a thread's pairs are then its values 4j to 4j + 7 in
          // order. A quarter of the store instructions of writing pairs one by one; on an H200
          // SwishScale's bf16 gradient took 0.60 ms instead of 0.66-0.70 ms.
          static_assert(C::epi_cols % 16 == 0, "column blocks go in twos");
          CUTE_UNROLL
          for (int jj = 0; jj < C::epi_cols / 8; jj += 2) {
            const int j = sub * (C::epi_cols / 8) + jj;
            // The row's address through the buffer's swizzle, which TMA undoes (it moves whole
            // 16-byte pieces, so each row of a block stays in one piece).
            auto& row = *reinterpret_cast<uint128_t*>(
                &sC(warp_row + 8 * (block % 2) + lane % 8, 8 * (jj + block / 2), buffer));
            using E = typename C::Element;
            SM90_U32x4_STSM_N::copy(pack_pair<E>(acc(4 * j), acc(4 * j + 1)), pack_pair<E>(acc(4 * j + 2), acc(4 * j + 3)),
                                    pack_pair<E>(acc(4 * j + 4), acc(4 * j + 5)),
                                    pack_pair<E>(acc(4 * j + 6), acc(4 * j + 7)), row);
          }
        } else {
          // TF32: with xᵀ's rows loaded in the order 0 4 1 5 2 6 3 7 in each eight, a thread's
          // values 4j + 2h and 4j + 2h + 1 are dW's columns 8j + q and 8j + 4 + q (q = lane % 4)
          // of row 8h + lane / 4 of its warp's 16: each an f32 at the place of a 16-bit pair in
          // the 8×8 blocks of stmatrix, whose rows are 16 bytes, four f32 columns. Block 2h + e
          // of column block j is rows [8h, 8h + 8) by columns [8j + 4e, 8j + 4e + 4), and a
          // thread's values 4j to 4j + 3 are its elements of the four blocks in order. Half the
          // store instructions of storing pairs: SwishScale's gradient 1.12-1.15 ms, from 1.17 ms.
          CUTE_UNROLL
          for (int jj = 0; jj < C::epi_cols / 8; ++jj) {
            const int j = sub * (C::epi_cols / 8) + jj;
            auto& row = *reinterpret_cast<uint128_t*>(
                &sC(warp_row + 8 * (block / 2) + lane % 8, 8 * jj + 4 * (block % 2), buffer));
            SM90_U32x4_STSM_N::copy(__float_as_uint(acc(4 * j)), __float_as_uint(acc(4 * j + 1)),
                                    __float_as_uint(acc(4 * j + 2)), __float_as_uint(acc(4 * j + 3)), row);
          }
        }
        // The generic-proxy writes must be visible to the TMA store's async-proxy reads.
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, store_barrier);
        if (thread == 0) {
          CUTE_UNROLL
          for (int a = 0; a < C::epi_cols / C::atom_cols; ++a) {
            const int col = subtile * C::epi_cols + a * C::atom_cols;
            if (col >= p.k) break;  // TMA cuts the rest of an atom past dW's last column
            store_box(store_map, &sC(0, a * C::atom_cols, buffer), col, r * kTileRows, kEvictFirst);
          }
          tma_store_arrive();
        }
        buffer = buffer + 1 == C::epi_buffers ? 0 : buffer + 1;
      }
    }
    EmptyBarrier::arrive(&smem.b_empty);
  }
  if (thread == 0) tma_store_wait<0>();  // the stores read shared memory until they finish
}

// The bands per strip. The busiest CTA's row tiles are ceil(units / ctas) bands of
// row_tiles / parts; but every band reloads the strip's operand and drains the pipeline first,
// so a power of two up to 64 (and at most row_tiles) replaces 1 only where it cuts the busiest
// CTA's rows by a tenth or more.
inline int bands_per_strip(int row_tiles, int strips, int ctas) {
  int best = 1;
  double best_rows = double(ceil_div(int64_t(strips), int64_t(ctas))) * row_tiles;
  for (int parts = 2; parts <= 64 && parts <= row_tiles; parts *= 2) {
    const double rows = double(ceil_div(int64_t(strips) * parts, int64_t(ctas))) * row_tiles / parts;
    if (rows <= 0.9 * best_rows) {
      best = parts;
      best_rows = rows;
    }
  }
  return best;
}

// Builds the TMA descriptors and launches the kernel of configuration C.
template <class C>
cudaError_t launch(const Problem<typename C::Element>& a, int device, int sm_count, cudaStream_t stream) {
  using Smem = typename C::Smem;
  using Out = typename C::Out;
  const int n = int(a.n), k = int(a.k), m = int(a.m);
  // (rows, m) views of an operand: of the originals (m, rows), contiguous along the rows, or of
  // the transposed copies (rows, m), contiguous along the contraction.
  auto operand = [&](const void* ptr, int rows) {
    const auto gmem = make_gmem_ptr(static_cast<const Smem*>(ptr));
    if constexpr (C::mn_major) {
      return make_tensor(gmem, make_shape(rows, m), make_stride(_1{}, int64_t(rows)));
    } else {
      return make_tensor(gmem, make_shape(rows, m), make_stride(int64_t(m), _1{}));
    }
  };
  const auto tile_a = typename C::SmemLayoutA{}(_, _, 0);
  const auto strip_b = typename C::SmemLayoutB{}(_, _, 0);
  auto tma_a = make_tma_copy(SM90_TMA_LOAD{}, operand(a.dz, n), tile_a, product_each(shape(tile_a)), _1{});
  auto tma_b = [&] {
    if constexpr (C::mn_major) {
      return make_tma_copy(SM90_TMA_LOAD{}, operand(a.x, k), strip_b, product_each(shape(strip_b)), _1{});
    } else {
      // xᵀ's rows in the order 0 4 1 5 2 6 3 7 within each eight: row 8g + 4e + q lands in the
      // strip's row 8g + 2q + e.
      const int64_t row = m;
      const auto rows = make_layout(make_shape(_2{}, _4{}, k / 8), make_stride(4 * row, row, 8 * row));
      const auto x_t = make_tensor(make_gmem_ptr(static_cast<const Smem*>(static_cast<const void*>(a.x))),
                                   make_layout(rows, make_layout(m, _1{})));
      return make_tma_copy(SM90_TMA_LOAD{}, x_t, strip_b, product_each(shape(strip_b)), _1{});
    }
  }();
  auto dw = make_tensor(make_gmem_ptr(reinterpret_cast<Out*>(a.dw)), make_shape(n, k), make_stride(int64_t(k), _1{}));
  const auto box_c = typename C::StoreBox{};
  auto tma_c = make_tma_copy(SM90_TMA_STORE{}, dw, box_c, product_each(shape(box_c)), _1{});
  using P = Params<decltype(tma_a), decltype(tma_b), decltype(tma_c)>;
  const int row_tiles = int(ceil_div(n, kTileRows)), strips = int(ceil_div(k, C::strip));
  const int parts = bands_per_strip(row_tiles, strips, sm_count);
  const P params{tma_a, tma_b, tma_c, n, k, m, row_tiles, strips, parts, strips * parts};
  constexpr int smem_bytes = int(sizeof(typename C::SharedStorage));
  FUSED_TRY(allow_dynamic_smem<weight_grad_kernel<C, P>>(smem_bytes, device));
  const unsigned blocks = unsigned(min(sm_count, params.units));
  weight_grad_kernel<C, P><<<blocks, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// The configurations shipped, the fastest of those that scripts/sm90_tile_sweep.cu times. TF32:
// 128-column strips (64 KB), two 32 KB dz tiles in flight and three 16 KB output subtiles per
// consumer. f16 and bf16: 256-column strips (64 KB), four 16 KB dz tiles in flight and one 32 KB
// output subtile per consumer, the whole tile, which its stores write out in four 64-row columns
// of 128 bytes.
template <class T>
struct Shipped {
  using type = Config<T, 256, 4, 1, 4>;
};
template <>
struct Shipped<float> {
  using type = Config<float, 128, 2, 3, 2>;
};

template <class T>
bool takes(const Problem<T>& a) {
  using C = typename Shipped<T>::type;
  // TMA's 16-byte row strides: along dW's rows (k), and along the operands' rows (m for the
  // transposed copies, n and k for the originals); in TF32, xᵀ's rows in whole eights.
  constexpr int64_t align = 16 / int64_t(sizeof(T));
  const bool strides = C::mn_major ? a.n % align == 0 && a.k % align == 0 : a.m % align == 0 && a.k % 8 == 0;
  return a.m >= 1 && a.m <= kInner && a.n >= 1 && a.k >= 1 && strides && a.n <= INT32_MAX && a.k <= INT32_MAX &&
         ceil_div(a.n, kTileRows) * ceil_div(a.k, C::strip) <= INT32_MAX / 2 && sm90::aligned16(a.dz) &&
         sm90::aligned16(a.x) && sm90::aligned16(a.dw);
}

// Launches the shipped configuration for `problem` and sets *taken when the kernel takes it.
template <class T>
cudaError_t run(const Problem<T>& problem, int32_t* taken, cudaStream_t stream) {
  int device = 0, sm_count = 0;
  *taken = 0;
  if (!takes(problem) || !sm90::usable_device(&device, &sm_count)) return cudaSuccess;
  *taken = 1;
  return launch<typename Shipped<T>::type>(problem, device, sm_count, stream);
}

}  // namespace weight_grad

}  // namespace fused

extern "C" cudaError_t fused_weight_grad_tf32(const float* dz_t, const float* x_t, float* dw, int64_t m, int64_t n,
                                              int64_t k, int32_t* taken, cudaStream_t stream) {
  return fused::weight_grad::run(fused::weight_grad::Problem<float>{dz_t, x_t, dw, m, n, k}, taken, stream);
}

extern "C" cudaError_t fused_weight_grad_16bit(const void* dz, const void* x, void* dw, int64_t m, int64_t n,
                                               int64_t k, int32_t dtype, int32_t* taken, cudaStream_t stream) {
  using namespace fused::weight_grad;
  switch (dtype) {
    case FUSED_F16:
      return run(Problem<__half>{static_cast<const __half*>(dz), static_cast<const __half*>(x), static_cast<__half*>(dw),
                                 m, n, k},
                 taken, stream);
    case FUSED_BF16:
      return run(Problem<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(dz), static_cast<const __nv_bfloat16*>(x),
                                        static_cast<__nv_bfloat16*>(dw), m, n, k},
                 taken, stream);
    default:
      *taken = 0;
      return cudaErrorInvalidValue;
  }
}

#else  // !FUSED_SM90: built without the sm_90a target (or CUTLASS); the caller runs cuBLAS.

extern "C" cudaError_t fused_weight_grad_tf32(const float*, const float*, float*, int64_t, int64_t, int64_t,
                                              int32_t* taken, cudaStream_t) {
  *taken = 0;
  return cudaSuccess;
}

extern "C" cudaError_t fused_weight_grad_16bit(const void*, const void*, void*, int64_t, int64_t, int64_t, int32_t,
                                               int32_t* taken, cudaStream_t) {
  *taken = 0;
  return cudaSuccess;
}

#endif
