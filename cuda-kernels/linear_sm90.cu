// The Hopper (sm_90a) fast path of the fused linear forward: the y = epilogue(x·wᵀ + bias) of
// linear_forward.cu, on a CUTLASS warp-specialised GEMM.
//
// Why a second GEMM: on Hopper the portable kernel's mma.sync reaches about half of what the
// tensor cores can do; wgmma, fed by the TMA copy engine from a producer warp while two consumer
// warpgroups multiply, reaches most of the rest. CUTLASS's sm90 collectives are that design, so
// this file instantiates them rather than writing it again. The epilogue stays fused: CUTLASS's
// epilogue visitor trees (EVT) let the per-feature bias, the activation, the scale, the residual,
// the optional store of z and an eval-mode BatchNorm run on the accumulators before the single
// store of y, as in the portable kernel.
//
// What it takes (anything else returns false and the portable kernel runs):
//   - bf16 and f16; f32 with one TF32 product (tf32 == 1), and exact f32 as three TF32 products
//     on split operands (split_tf32_sm90.cuh) where the faster kernel of linear_exact_sm90.cu,
//     which needs enough output tiles to fill the device, does not take the problem;
//   - k % 8 == 0 and n % 8 == 0, x, w, y and z 16-byte aligned: TMA moves 16-byte aligned rows;
//   - every activation, scale and residual, with z kept or not; BatchNorm none, eval and train
//     (given the workspace of linear_sm90_workspace_floats); no params at all (a plain product,
//     as the backward's are);
//   - a device of compute capability 9.0 running this file's sm_90a code.
//
// The epilogue tree, leaves first (every node computes in f32):
//   z = acc + bias_j, rounded to T                 bias: a per-feature vector
//   z is stored to args.z when that is not null    (a no-op node otherwise)
//   u = act(z) * s_j * scale + (residual ? z : 0)  s: the per-feature scale, or 1 without one
//   y = u * f_j + d_j                              f, d: the folded eval BatchNorm, or 1 and 0
//   y is passed through a node that, in a train-mode BatchNorm, writes the (mean, M2) of every
//   column of every epilogue subtile (ColumnStatistics; a no-op otherwise)
// Absent vectors are null pointers that CUTLASS reads as constants, and the activation and the
// residual are run-time arguments, so one GEMM per element type and tile configuration serves
// every epilogue: thirteen instantiations in all (three element types on the narrow batch's tiles
// and on the wide batch's two, and exact f32 in two batch regimes with either way of sharing tiles
// between CTAs).
//
// BatchNorm: eval folds into the last node, f = γ/sqrt(rv + eps) and d = β − rm·f, computed by a
// small kernel before the GEMM (which also writes the running statistics to `stats`, as the
// portable path does). Train stores u as y and, from the epilogue, the per-subtile statistics in
// the portable kernel's partials layout; batch_norm.cu's kernels (fused_linear_batch_norm_finish)
// merge them and normalise y in place, exactly as after the portable GEMM.
#include "linear_sm90.cuh"

#include "common.cuh"
#include "epilogue.cuh"
#include "split_tf32_sm90.cuh"

#if defined(FUSED_SM90)

#include <atomic>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace fused {

// Defined in batch_norm.cu: the workspace of the kernels that merge the statistics partials.
int64_t batch_norm_train_workspace_floats(int64_t m, int64_t n, int64_t row_tile);

namespace sm90 {

namespace evt = cutlass::epilogue::fusion;
using cute::_1;
using cute::_128;
using cute::_2;
using cute::Int;
using cute::Shape;

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// ---------------------------------------------------------------------------------------------
// Epilogue pieces.

// A per-feature vector: one value per column of y, which CUTLASS calls a row broadcast. A null
// pointer reads as the argument's `null_default`, so an absent row costs no memory traffic.
template <class CtaTile, class E>
using Feature = evt::Sm90RowBroadcast<0, CtaTile, E, float>;

// The run-time half of u = act(z) * s * scale + (residual ? z : 0).
struct PointwiseArguments {
  int activation = ACT_IDENTITY;
  float scale = 1.f;  // the scalar factor; the per-feature one is the node's second input
  int residual = 0;
};

// The activations as the epilogue evaluates them. CUTLASS unrolls the epilogue over the whole
// 128-element share of a thread's tile, so each instruction per element becomes 128 in the
// executed code: with expf and the IEEE division (about 40 instructions, with branches) the
// sigmoid alone made ~80 KB of code per tile, which missed the instruction cache and took longer
// than the tile's GEMM. Hence the logistic function with the hardware exp2 and reciprocal
// (__expf, __fdividef: a few instructions, relative error ~1e-6, far below even f32 TF32's).
// It saturates without branches: e^-z = inf gives 1/inf = 0.
__device__ __forceinline__ float fast_sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

struct FastSilu {
  __device__ __forceinline__ float apply(float z) const { return z * fast_sigmoid(z); }
};
struct FastSigmoid {
  __device__ __forceinline__ float apply(float z) const { return fast_sigmoid(z); }
};
// tanh(z) = 2σ(2z) − 1: absolute error ~1e-7, relative to the output's unit scale.
struct FastTanh {
  __device__ __forceinline__ float apply(float z) const { return 2.f * fast_sigmoid(2.f * z) - 1.f; }
};

// The exact (erf) GELU, with erf from Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7):
// about fifteen instructions and no branch, where erff takes ~25 with several.
// erf(|x|) = 1 − t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·e^(−x²), t = 1 / (1 + p·|x|).
struct FastGelu {
  __device__ __forceinline__ float apply(float z) const {
    const float x = fabsf(z) * 0.70710678118654752f;
    const float t = __fdividef(1.f, fmaf(0.3275911f, x, 1.f));
    const float poly =
        t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 1.061405429f, -1.453152027f), 1.421413741f), -0.284496736f), 0.254829592f);
    const float erf_abs = 1.f - poly * __expf(-x * x);
    return 0.5f * z * (1.f + copysignf(erf_abs, z));
  }
};

template <class Act, int N>
CUTLASS_DEVICE cutlass::Array<float, N> act_scale_residual(Act act, const cutlass::Array<float, N>& z,
                                                            const cutlass::Array<float, N>& s,
                                                            const PointwiseArguments& a) {
  cutlass::Array<float, N> u;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < N; ++i) {
    // The association of PointwiseEpilogue: one of s and scale is 1, so s * scale is exact.
    const float y = act.apply(z[i]) * (s[i] * a.scale);
    u[i] = a.residual ? y + z[i] : y;
  }
  return u;
}

// EVT compute function: (z, s) -> u. The activation is uniform over a launch, so switching once
// per fragment costs a predictable branch, and only the taken case's code runs.
template <class>
struct ActScaleResidual {
  using Arguments = PointwiseArguments;  // CUTLASS passes these after the inputs

  template <int N>
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(const cutlass::Array<float, N>& z,
                                                     const cutlass::Array<float, N>& s,
                                                     const Arguments& a) const {
    switch (a.activation) {
      case ACT_RELU: return act_scale_residual(Relu{}, z, s, a);
      case ACT_GELU: return act_scale_residual(FastGelu{}, z, s, a);
      case ACT_SILU: return act_scale_residual(FastSilu{}, z, s, a);
      case ACT_SIGMOID: return act_scale_residual(FastSigmoid{}, z, s, a);
      case ACT_TANH: return act_scale_residual(FastTanh{}, z, s, a);
      default: return act_scale_residual(Identity{}, z, s, a);
    }
  }
};

// The train-mode BatchNorm's statistics, gathered in the epilogue: for every epilogue subtile
// (EPI_M rows by EPI_N columns of y), the (mean, M2) of each column over the subtile's rows, in
// the partials layout that batch_norm.cu's merge reads with a row tile of EPI_M:
// partials[t·n + c] the means and partials[(tiles + t)·n + c] the M2s, t the subtile's row tile
// and tiles = ceil(m / EPI_M).
// They are the statistics of y as stored, rounded to T, which is what PyTorch's BatchNorm sees.
//
// The node passes y through unchanged and works in reduce(), where CUTLASS hands it the subtile's
// values and a scratch buffer (the subtile's own store buffer, which y is copied into after it):
//   1. every thread writes its share of the subtile to the buffer, row-major (a swizzle against
//      bank conflicts cost the GEMM's consumers registers they do not have);
//   2. P threads per column of 4-byte words sum their rows and exchange the sums by shuffles:
//      behind the exact f32 product (TwoPasses), the values and then their squared deviations
//      from the mean; behind TF32 and 16-bit products, in one pass, the deviations from the
//      column's first row and their squares, which halves the dependent loads and shuffles
//      (column_moments says why that loses nothing those products hold). Either way Chan's
//      merge of the subtiles sees no cancellation.
// A null `partials` makes it a no-op, so the one GEMM of each configuration serves every mode.
template <class E, bool TwoPasses>
struct ColumnStatistics {
  struct SharedStorage {};
  struct Arguments {
    float* partials = nullptr;  // 2 · tiles · n floats, or null
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE ColumnStatistics() {}
  CUTLASS_HOST_DEVICE ColumnStatistics(Params const& params, SharedStorage const&) : params(params) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(evt::ProducerLoadArgs<Args...> const&) {
    return evt::EmptyProducerLoadCallbacks{};
  }

  // Threads is the epilogue's thread count; Coords gives each of a thread's values its offset
  // from the thread's first one (CUTLASS's tCcD).
  template <class EpiTile, int Threads, class Coords>
  struct Callbacks : evt::EmptyConsumerStoreCallbacks {
    static constexpr int EPI_M = cute::size<0>(EpiTile{}), EPI_N = cute::size<1>(EpiTile{});
    static constexpr int PER_WORD = 4 / int(sizeof(E));    // elements per 4-byte word
    static constexpr int WORDS = EPI_N / PER_WORD;          // words per subtile row
    static constexpr int P = Threads / WORDS;              // threads per column of words
    static_assert(sizeof(E) <= 4 && EPI_N % PER_WORD == 0, "subtile rows must be whole 4-byte words");
    static_assert(Threads % WORDS == 0 && P <= 32 && (P & (P - 1)) == 0,
                  "a power-of-two number of threads, at most a warp, must share each column of words");

    Params const& params;
    Coords coords;
    int m, n;                  // the problem's rows and columns
    int tile_row, tile_col;    // the CTA tile's first row and column
    int origin_m, origin_n;    // the thread's first value, relative to the CTA tile
    int thread_idx;

    CUTLASS_DEVICE Callbacks(Params const& params, Coords coords, int m, int n, int tile_row, int tile_col,
                             int origin_m, int origin_n, int thread_idx)
        : params(params), coords(coords), m(m), n(n), tile_row(tile_row), tile_col(tile_col),
          origin_m(origin_m), origin_n(origin_n), thread_idx(thread_idx) {}

    template <class Acc, class In, int F>
    CUTLASS_DEVICE cutlass::Array<In, F> visit(cutlass::Array<Acc, F> const&, int, int, int,
                                               cutlass::Array<In, F> const& y) {
      return y;
    }

    // Index of element (r, c) of the subtile in the scratch buffer.
    CUTLASS_DEVICE static int staged(int r, int c) { return r * EPI_N + c; }

    // Sums v over the P threads of each column of words (neighbouring lanes).
    CUTLASS_DEVICE static void sum_over_column(float (&v)[PER_WORD]) {
      CUTLASS_PRAGMA_UNROLL
      for (int offset = P / 2; offset > 0; offset /= 2) {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < PER_WORD; ++e) v[e] += __shfl_xor_sync(0xffffffffu, v[e], offset);
      }
    }

    // The mean and M2 of the PER_WORD columns from c0 over the staged subtile's first `rows` rows,
    // each thread of the column's P taking every P-th row from `part`; every thread gets the results.
    // TwoPasses: the sum and then the squared deviations from the mean, exact up to rounding.
    // Otherwise one pass over the deviations d from the column's first row, M2 = Σd² − (Σd)²/rows:
    // by Samuelson's inequality that row lies within sqrt(rows − 1) standard deviations of the
    // mean, so Σd² ≤ rows·M2, and the subtraction magnifies the rounding of the sums by at most
    // rows: it loses at most log2(rows) of f32's 24 bits (7 at 128 rows). What remains exceeds
    // the 8 or 11 bits of 16-bit values and the 11 of a TF32 product's operands, not the exact
    // f32 product's.
    CUTLASS_DEVICE static void column_moments(const E* stage, int rows, int part, int c0, float (&mean)[PER_WORD],
                                              float (&m2)[PER_WORD]) {
      if constexpr (TwoPasses) {
        float sum[PER_WORD] = {};
        for_each_row(stage, rows, part, c0, [&](int e, float v) { sum[e] += v; });
        sum_over_column(sum);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < PER_WORD; ++e) {
          mean[e] = sum[e] / float(rows);
          m2[e] = 0.f;
        }
        for_each_row(stage, rows, part, c0, [&](int e, float v) {
          const float d = v - mean[e];
          m2[e] += d * d;
        });
        sum_over_column(m2);
      } else {
        float shift[PER_WORD], sum[PER_WORD] = {}, squares[PER_WORD] = {};
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < PER_WORD; ++e) shift[e] = float(stage[staged(0, c0 + e)]);
        for_each_row(stage, rows, part, c0, [&](int e, float v) {
          const float d = v - shift[e];
          sum[e] += d;
          squares[e] += d * d;
        });
        sum_over_column(sum);
        sum_over_column(squares);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < PER_WORD; ++e) {
          const float mean_d = sum[e] / float(rows);
          mean[e] = shift[e] + mean_d;
          m2[e] = fmaxf(squares[e] - sum[e] * mean_d, 0.f);  // rounding may leave it a hair below 0
        }
      }
    }

    // Calls visit(e, v) with each value v of column c0 + e in the thread's rows of the staged
    // subtile: every P-th row from `part`, of the first `rows`. The loop is unrolled by four, not
    // fully: fully, the f32 ping-pong consumers spill.
    template <class Visit>
    CUTLASS_DEVICE static void for_each_row(const E* stage, int rows, int part, int c0, Visit&& visit) {
#pragma unroll 4
      for (int j = 0; j < EPI_M / P; ++j) {
        const int r = part + j * P;
        if (r < rows) {
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < PER_WORD; ++e) visit(e, float(stage[staged(r, c0 + e)]));
        }
      }
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&& buffer, SyncFn const& sync, int epi_m, int epi_n, bool,
                               VTensor results) {
      if (params.partials == nullptr) return;
      using Buffer = cute::remove_cvref_t<STensor>;
      static_assert(cute::is_same_v<typename Buffer::value_type, E>, "the scratch buffer holds y's elements");
      static_assert(decltype(cute::cosize(typename Buffer::layout_type{}))::value >= EPI_M * EPI_N,
                    "the scratch buffer holds a subtile");
      E* stage = cute::raw_pointer_cast(buffer.data());
      constexpr int F = cute::remove_cvref_t<decltype(results(0))>::kElements;

      // 1. The thread's values to the buffer.
      auto subtile = coords(cute::_, cute::_, cute::_, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < cute::size(subtile); ++i) {
        const int r = origin_m + int(cute::get<0>(subtile(i))) - epi_m * EPI_M;
        const int c = origin_n + int(cute::get<1>(subtile(i))) - epi_n * EPI_N;
        stage[staged(r, c)] = results(i / F)[i % F];
      }
      sync();

      // 2. Per column of words, over the subtile's rows inside the problem, the mean and M2.
      const int row0 = tile_row + epi_m * EPI_M;
      const int rows = min(EPI_M, m - row0);  // the same for every thread
      if (rows > 0) {
        const int word = thread_idx / P, part = thread_idx % P;
        const int c0 = word * PER_WORD;
        float mean[PER_WORD], m2[PER_WORD];
        column_moments(stage, rows, part, c0, mean, m2);
        if (part == 0) {
          const int64_t tile = row0 / EPI_M;
          float* means = params.partials + tile * n;
          float* m2s = params.partials + (ceil_div(m, EPI_M) + tile) * n;
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < PER_WORD; ++e) {
            const int c = tile_col + epi_n * EPI_N + c0 + e;
            if (c < n) {
              means[c] = mean[e];
              m2s[c] = m2[e];
            }
          }
        }
      }
      sync();  // every read done before y is copied into the buffer
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(evt::detail::ConsumerStoreArgs<Args...> const& args) {
    using EpiTile = cute::remove_cvref_t<decltype(args.epi_tile)>;
    using CtaTile = cute::remove_cvref_t<decltype(args.tile_shape_mnk)>;
    constexpr int threads = cute::remove_cvref_t<decltype(args.tiled_copy)>::TiledNumThr::value;
    // residue_cD and residue_tCcD are (m, n) minus the CTA tile's and the thread's first
    // coordinate: their difference is the thread's first coordinate within the tile.
    const int origin_m = int(cute::get<0>(args.residue_cD)) - int(cute::get<0>(args.residue_tCcD));
    const int origin_n = int(cute::get<1>(args.residue_cD)) - int(cute::get<1>(args.residue_tCcD));
    const int tile_row = int(cute::get<0>(args.tile_coord_mnkl)) * cute::size<0>(CtaTile{});
    const int tile_col = int(cute::get<1>(args.tile_coord_mnkl)) * cute::size<1>(CtaTile{});
    return Callbacks<EpiTile, threads, cute::remove_cvref_t<decltype(args.tCcD)>>(
        params, args.tCcD, int(cute::get<0>(args.problem_shape_mnkl)), int(cute::get<1>(args.problem_shape_mnkl)),
        tile_row, tile_col, origin_m, origin_n, args.thread_idx);
  }
};

// The tree described at the top of the file, for output element T; ExactProduct: behind the
// exact f32 product, whose statistics take two passes.
template <class T, class CtaTile, class EpilogueDescriptor, bool ExactProduct>
struct LinearEpilogue {
  template <template <class> class Fn, class Out = float>
  using Compute = evt::Sm90Compute<Fn, Out, float, kRound>;

  // z = acc + bias_j, rounded to T: the epilogue continues from the z that is stored for the
  // backward (as PyTorch's next op reads its Linear's output), so that the backward
  // differentiates where the forward evaluated, and a train-mode BatchNorm's backward rebuilds
  // the very u that the statistics describe.
  using Z = evt::Sm90EVT<Compute<cutlass::plus, T>, evt::Sm90AccFetch, Feature<CtaTile, T>>;

  // z, also written to memory unless its pointer is null; the node passes its input through.
  using ZDescriptor = cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpilogueDescriptor,
                                                                                cutlass::layout::RowMajor, T>;
  using ZStore = evt::Sm90AuxStore<ZDescriptor::Stages, typename EpilogueDescriptor::EpilogueTile, T, kRound,
                                   typename ZDescriptor::Stride, typename ZDescriptor::SmemLayoutAtom,
                                   typename ZDescriptor::CopyOpR2S>;
  using ZKept = evt::Sm90EVT<ZStore, Z>;

  // u = act(z) * s_j * scale + (residual ? z : 0)
  using U = evt::Sm90EVT<Compute<ActScaleResidual>, ZKept, Feature<CtaTile, T>>;

  // y = u * f_j + d_j, rounded once to T
  using Y = evt::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, T>, U, Feature<CtaTile, float>,
                         Feature<CtaTile, float>>;

  // y, passed through; with a train-mode BatchNorm, its per-subtile column statistics
  using Root = evt::Sm90EVT<ColumnStatistics<T, ExactProduct>, Y>;
  using Arguments = typename Root::Arguments;
  using ZStride = typename ZDescriptor::Stride;

  // What the tree reads and writes, as pointers that may be null.
  struct Inputs {
    const T* bias;
    const T* scale_row;  // null: no per-feature scale
    T* z;                // null: z is not kept
    const float* bn_factor;
    const float* bn_shift;  // both null: no eval BatchNorm
    float* bn_partials;     // null: no train BatchNorm
    PointwiseArguments pointwise;
    int64_t m, n;
  };

  static Arguments arguments(const Inputs& in) {
    const ZStride z_stride{in.n, _1{}, in.m * in.n};
    return Arguments{
        {                                                // Y
         {                                               // U
          {                                              // ZKept
           {{}, {in.bias, T(0.f)}, {}},                  // Z = acc + bias
           {in.z, z_stride}},                            // store z
          {in.scale_row, T(1.f)},                        // s
          in.pointwise},                                 // act, scale, residual
         {in.bn_factor, 1.f},                            // f
         {in.bn_shift, 0.f},                             // d
         {}},                                            // u * f + d
        {in.bn_partials}};                               // column statistics
  }
};

// ---------------------------------------------------------------------------------------------
// The GEMM: y (m, n) = x (m, k) · w (n, k)ᵀ, both operands K-major (the layout TF32 wgmma needs).
//
// A producer warp feeds the shared-memory pipeline through TMA; the persistent scheduler keeps
// one CTA per SM walking the output tiles; CTAs run in clusters of two that multicast the operand
// tile they share. Two configurations, by batch:
//   - Wide (m > 128), compute-bound: ping-pong, each of two consumer warpgroups owning a 128x128
//     tile, so that one's epilogue runs while the other multiplies (on H200 this beat two
//     warpgroups sharing a 128x256 tile by 3-8% once the epilogue has an activation, and tied
//     without one); clusters along m share the w tile; 128-byte k steps (64 16-bit or 32 f32
//     elements) with the 128-byte TMA swizzle. On an H100, whose memory is 30% slower, the
//     same tiles ran 1024x8192->8192 with SigmoidResidual's epilogue 15-21% behind cuBLAS's bare
//     GEMM in TF32 and 12-15% in bf16, and two warpgroups sharing a 128x256 tile (which reads
//     each tile of x for twice the output) 4.5-10% ahead of them: devices with memory under
//     WIDE_BATCH_FAST_MEMORY_BYTES_PER_S run those in TF32 (WideBatchSlowMemory). In f16 and
//     bf16 they run the tile and cluster of cuBLAS's own kernels for these shapes there
//     (WideBatchSlowMemory16Bit): 256x128, each warpgroup owning 128x128 of it, in clusters
//     along n that share the x tile; through the op, on an H100, about 1% faster than 128x256
//     in bf16 (ScaleBatchNorm's and SigmoidResidual's forwards and train steps), 3-4% slower in
//     TF32.
//   - Narrow (m <= 128: one row of tiles, so clusters go along n and share the x tile), bound by
//     streaming w once. Two cooperative warpgroups share a 128x128 tile whose k steps are 256
//     bytes (128 16-bit or 64 f32 elements, three stages): each stage reads 256 contiguous bytes
//     of each of the tile's rows of w, where 128x256 tiles read 128 bytes (16-bit) or 64 (f32)
//     to keep four or seven stages in flight. On an H100, SwishScale's 128x32768->32768 GEMM took
//     713-718 against 749-755 us in bf16 and 1401-1406 against 1467-1474 us in TF32 (128x128
//     with 128-byte steps: 724-729 and 1420-1427 us), for 256 tiles on 132 SMs against 128; a
//     128x16 epilogue subtile keeps the shared memory that stages y and z small.
//   - Exact f32 (three products on split operands), either batch: cooperative 128x128 tiles,
//     whose two accumulators per thread (the running sum and the k step's part) fit in
//     registers where 128x256's would not; 128-byte k steps, as many stages as fit with their
//     split copies; clusters as above. Being compute-bound, it also loses most to a last wave
//     of tiles that leaves SMs idle: 1024x8192 is 512 tiles, 3.88 waves of 132, and the weight
//     gradient's 8192x8192 is 4096, 31.03 waves. So its CTAs share the last two waves' tiles
//     by k (CUTLASS's stream-K scheduler): each takes an equal run of k steps, and a tile split
//     between CTAs is summed in IEEE f32 in the workspace, in a fixed order (the results do
//     not depend on timing). Where the tiles fill the waves, the scheduler keeps whole tiles;
//     a problem of at most 8 k steps runs on the plain persistent scheduler (`splits_k`).
struct PingPong {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
  static constexpr int tile_m = 128, tile_n = 128;
};
// Cooperative<128, 128> is the narrow batch's and exact f32's tile, Cooperative<128, 256> and
// Cooperative<256, 128> the wide batch's on devices with slower memory.
template <int TileM, int TileN>
struct Cooperative {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr int tile_m = TileM, tile_n = TileN;
};

// How the mainloop multiplies: once, in the operands' own type (TF32 for f32) ...
struct OneProduct {
  template <class T, class CtaTile, class Cluster, int EpilogueBytes, class Schedule>
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, cutlass::layout::RowMajor, 16 / sizeof(T), T,
      cutlass::layout::ColumnMajor, 16 / sizeof(T), float, CtaTile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<EpilogueBytes>, Schedule>::CollectiveOp;
};
// ... or three times, on f32 operands split into TF32 pairs.
struct ThreeProducts {
  template <class T, class CtaTile, class Cluster, int EpilogueBytes, class Schedule>
  using Mainloop = SplitTf32Mainloop<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::tfloat32_t, cutlass::layout::RowMajor, 4,
      cutlass::tfloat32_t, cutlass::layout::ColumnMajor, 4, float, CtaTile, Cluster,
      cutlass::gemm::collective::StageCount<split_tf32_stages<CtaTile>(EpilogueBytes)>, Schedule>::CollectiveOp>;
};

// How the persistent CTAs share the output tiles: whole tiles each ...
struct WholeTiles {
  using Scheduler = cutlass::gemm::PersistentScheduler;
  static constexpr bool stream_k = false;
};
// ... or the last two waves' tiles split by k (cooperative kernels only).
struct StreamK {
  using Scheduler = cutlass::gemm::StreamKScheduler;
  static constexpr bool stream_k = true;
};

template <class ScheduleKind, class ClusterShape, class EpilogueTileShape, int KBytes, class ProductKind = OneProduct,
          class TileSharing = WholeTiles>
struct TileConfig {
  using Schedule = ScheduleKind;
  using Cluster = ClusterShape;
  using EpilogueTile = EpilogueTileShape;
  static constexpr int k_bytes = KBytes;
  using Product = ProductKind;
  using Sharing = TileSharing;
};
using WideBatch = TileConfig<PingPong, Shape<_2, _1, _1>, cutlass::epilogue::collective::EpilogueTileAuto, 128>;
using WideBatchSlowMemory =
    TileConfig<Cooperative<128, 256>, Shape<_2, _1, _1>, cutlass::epilogue::collective::EpilogueTileAuto, 128>;
using WideBatchSlowMemory16Bit =
    TileConfig<Cooperative<256, 128>, Shape<_1, _2, _1>, cutlass::epilogue::collective::EpilogueTileAuto, 128>;
using NarrowBatch = TileConfig<Cooperative<128, 128>, Shape<_1, _2, _1>, Shape<_128, cute::_16>, 256>;
template <class Cluster, class Sharing>
using Exact = TileConfig<Cooperative<128, 128>, Cluster, Shape<_128, cute::_16>, 128, ThreeProducts, Sharing>;
using ExactWideBatch = Exact<Shape<_2, _1, _1>, StreamK>;
using ExactWideWholeTiles = Exact<Shape<_2, _1, _1>, WholeTiles>;
using ExactNarrowBatch = Exact<Shape<_1, _2, _1>, StreamK>;
using ExactNarrowWholeTiles = Exact<Shape<_1, _2, _1>, WholeTiles>;
constexpr int64_t NARROW_BATCH_ROWS = 128;
// Devices whose memory moves fewer bytes a second than this (an H100 SXM's HBM3: 3.35 TB/s; an
// H200's HBM3e: 4.8) run the wide batch on WideBatchSlowMemory (TF32) or
// WideBatchSlowMemory16Bit (f16, bf16).
constexpr double WIDE_BATCH_FAST_MEMORY_BYTES_PER_S = 4e12;

int64_t batch_norm_workspace_floats(const FusedLinearArgs& a, int64_t row_tile) {
  switch (a.batch_norm) {
    case FUSED_BN_EVAL: return ceil_div(2 * a.n, 32) * 32;
    case FUSED_BN_TRAIN: return ceil_div(batch_norm_train_workspace_floats(a.m, a.n, row_tile), 32) * 32;
    default: return 0;
  }
}

template <class T, class Config>
struct Gemm {
  using Element = T;
  static constexpr int kAlign = 16 / sizeof(T);  // elements per 16 bytes
  using CtaTile =
      Shape<Int<Config::Schedule::tile_m>, Int<Config::Schedule::tile_n>, Int<Config::k_bytes / int(sizeof(T))>>;
  using Cluster = typename Config::Cluster;
  using MainloopSchedule = typename Config::Schedule::Mainloop;
  using EpilogueSchedule = typename Config::Schedule::Epilogue;
  using EpilogueTile = typename Config::EpilogueTile;

  using EpilogueDescriptor =
      cutlass::epilogue::collective::detail::EpilogueDescriptor<CtaTile, EpilogueTile, void, T, EpilogueSchedule>;
  using Tree =
      LinearEpilogue<T, CtaTile, EpilogueDescriptor, std::is_same_v<typename Config::Product, ThreeProducts>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, CtaTile, Cluster, EpilogueTile, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no C operand
      T, cutlass::layout::RowMajor, kAlign, EpilogueSchedule, typename Tree::Root>::CollectiveOp;
  // Rows of an epilogue subtile: the row tile of the train-mode BatchNorm's partial statistics.
  static constexpr int64_t stats_row_tile = cute::size<0>(typename CollectiveEpilogue::EpilogueTile{});

  using CollectiveMainloop = typename Config::Product::template Mainloop<
      T, CtaTile, Cluster, static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage)), MainloopSchedule>;
  using Operand = typename CollectiveMainloop::ElementA;  // T, or tfloat32_t holding raw f32 bits

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, typename Config::Sharing::Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Device::Arguments;

  static Arguments arguments(const FusedLinearArgs& a, const typename Tree::Inputs& in, int sm_count, int device) {
    const int m = int(a.m), n = int(a.n), k = int(a.k);
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Kernel::TileSchedulerArguments scheduler{};
    if constexpr (Config::Sharing::stream_k) {
      // Stream-K on the last two waves whenever the last is not full; CUTLASS's heuristic
      // would keep whole tiles unless that wave were under half full.
      scheduler.decomposition_mode = Kernel::TileScheduler::DecompositionMode::StreamK;
    }
    return Arguments{cutlass::gemm::GemmUniversalMode::kGemm,
                     {m, n, k, 1},
                     {static_cast<const Operand*>(a.x), StrideA{a.k, _1{}, a.m * a.k},
                      static_cast<const Operand*>(a.w), StrideB{a.k, _1{}, a.n * a.k}},
                     {Tree::arguments(in), nullptr, StrideD{a.n, _1{}, a.m * a.n}, static_cast<T*>(a.y),
                      StrideD{a.n, _1{}, a.m * a.n}},
                     hw,
                     scheduler};
  }

  // Floats of a.workspace that the BatchNorm takes; the GEMM's own workspace follows.
  static int64_t batch_norm_floats(const FusedLinearArgs& a) { return batch_norm_workspace_floats(a, stats_row_tile); }
  // Floats of a.workspace in all: the BatchNorm's, then the GEMM's (stream-K's partial tiles and
  // the flags that order their sums).
  static int64_t workspace_floats(const FusedLinearArgs& a, int sm_count, int device) {
    typename Tree::Inputs shape_only{};
    shape_only.m = a.m;
    shape_only.n = a.n;
    const size_t gemm_bytes = Device::get_workspace_size(arguments(a, shape_only, sm_count, device));
    return batch_norm_floats(a) + int64_t(ceil_div(int64_t(gemm_bytes), int64_t(sizeof(float))));
  }
};

// CUTLASS's element types for ours: same layouts, CUTLASS's conversions.
template <class T>
struct Cutlass;
template <>
struct Cutlass<float> {
  using type = float;
};
template <>
struct Cutlass<__half> {
  using type = cutlass::half_t;
};
template <>
struct Cutlass<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// ---------------------------------------------------------------------------------------------
// BatchNorm kernels around the GEMM.

// Eval: the per-feature fold y = u·f + d of (u − rm)·γ/sqrt(rv + eps) + β, and the statistics
// output, which in eval mode is the running statistics (as the portable kernel writes them).
// u·f + d cancels where |rm| ≫ the spread of u, but only by a few f32 ulps of |u·f|, below the
// error that the GEMM's f32 accumulation already leaves in u.
template <class T>
__global__ void batch_norm_eval_fold_kernel(const FusedLinearArgs a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = a.n;
  if (c >= n) return;
  const int64_t r = 1 + a.has_scale;  // gamma, beta, running_mean, running_var
  const float mean = param<T>(a.params, r + 2, c), var = param<T>(a.params, r + 3, c);
  const BatchNormFold fold = batch_norm_fold(mean, var, param<T>(a.params, r, c), param<T>(a.params, r + 1, c), a.eps);
  a.workspace[c] = fold.factor;
  a.workspace[n + c] = fold.beta - fold.mean * fold.factor;
  a.stats[c] = mean;
  a.stats[n + c] = var;
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

// Per device: whether it is sm_90 and runs this file's sm_90a code (a build for other targets
// only would hand it a stub), and its SM count. Looked up once, then read without a lock: racing
// first calls compute the same values.
struct DeviceInfo {
  std::atomic<int> state{0};  // 0 unknown, 1 usable, -1 not
  std::atomic<int> sm_count{0};
  std::atomic<bool> slow_memory{false};  // see WIDE_BATCH_FAST_MEMORY_BYTES_PER_S
};
static DeviceInfo device_info[MAX_DEVICES];

bool usable_device(int* device, int* sm_count) {
  if (cudaGetDevice(device) != cudaSuccess || *device < 0 || *device >= MAX_DEVICES) {
    cudaGetLastError();
    return false;
  }
  DeviceInfo& info = device_info[*device];
  int state = info.state.load(std::memory_order_acquire);
  if (state == 0) {
    int major = 0, minor = 0, sms = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, *device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, *device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, *device) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, batch_norm_eval_fold_kernel<float>) == cudaSuccess;
    if (!ok) cudaGetLastError();  // a failed query only means "not taken"
    state = ok && major == 9 && minor == 0 && attr.binaryVersion == 90 && sms > 0 ? 1 : -1;
    // Peak memory bandwidth: two transfers per clock over the bus. A failed query keeps the
    // ping-pong tiles.
    int memory_khz = 0, bus_bits = 0;
    if (cudaDeviceGetAttribute(&memory_khz, cudaDevAttrMemoryClockRate, *device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, *device) != cudaSuccess) {
      cudaGetLastError();
    }
    const double bytes_per_s = 2.0 * 1e3 * memory_khz * (bus_bits / 8.0);
    info.slow_memory.store(bytes_per_s > 0 && bytes_per_s < WIDE_BATCH_FAST_MEMORY_BYTES_PER_S,
                           std::memory_order_relaxed);
    info.sm_count.store(sms, std::memory_order_relaxed);
    info.state.store(state, std::memory_order_release);
  }
  *sm_count = info.sm_count.load(std::memory_order_relaxed);
  return state == 1;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches the kernel of G. CUTLASS's GemmUniversalAdapter sets a function attribute in
// initialize() (the dynamic shared memory size) and another in run() (non-portable cluster
// sizes) on every call, about 3 µs of host time each on an H200, measured; when the GEMM is a
// forward's first kernel the GPU waits for all of it. Here the size is set once per device (in
// the primary context that Candle uses), and the clusters of two are portable, so they need no
// attribute.
// `workspace`: G's workspace (null when it takes none), initialised here.
template <class G>
cudaError_t launch_gemm(const typename G::Arguments& args, void* workspace, int device, cudaStream_t stream) {
  using Kernel = typename G::Kernel;
  using Cluster = typename G::Cluster;
  static_assert(cute::size(Cluster{}) <= 8, "cluster sizes above 8 need cudaFuncAttributeNonPortableClusterSizeAllowed");
  constexpr int smem_bytes = Kernel::SharedStorageSize;
  FUSED_TRY(allow_dynamic_smem<cutlass::device_kernel<Kernel>>(smem_bytes, device));
  if (workspace != nullptr) {
    // Zeroes the flags that order stream-K's sums (a memset on the stream).
    if (Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) {
      const cudaError_t error = cudaGetLastError();
      return error != cudaSuccess ? error : cudaErrorUnknown;
    }
  }
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, workspace);
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = cute::size<0>(Cluster{});
  cluster.val.clusterDim.y = cute::size<1>(Cluster{});
  cluster.val.clusterDim.z = cute::size<2>(Cluster{});
  cudaLaunchConfig_t config{};
  config.gridDim = Kernel::get_grid_shape(params);
  config.blockDim = Kernel::get_block_shape();
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  void* kernel_args[] = {&params};
  return cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>), kernel_args);
}

// The checks that need neither a device nor the pointers: element type and shape.
bool takes_shape(const FusedLinearArgs& a) {
  const bool element = a.dtype == FUSED_BF16 || a.dtype == FUSED_F16 || a.dtype == FUSED_F32;
  return element && a.m >= 1 && a.n >= 8 && a.k >= 8 && a.n % 8 == 0 && a.k % 8 == 0 && a.m <= INT32_MAX &&
         a.n <= INT32_MAX && a.k <= INT32_MAX;
}

// The checks that need no device: element type, shape, alignment, epilogue.
bool takes_problem(const FusedLinearArgs& a) {
  const bool aligned = aligned16(a.x) && aligned16(a.w) && aligned16(a.y) && aligned16(a.z);
  const bool epilogue = a.activation >= ACT_IDENTITY && a.activation <= ACT_TANH &&
                        a.params.count >= param_rows_needed(a);
  // Both BatchNorm modes keep their folds or partials in the workspace; the eval fold also writes
  // the statistics (train mode writes them after the GEMM, in fused_linear_batch_norm_finish).
  const bool batch_norm = a.batch_norm == FUSED_BN_NONE ||
                          (a.batch_norm == FUSED_BN_EVAL && a.stats != nullptr && a.workspace != nullptr) ||
                          (a.batch_norm == FUSED_BN_TRAIN && a.workspace != nullptr);
  return takes_shape(a) && aligned && epilogue && batch_norm;
}

// Launches `gemm` (a callable that enqueues the GEMM and returns its error) after the eval-mode
// BatchNorm's fold, when there is one. In train mode the GEMM leaves partial statistics over
// tiles of `row_tile` rows, which it reports in *stats_row_tile (when not null) for
// fused_linear_batch_norm_finish.
template <class F>
cudaError_t with_batch_norm(const FusedLinearArgs& a, int64_t row_tile, cudaStream_t stream, int64_t* stats_row_tile,
                            F gemm) {
  if (a.batch_norm == FUSED_BN_EVAL) {
    FUSED_TRY(with_dtype(a.dtype, [&](auto tag) {
      batch_norm_eval_fold_kernel<decltype(tag)><<<unsigned(ceil_div(a.n, 256)), 256, 0, stream>>>(a);
      return cudaGetLastError();
    }));
  }
  if (a.batch_norm == FUSED_BN_TRAIN && stats_row_tile != nullptr) *stats_row_tile = row_tile;
  return gemm();
}

// Builds and launches the GEMM (after the eval fold, when there is one). Returns false, having
// launched nothing, if CUTLASS does not take the arguments.
template <class T, class Config>
bool run_config(const FusedLinearArgs& a, int device, int sm_count, cudaStream_t stream, cudaError_t* status,
                int64_t* stats_row_tile = nullptr) {
  using G = Gemm<typename Cutlass<T>::type, Config>;
  using E = typename G::Element;
  const bool eval = a.batch_norm == FUSED_BN_EVAL, train = a.batch_norm == FUSED_BN_TRAIN;
  const typename G::Tree::Inputs in{a.params.count > 0 ? static_cast<const E*>(a.params.row[0]) : nullptr,
                                    a.has_scale ? static_cast<const E*>(a.params.row[1]) : nullptr,
                                    static_cast<E*>(a.z),
                                    eval ? a.workspace : nullptr,
                                    eval ? a.workspace + a.n : nullptr,
                                    train ? a.workspace : nullptr,
                                    PointwiseArguments{a.activation, a.has_scale ? 1.f : a.scale, a.residual != 0},
                                    a.m,
                                    a.n};
  const typename G::Arguments args = G::arguments(a, in, sm_count, device);
  if (G::Device::can_implement(args) != cutlass::Status::kSuccess) return false;
  // The GEMM's workspace follows the BatchNorm's in a.workspace (G::workspace_floats).
  const bool gemm_workspace = G::Device::get_workspace_size(args) != 0;
  *status = gemm_workspace && a.workspace == nullptr
                ? cudaErrorInvalidValue
                : with_batch_norm(a, G::stats_row_tile, stream, stats_row_tile, [&] {
                    return launch_gemm<G>(args, gemm_workspace ? a.workspace + G::batch_norm_floats(a) : nullptr,
                                          device, stream);
                  });
  return true;
}

// Whether stream-K can split the exact f32 GEMM's tiles of `a`: CUTLASS's scheduler keeps whole
// tiles of at most 8 k steps, and then runs slower than the plain persistent one (8% on the
// 32768x32768 weight gradient of SwishScale's train step, 4 k steps, on an H200).
bool splits_k(const FusedLinearArgs& a) {
  static_assert(ExactNarrowBatch::k_bytes == ExactWideBatch::k_bytes, "the exact configurations share a k step");
  constexpr int64_t k_step = ExactWideBatch::k_bytes / int64_t(sizeof(float));
  return ceil_div(a.k, k_step) > cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::min_iters_per_sk_unit_;
}

// Calls f(Config{}) with the tile configuration that runs `a`, whose elements are T, on `device`
// (known to usable_device).
template <class T, class F>
auto with_config(const FusedLinearArgs& a, int device, F f) {
  if constexpr (sizeof(T) == 4) {
    if (a.tf32 == 0) {
      if (a.m <= NARROW_BATCH_ROWS) return splits_k(a) ? f(ExactNarrowBatch{}) : f(ExactNarrowWholeTiles{});
      return splits_k(a) ? f(ExactWideBatch{}) : f(ExactWideWholeTiles{});
    }
  }
  if (a.m <= NARROW_BATCH_ROWS) return f(NarrowBatch{});
  if (!device_info[device].slow_memory.load(std::memory_order_relaxed)) return f(WideBatch{});
  if constexpr (sizeof(T) == 2) {
    return f(WideBatchSlowMemory16Bit{});
  } else {
    return f(WideBatchSlowMemory{});
  }
}

template <class T>
bool run(const FusedLinearArgs& a, int device, int sm_count, cudaStream_t stream, cudaError_t* status,
         int64_t* stats_row_tile) {
  return with_config<T>(a, device, [&](auto config) {
    return run_config<T, decltype(config)>(a, device, sm_count, stream, status, stats_row_tile);
  });
}

// Floats of workspace that the configuration which runs `a` (elements T) needs.
template <class T>
int64_t workspace_floats(const FusedLinearArgs& a, int sm_count, int device) {
  return with_config<T>(a, device, [&](auto config) {
    return Gemm<typename Cutlass<T>::type, decltype(config)>::workspace_floats(a, sm_count, device);
  });
}

}  // namespace sm90

// scripts/sm90_tile_sweep.cu includes this file for its pieces, without the entry points that
// instantiate every configuration.
#if !defined(FUSED_SM90_PIECES_ONLY)

bool linear_forward_sm90(const FusedLinearArgs& a, cudaStream_t stream, cudaError_t* status,
                        int64_t* stats_row_tile) {
  int device = 0, sm_count = 0;
  if (!sm90::takes_problem(a) || !sm90::usable_device(&device, &sm_count)) return false;
  if (exact_forward::takes(a, sm_count)) {
    *status = sm90::with_batch_norm(a, exact_forward::kRowTile, stream, stats_row_tile,
                                    [&] { return exact_forward::launch(a, device, stream); });
    return true;
  }
  return with_dtype(
      a.dtype,
      [&](auto tag) { return sm90::run<decltype(tag)>(a, device, sm_count, stream, status, stats_row_tile); }, false);
}

int64_t linear_sm90_workspace_floats(const FusedLinearArgs& a) {
  int device = 0, sm_count = 0;
  // Asked before the pointers are known: a launch that then falls to the portable kernel
  // leaves the GEMM's part unused.
  if (!sm90::takes_shape(a) || !sm90::usable_device(&device, &sm_count)) return 0;
  const int64_t cutlass = with_dtype(
      a.dtype, [&](auto tag) { return sm90::workspace_floats<decltype(tag)>(a, sm_count, device); }, int64_t(0));
  // The exact forward's kernel, where it takes the shape: unaligned pointers may still send the
  // launch to CUTLASS's GEMM, so the workspace serves either.
  return exact_forward::takes_shape(a, sm_count) ? std::max(cutlass, exact_forward::workspace_floats(a)) : cutlass;
}

#endif  // !FUSED_SM90_PIECES_ONLY

}  // namespace fused

#else  // !FUSED_SM90: built without the sm_90a target (or CUTLASS); the portable path runs.

namespace fused {

bool linear_forward_sm90(const FusedLinearArgs&, cudaStream_t, cudaError_t*, int64_t*) { return false; }

int64_t linear_sm90_workspace_floats(const FusedLinearArgs&) { return 0; }

}  // namespace fused

#endif
