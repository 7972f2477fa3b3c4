// The fused linear forward: y = epilogue(x·wᵀ + bias) in one tensor-core GEMM kernel.
//
// Why one kernel: the GEMM's output tile is still in registers when the epilogue runs, so the
// bias, the activation, the scale, the residual and an eval-mode BatchNorm cost no extra pass
// over y. A training BatchNorm needs the statistics of whole columns, which no single block
// sees; the kernel therefore also reduces each (row tile, column) to (mean, M2) while the tile
// is in registers, and `batch_norm.cu` merges those partials and normalises y in light passes.
//
// The GEMM is the portable sm80+ design: both operands are K-major (x is (m, k), w is (n, k)),
// a block of 8 warps computes a 128x256 (16-bit) or 128x128 (f32) tile of y, k advances in
// 128-byte steps through a multi-stage cp.async pipeline in padded (bank-conflict-free) shared
// memory, and the warps multiply with mma.sync, loading the next fragments while the current
// ones multiply:
//   - f16/bf16: m16n8k16, fragments loaded with ldmatrix, f32 accumulation;
//   - f32, TF32: m16n8k8 on operands rounded to tf32;
//   - f32, exact (3xTF32): each operand is split into a tf32 "big" part and the tf32 rounding of
//     its remainder, and small·big + big·small + big·big recovers fp32 products (small·small is
//     below f32 resolution). The tensor cores' own accumulation truncates, which over a long k
//     costs more than the split gains, so each k step accumulates into a fresh register tile
//     that is then added to the running sum with an IEEE add.
// When k is not a multiple of one 16-byte vector, or an operand is not 16-byte aligned, a
// variant loads the tiles element by element with bounds checks; every shape is bounds-checked.
#include <type_traits>

#include "common.cuh"
#include "epilogue.cuh"
#include "linear_sm90.cuh"

namespace fused {

// How the tensor cores multiply.
enum MathMode { MATH_HALF = 0, MATH_TF32 = 1, MATH_3XTF32 = 2 };

// Block tile and pipeline depth. A k step spans 128 bytes of a row (full cache lines when
// streaming w); 16-bit warps own 64x64 of the output, f32 warps 64x32 (the 3xTF32 split needs
// the registers).
template <class T>
struct Tile {
  static constexpr bool WIDE = sizeof(T) == 2;
  static constexpr int BM = 128, BN = WIDE ? 256 : 128, BK = 128 / sizeof(T);
  static constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int STAGES = 3;
  static constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int LDS = BK + VEC;        // padded row: 16 extra bytes
  static constexpr int STAGE_ELEMS = (BM + BN) * LDS;
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_ELEMS * sizeof(T);
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy; src_bytes = 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The general loader, for any k and alignment: copies one 16-byte chunk of a row-major
// (rows, k) operand into shared memory element by element, elements [kc, kc + VEC) of row r,
// with zeros where they fall outside the matrix.
template <class T>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, int64_t r, int64_t rows, int64_t kc,
                                           int64_t k) {
  constexpr int VEC = 16 / sizeof(T);
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
  union {
    uint4 v;
    Bits e[VEC];
  } chunk;
  const Bits* s = reinterpret_cast<const Bits*>(src);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    chunk.e[e] = (r < rows && kc + e < k) ? s[r * k + kc + e] : Bits(0);
  }
  *reinterpret_cast<uint4*>(dst) = chunk.v;
}

// Loads the k-tile `kt` of x and w into one pipeline stage with the general loader.
template <class T>
__device__ __forceinline__ void load_stage(T* stage, const T* x, const T* w, int64_t row0, int64_t col0,
                                           int64_t kt, int64_t m, int64_t n, int64_t k) {
  using C = Tile<T>;
  constexpr int CPR = C::BK / C::VEC;  // chunks per row
  const int64_t k0 = kt * C::BK;
  for (int i = threadIdx.x; i < (C::BM + C::BN) * CPR; i += C::THREADS) {
    const int r = i / CPR, c = i % CPR;
    T* dst = stage + r * C::LDS + c * C::VEC;
    if (r < C::BM) {
      load_chunk<T>(dst, x, row0 + r, m, k0 + c * C::VEC, k);
    } else {
      load_chunk<T>(dst, w, col0 + r - C::BM, n, k0 + c * C::VEC, k);
    }
  }
}

// The fast loader, for 16-byte-aligned operands with k a multiple of a chunk. A k step of a
// row is 8 chunks, so thread i always copies chunk i % 8 of rows i / 8, i / 8 + 32, ...: the
// addresses are set up once per block and each k step only adds an offset, which keeps the
// integer work between the tensor-core instructions small.
template <class T>
struct TileLoader {
  using C = Tile<T>;
  static constexpr int CPR = C::BK / C::VEC;
  static constexpr int ROWS_PER_PASS = C::THREADS / CPR;
  static_assert(C::THREADS % CPR == 0 && C::BM % ROWS_PER_PASS == 0 && C::BN % ROWS_PER_PASS == 0,
                "the loader covers the tile in whole passes");
  const T* x;         // this thread's first x row, or x itself when that row is outside
  const T* w;         // likewise for w
  const T* x_base;    // any valid address, for the zero-filling copies
  const T* w_base;
  int64_t stride;     // ROWS_PER_PASS rows, in elements
  int x_rows, w_rows;  // passes whose row is inside the matrix
  int chunk;          // the chunk of the k step this thread copies
  int smem;           // offset of this thread's first chunk in a stage

  __device__ __forceinline__ TileLoader(const T* x_, const T* w_, int64_t row0, int64_t col0, int64_t m,
                                        int64_t n, int64_t k)
      : x_base(x_), w_base(w_), stride(ROWS_PER_PASS * k) {
    const int r = threadIdx.x / CPR;
    chunk = threadIdx.x % CPR;
    smem = r * C::LDS + chunk * C::VEC;
    x_rows = int(min(int64_t(C::BM / ROWS_PER_PASS), max(int64_t(0), ceil_div(m - row0 - r, ROWS_PER_PASS))));
    w_rows = int(min(int64_t(C::BN / ROWS_PER_PASS), max(int64_t(0), ceil_div(n - col0 - r, ROWS_PER_PASS))));
    x = x_rows > 0 ? x_ + (row0 + r) * k : x_;
    w = w_rows > 0 ? w_ + (col0 + r) * k : w_;
  }

  __device__ __forceinline__ void load(T* stage, int64_t kt, int64_t k) const {
    const int64_t kc = kt * C::BK + chunk * C::VEC;
    const bool k_inside = kc < k;
#pragma unroll
    for (int j = 0; j < C::BM / ROWS_PER_PASS; ++j) {
      const bool inside = k_inside && j < x_rows;
      cp_async16(stage + smem + j * ROWS_PER_PASS * C::LDS, inside ? x + kc + j * stride : x_base, inside ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < C::BN / ROWS_PER_PASS; ++j) {
      const bool inside = k_inside && j < w_rows;
      cp_async16(stage + smem + (C::BM + j * ROWS_PER_PASS) * C::LDS, inside ? w + kc + j * stride : w_base,
                 inside ? 16 : 0);
    }
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// f32 = big + small with both parts representable in tf32.
__device__ __forceinline__ void split_tf32(float f, uint32_t& big, uint32_t& small) {
  big = to_tf32(f);
  small = to_tf32(f - __uint_as_float(big));
}

// Loads the 16-bit A and B fragments of one 16-deep slice of the warp tile.
template <class T>
__device__ __forceinline__ void load_fragments_16(uint32_t (&a)[Tile<T>::MI][4], uint32_t (&b)[Tile<T>::NI][2],
                                                  const T* As, const T* Bs, int kk, int lane) {
  using C = Tile<T>;
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
    ldmatrix_x4(a[mi], As + (mi * 16 + (lane & 15)) * C::LDS + kk + (lane >> 4) * 8);
  }
#pragma unroll
  for (int ni = 0; ni < C::NI; ni += 2) {
    uint32_t r[4];
    ldmatrix_x4(r, Bs + (ni * 8 + (lane >> 4) * 8 + (lane & 7)) * C::LDS + kk + ((lane >> 3) & 1) * 8);
    b[ni][0] = r[0];
    b[ni][1] = r[1];
    b[ni + 1][0] = r[2];
    b[ni + 1][1] = r[3];
  }
}

// One BK-deep step of the warp tile, 16-bit operands.
template <class T>
__device__ __forceinline__ void warp_mma_stage_16(float (&acc)[Tile<T>::MI][Tile<T>::NI][4], const T* As,
                                                  const T* Bs, int lane) {
  using C = Tile<T>;
  uint32_t a[2][C::MI][4], b[2][C::NI][2];
  load_fragments_16<T>(a[0], b[0], As, Bs, 0, lane);
#pragma unroll
  for (int step = 0; step < C::BK / 16; ++step) {
    if (step + 1 < C::BK / 16) load_fragments_16<T>(a[(step + 1) & 1], b[(step + 1) & 1], As, Bs, (step + 1) * 16, lane);
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni) mma_16816(acc[mi][ni], a[step & 1][mi], b[step & 1][ni], T{});
  }
}

// One BK-deep step of the warp tile, f32 operands on the TF32 tensor cores.
template <MathMode MODE>
__device__ __forceinline__ void warp_mma_stage_f32(float (&acc)[Tile<float>::MI][Tile<float>::NI][4],
                                                   const float* As, const float* Bs, int lane) {
  using C = Tile<float>;
  const int g = lane >> 2, t = lane & 3;
  float part[C::MI][C::NI][4];  // 3xTF32: this step's sum, added to acc in IEEE f32
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[mi][ni][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < C::BK; kk += 8) {
    float af[C::MI][4], bf[C::NI][2];
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi) {
      const float* p = As + (mi * 16 + g) * C::LDS + kk + t;
      af[mi][0] = p[0];
      af[mi][1] = p[8 * C::LDS];
      af[mi][2] = p[4];
      af[mi][3] = p[8 * C::LDS + 4];
    }
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const float* p = Bs + (ni * 8 + g) * C::LDS + kk + t;
      bf[ni][0] = p[0];
      bf[ni][1] = p[4];
    }
    if constexpr (MODE == MATH_TF32) {
      uint32_t a[C::MI][4], b[C::NI][2];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[mi][e] = to_tf32(af[mi][e]);
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) b[ni][e] = to_tf32(bf[ni][e]);
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) mma_1688_tf32(acc[mi][ni], a[mi], b[ni]);
    } else {
      uint32_t a_big[C::MI][4], a_small[C::MI][4], b_big[C::NI][2], b_small[C::NI][2];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(af[mi][e], a_big[mi][e], a_small[mi][e]);
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) split_tf32(bf[ni][e], b_big[ni][e], b_small[ni][e]);
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) {
          mma_1688_tf32(part[mi][ni], a_small[mi], b_big[ni]);
          mma_1688_tf32(part[mi][ni], a_big[mi], b_small[ni]);
          mma_1688_tf32(part[mi][ni], a_big[mi], b_big[ni]);
        }
    }
  }
  if constexpr (MODE == MATH_3XTF32) {
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] += part[mi][ni][e];
  }
}

// Per-feature constants of the epilogue for one column.
struct ColumnEpilogue {
  float bias, scale;
  BatchNormFold bn;  // identity unless eval-mode BatchNorm
};

template <class T>
__device__ __forceinline__ ColumnEpilogue load_column(const FusedLinearArgs& a, int64_t c) {
  if (c >= a.n) return ColumnEpilogue{0.f, 0.f, no_batch_norm()};
  const FusedParamRows& p = a.params;
  ColumnEpilogue e{p.count > 0 ? param<T>(p, 0, c) : 0.f, a.has_scale ? param<T>(p, 1, c) : a.scale,
                   no_batch_norm()};
  if (a.batch_norm == FUSED_BN_EVAL) {
    const int64_t r = 1 + a.has_scale;  // gamma, beta, running_mean, running_var
    e.bn = batch_norm_fold(param<T>(p, r + 2, c), param<T>(p, r + 3, c), param<T>(p, r, c), param<T>(p, r + 1, c),
                           a.eps);
  }
  return e;
}

// Stores the two columns (c, c + 1) of one row, with one access when both exist and the pair
// is aligned (n even).
template <class T>
__device__ __forceinline__ void store_two(T* base, int64_t r, int64_t c, int64_t n, float v0, float v1) {
  T* p = base + r * n + c;
  if (c + 1 < n && (n & 1) == 0) {
    store_pair(p, v0, v1);
  } else {
    p[0] = from_float<T>(v0);
    if (c + 1 < n) p[1] = from_float<T>(v1);
  }
}

// Reduces `v` (one value per column held by this thread) over the rows of the block tile:
// first over the 8 lanes that share columns, then over the WARPS_M warps through `red`.
// Every thread gets the column totals back in `v`.
template <class T>
__device__ __forceinline__ void block_column_sum(float (&v)[Tile<T>::NI][2], float* red, int warp_m,
                                                 int wn_col, int lane) {
  using C = Tile<T>;
#pragma unroll
  for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) v[ni][j] += __shfl_xor_sync(0xffffffffu, v[ni][j], off);
    }
  if (lane < 4) {
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) red[warp_m * C::BN + wn_col + ni * 8 + 2 * lane + j] = v[ni][j];
  }
  __syncthreads();
#pragma unroll
  for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float s = 0.f;
#pragma unroll
      for (int wm = 0; wm < C::WARPS_M; ++wm) s += red[wm * C::BN + wn_col + ni * 8 + 2 * (lane & 3) + j];
      v[ni][j] = s;
    }
  __syncthreads();
}

// The epilogue of one warp's tile: z = acc + bias, u = epi(z), y = BN(u); stores y and z.
// In training, acc is left holding u as stored, for the statistics.
template <class T, class Epi>
__device__ __forceinline__ void store_tile(float (&acc)[Tile<T>::MI][Tile<T>::NI][4], const FusedLinearArgs& a,
                                           const Epi& epi, int64_t row0, int64_t warp_col0, int warp_m, int lane) {
  using C = Tile<T>;
  const int g = lane >> 2, t = lane & 3;
  const int64_t m = a.m, n = a.n;
  const bool train = a.batch_norm == FUSED_BN_TRAIN;
  T* y = static_cast<T*>(a.y);
  T* z_out = static_cast<T*>(a.z);
#pragma unroll
  for (int ni = 0; ni < C::NI; ++ni) {
    const int64_t c = warp_col0 + ni * 8 + 2 * t;
    const ColumnEpilogue col[2] = {load_column<T>(a, c), load_column<T>(a, c + 1)};
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + warp_m * C::WM + mi * 16 + g + 8 * h;
        float zv[2], uv[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // z as stored: the backward differentiates at it, and rebuilds u from it.
          zv[j] = rounded_to<T>(acc[mi][ni][2 * h + j] + col[j].bias);
          uv[j] = epi.apply(zv[j], col[j].scale);
          // Training keeps u, as stored, for the statistics: they then describe exactly the
          // values that batch_norm.cu normalises.
          if (train) acc[mi][ni][2 * h + j] = rounded_to<T>(uv[j]);
        }
        if (r < m && c < n) {
          store_two(y, r, c, n, col[0].bn.apply(uv[0]), col[1].bn.apply(uv[1]));
          if (z_out != nullptr) store_two(z_out, r, c, n, zv[0], zv[1]);
        }
      }
  }
}

template <class T, MathMode MODE, bool VECTOR>
__global__ void __launch_bounds__(Tile<T>::THREADS) linear_forward_kernel(const FusedLinearArgs a) {
  using C = Tile<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int64_t m = a.m, n = a.n, k = a.k;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
  const int64_t row0 = int64_t(blockIdx.x) * C::BM, col0 = int64_t(blockIdx.y) * C::BN;
  const int64_t k_tiles = ceil_div(k, C::BK);

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Pipeline: STAGES - 1 tiles in flight while one is multiplied.
  const TileLoader<T> loader(x, w, row0, col0, m, n, k);
  auto load = [&](int stage, int64_t kt) {
    if constexpr (VECTOR) {
      loader.load(smem + stage * C::STAGE_ELEMS, kt, k);
    } else {
      load_stage<T>(smem + stage * C::STAGE_ELEMS, x, w, row0, col0, kt, m, n, k);
    }
  };
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_commit();
  }
  int read_stage = 0, write_stage = C::STAGES - 1;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt is visible, and tile kt - 1's stage is free to refill
    if (kt + C::STAGES - 1 < k_tiles) load(write_stage, kt + C::STAGES - 1);
    cp_async_commit();
    write_stage = write_stage + 1 == C::STAGES ? 0 : write_stage + 1;
    const T* stage = smem + read_stage * C::STAGE_ELEMS;
    read_stage = read_stage + 1 == C::STAGES ? 0 : read_stage + 1;
    const T* As = stage + warp_m * C::WM * C::LDS;
    const T* Bs = stage + (C::BM + warp_n * C::WN) * C::LDS;
    if constexpr (MODE == MATH_HALF) {
      warp_mma_stage_16<T>(acc, As, Bs, lane);
    } else {
      warp_mma_stage_f32<MODE>(acc, As, Bs, lane);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused below

  // Epilogue. Thread (g, t) of the warp holds rows g and g + 8 of each 16-row fragment and
  // columns 2t, 2t + 1 of each 8-column fragment.
  const int g = lane >> 2, t = lane & 3;
  const int wn_col = warp_n * C::WN;
  const bool train = a.batch_norm == FUSED_BN_TRAIN;
  dispatch_epilogue(a.activation, a.residual != 0, [&](auto epi) {
    store_tile<T>(acc, a, epi, row0, col0 + wn_col, warp_m, lane);
  });

  if (a.batch_norm == FUSED_BN_EVAL && blockIdx.x == 0 && warp_m == 0 && g == 0) {
    // The statistics output is the running statistics, in f32.
    const int64_t rm = 3 + a.has_scale;
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t c = col0 + wn_col + ni * 8 + 2 * t + j;
        if (c < n) {
          a.stats[c] = param<T>(a.params, rm, c);
          a.stats[n + c] = param<T>(a.params, rm + 1, c);
        }
      }
  }

  if (train) {
    // Two-pass (mean, then squared deviations) statistics of u over this tile's valid rows:
    // exact enough that the merge across tiles (Chan) loses nothing.
    float* red = reinterpret_cast<float*>(smem_raw);
    const int64_t count = min(int64_t(C::BM), m - row0);
    float v[C::NI][2];
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float s = 0.f;
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t r = row0 + warp_m * C::WM + mi * 16 + g + 8 * h;
            if (r < m) s += acc[mi][ni][2 * h + j];
          }
        v[ni][j] = s;
      }
    block_column_sum<T>(v, red, warp_m, wn_col, lane);
    float mean[C::NI][2];
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        mean[ni][j] = v[ni][j] / float(count);
        float s = 0.f;
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t r = row0 + warp_m * C::WM + mi * 16 + g + 8 * h;
            const float d = acc[mi][ni][2 * h + j] - mean[ni][j];
            if (r < m) s += d * d;
          }
        v[ni][j] = s;
      }
    block_column_sum<T>(v, red, warp_m, wn_col, lane);
    if (warp_m == 0 && g == 0) {
      float* ws_mean = a.workspace + int64_t(blockIdx.x) * n;
      float* ws_m2 = a.workspace + (int64_t(gridDim.x) + blockIdx.x) * n;
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t c = col0 + wn_col + ni * 8 + 2 * t + j;
          if (c < n) {
            ws_mean[c] = mean[ni][j];
            ws_m2[c] = v[ni][j];
          }
        }
    }
  }
}

template <class T, MathMode MODE, bool VECTOR>
cudaError_t launch_linear_forward_kernel(const FusedLinearArgs& a, cudaStream_t stream) {
  using C = Tile<T>;
  int device = -1;
  FUSED_TRY(cudaGetDevice(&device));
  FUSED_TRY(allow_dynamic_smem<linear_forward_kernel<T, MODE, VECTOR>>(int(C::SMEM_BYTES), device));
  const dim3 grid(unsigned(ceil_div(a.m, C::BM)), unsigned(ceil_div(a.n, C::BN)));
  linear_forward_kernel<T, MODE, VECTOR><<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(a);
  return cudaGetLastError();
}

// The 16-byte operand loads need k in whole vectors and 16-byte aligned x and w.
template <class T, MathMode MODE>
cudaError_t launch_linear_forward(const FusedLinearArgs& a, cudaStream_t stream) {
  const bool aligned = a.k % Tile<T>::VEC == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  return aligned ? launch_linear_forward_kernel<T, MODE, true>(a, stream)
                 : launch_linear_forward_kernel<T, MODE, false>(a, stream);
}

// The row tile of the GEMM, which sets the number of partial statistics per column.
int64_t linear_row_tile(int32_t dtype) { return dtype == FUSED_F32 ? Tile<float>::BM : Tile<__half>::BM; }

cudaError_t batch_norm_train_finalize(const FusedLinearArgs& a, int64_t row_tile, cudaStream_t stream);
int64_t batch_norm_train_workspace_floats(int64_t m, int64_t n, int64_t row_tile);

}  // namespace fused

extern "C" int64_t fused_linear_workspace_floats(const FusedLinearArgs* a) {
  const int64_t portable = a->batch_norm == FUSED_BN_TRAIN
                               ? fused::batch_norm_train_workspace_floats(a->m, a->n, fused::linear_row_tile(a->dtype))
                               : 0;
  const int64_t sm90 = fused::linear_sm90_workspace_floats(*a);
  return portable > sm90 ? portable : sm90;
}

extern "C" cudaError_t fused_linear_forward(const FusedLinearArgs* a, cudaStream_t stream, int64_t* stats_row_tile) {
  using namespace fused;
  if (a->m < 1 || a->n < 1 || a->k < 1 || ceil_div(a->m, Tile<float>::BM) > INT32_MAX ||
      ceil_div(a->n, Tile<float>::BN) > 65535) {
    return cudaErrorInvalidValue;
  }
  if (a->batch_norm == FUSED_BN_EVAL && a->stats == nullptr) return cudaErrorInvalidValue;
  if (a->batch_norm == FUSED_BN_TRAIN && stats_row_tile == nullptr) return cudaErrorInvalidValue;
  if (a->params.count < fused::param_rows_needed(*a) || a->params.count > FUSED_MAX_PARAM_ROWS) {
    return cudaErrorInvalidValue;
  }
  for (int32_t r = 0; r < a->params.count; ++r) {
    if (a->params.row[r] == nullptr) return cudaErrorInvalidValue;
  }
  if (a->batch_norm == FUSED_BN_TRAIN && a->workspace == nullptr) return cudaErrorInvalidValue;
  // Hopper first: the wgmma/TMA kernel takes the aligned problems.
  cudaError_t sm90_status;
  if (linear_forward_sm90(*a, stream, &sm90_status, stats_row_tile)) return sm90_status;
  FUSED_TRY(with_dtype(a->dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      return launch_linear_forward<T, MATH_HALF>(*a, stream);
    } else {
      return a->tf32 ? launch_linear_forward<T, MATH_TF32>(*a, stream)
                     : launch_linear_forward<T, MATH_3XTF32>(*a, stream);
    }
  }));
  if (a->batch_norm == FUSED_BN_TRAIN) *stats_row_tile = linear_row_tile(a->dtype);
  return cudaSuccess;
}

extern "C" cudaError_t fused_linear_batch_norm_finish(const FusedLinearArgs* a, int64_t stats_row_tile,
                                                      cudaStream_t stream) {
  using namespace fused;
  if (a->batch_norm != FUSED_BN_TRAIN || a->m < 1 || a->n < 1 || a->stats == nullptr || a->workspace == nullptr ||
      a->params.count < fused::param_rows_needed(*a) || a->params.count > FUSED_MAX_PARAM_ROWS ||
      stats_row_tile < 1) {
    return cudaErrorInvalidValue;
  }
  return batch_norm_train_finalize(*a, stats_row_tile, stream);
}
