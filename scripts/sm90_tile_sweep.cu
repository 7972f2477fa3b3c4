// Times the Hopper GEMM of cuda-kernels/linear_sm90.cu, epilogue included, in its production
// tile configurations and in alternatives, next to cuBLAS's bare GEMM of the same shape: the
// evidence behind the configurations that the crate ships. Built by scripts/sm90-tile-sweep.sh,
// run on the GPU machine by `scripts/gpu-run.sh tiles`.
//
// Problems: SigmoidResidual's epilogue at 1024×8192→8192 in bf16 and TF32, SwishScale's at
// 128×32768→32768 in bf16 and TF32 (the narrow-batch configuration), the weight gradient of
// that SwishScale's train step in bf16 and TF32 (cuBLAS's, CUTLASS's and the crate's own kernel
// of weight_grad_sm90.cu with its alternatives), the exact f32
// GEMM's two ways of sharing tiles between CTAs against the register-operand kernel of
// linear_exact_sm90.cu, and the exact f32 input gradient of that
// SwishScale's train step (the kernel of input_grad_sm90.cu in its pipeline depths, the general
// path's transpose and GEMM, and cuBLAS). Each line is the median of 40 launches after 5
// warm-up ones, timed by CUDA events.
#define FUSED_SM90_PIECES_ONLY
#include "linear_sm90.cu"
#include "input_grad_sm90.cu"
#include "linear_exact_sm90.cu"
#include "weight_grad_sm90.cu"

#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

namespace fused::sm90 {

// Alternatives to the production configurations (WideBatch, WideBatchSlowMemory,
// WideBatchSlowMemory16Bit, NarrowBatch).
template <class T>
constexpr int kNarrow128x256KBytes = sizeof(T) == 4 ? 64 : 128;
using AutoTile = cutlass::epilogue::collective::EpilogueTileAuto;
using NarrowTile = Shape<_128, cute::_16>;
using WideCooperative256x128 = TileConfig<Cooperative<256, 128>, Shape<_2, _1, _1>, AutoTile, 128>;
using WidePingPongClusterN = TileConfig<PingPong, Shape<_1, _2, _1>, AutoTile, 128>;
// The narrow batch's tiles with other k steps: each stage reads `KBytes` contiguous bytes of
// every row of w in the tile, where NarrowBatch (128x128) reads 256.
template <int KBytes>
using Narrow128x256 = TileConfig<Cooperative<128, 256>, Shape<_1, _2, _1>, NarrowTile, KBytes>;
template <int KBytes>
using Narrow128x128 = TileConfig<Cooperative<128, 128>, Shape<_1, _2, _1>, NarrowTile, KBytes>;
using Narrow128x256NoCluster =
    TileConfig<Cooperative<128, 256>, Shape<_1, _1, _1>, NarrowTile, kNarrow128x256KBytes<float>>;
// The shipped tile with x's tile multicast to four CTAs, and with its last wave's k steps spread
// over every SM (256 tiles at n = 32768 are 1.94 waves of 132).
using Narrow128x128Cluster4 =
    TileConfig<Cooperative<128, 128>, Shape<_1, cute::_4, _1>, NarrowTile, NarrowBatch::k_bytes>;
using Narrow128x128StreamK =
    TileConfig<Cooperative<128, 128>, Shape<_1, _2, _1>, NarrowTile, NarrowBatch::k_bytes, OneProduct, StreamK>;
// The 128x256 tiles at n = 32768 are 128, which leave 4 of 132 SMs idle; stream-K spreads their
// k steps over every SM.
template <class T>
using NarrowStreamK =
    TileConfig<Cooperative<128, 256>, Shape<_1, _2, _1>, NarrowTile, kNarrow128x256KBytes<T>, OneProduct, StreamK>;
// Clusters of four along n: x's tile multicast to four CTAs instead of two, halving x's reads
// from L2 again (x is read once per column of tiles).
template <class T>
using NarrowCluster4 = TileConfig<Cooperative<128, 256>, Shape<_1, cute::_4, _1>, NarrowTile, kNarrow128x256KBytes<T>>;
template <class T>
using NarrowStreamKNoCluster =
    TileConfig<Cooperative<128, 256>, Shape<_1, _1, _1>, NarrowTile, kNarrow128x256KBytes<T>, OneProduct, StreamK>;
// The weight gradient's alternatives: larger epilogue subtiles, so that more of the output is in
// flight in TMA stores (CUTLASS keeps two subtiles in flight).
using Store128x64Cooperative128x256 = TileConfig<Cooperative<128, 256>, Shape<_2, _1, _1>, Shape<_128, cute::_64>, 128>;
using Store128x64Cooperative128x256NoCluster =
    TileConfig<Cooperative<128, 256>, Shape<_1, _1, _1>, Shape<_128, cute::_64>, 128>;
using Store128x64Cooperative128x128 = TileConfig<Cooperative<128, 128>, Shape<_2, _1, _1>, Shape<_128, cute::_64>, 128>;
using Store128x32Cooperative128x128 = TileConfig<Cooperative<128, 128>, Shape<_2, _1, _1>, Shape<_128, cute::_32>, 128>;
using Store64x64PingPong = TileConfig<PingPong, Shape<_2, _1, _1>, Shape<cute::_64, cute::_64>, 128>;

// The weight-gradient kernel's alternatives (weight_grad_sm90.cu): strip width, dz tiles in
// flight, output subtiles per consumer and their width in 128-byte rows. TF32:
using WeightGradStrip256 = weight_grad::Config<float, 256, 2, 2, 1>;
using WeightGradDeep = weight_grad::Config<float, 128, 4, 2, 1>;
using WeightGradManyBuffers = weight_grad::Config<float, 128, 2, 6, 1>;
// f16 and bf16:
template <class T>
using WeightGrad16Strip128 = weight_grad::Config<T, 128, 2, 3, 2>;
template <class T>
using WeightGrad16Strip128Deep = weight_grad::Config<T, 128, 4, 3, 2>;
template <class T>
using WeightGrad16Deep = weight_grad::Config<T, 256, 4, 2, 2>;
template <class T>
using WeightGrad16Narrow = weight_grad::Config<T, 256, 2, 4, 1>;
template <class T>
using WeightGrad16Deep3 = weight_grad::Config<T, 256, 4, 3, 2>;
template <class T>
using WeightGrad16Deeper = weight_grad::Config<T, 256, 6, 2, 2>;
template <class T>
using WeightGrad16DeepNarrow = weight_grad::Config<T, 256, 4, 4, 1>;
template <class T>
using WeightGrad16DeeperNarrow = weight_grad::Config<T, 256, 6, 3, 1>;
template <class T>
using WeightGrad16Wide = weight_grad::Config<T, 256, 2, 2, 4>;
template <class T>
using WeightGrad16TwoTiles = weight_grad::Config<T, 256, 2, 3, 2>;

// The input-gradient kernel's alternatives (input_grad_sm90.cu): other numbers of stages in
// flight (W's and dz's tiles, and in exact f32 dz's remainders': 48 KB a stage in exact f32, 32 KB
// in TF32; five and eight do not fit in shared memory).
using InputGradExact2 = input_grad::Config<2, true>;
using InputGradExact3 = input_grad::Config<3, true>;
using InputGradTf32x4 = input_grad::Config<4, false>;
using InputGradTf32x7 = input_grad::Config<7, false>;

// Median milliseconds of `launch` over 40 runs after 5 warm-up runs.
template <class F>
float median_ms(F&& launch) {
  for (int i = 0; i < 5; ++i) launch();
  cudaEvent_t start, end;
  cudaEventCreate(&start);
  cudaEventCreate(&end);
  std::vector<float> times;
  for (int i = 0; i < 40; ++i) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(end);
    cudaEventSynchronize(end);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, end);
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void report(const char* name, const FusedLinearArgs& a, float ms) {
  const double flops = 2.0 * double(a.m) * double(a.n) * double(a.k);
  printf("  %-44s %9.1f us  %6.0f TFLOP/s\n", name, ms * 1e3, flops / (ms * 1e-3) * 1e-12);
}

template <class T, class Config>
void time_config(const char* name, FusedLinearArgs a) {
  int device = 0, sm_count = 0;
  cudaError_t status = cudaSuccess;
  if (!usable_device(&device, &sm_count)) {
    printf("  %-44s not taken\n", name);
    return;
  }
  using G = Gemm<typename Cutlass<T>::type, Config>;
  const int64_t workspace_floats = G::workspace_floats(a, sm_count, device);
  a.workspace = nullptr;
  if (workspace_floats > 0 && cudaMalloc(&a.workspace, workspace_floats * sizeof(float)) != cudaSuccess) {
    printf("  %-44s no memory for its workspace\n", name);
    return;
  }
  if (!run_config<T, Config>(a, device, sm_count, nullptr, &status)) {
    printf("  %-44s not taken\n", name);
    cudaFree(a.workspace);
    return;
  }
  const float ms = median_ms([&] { run_config<T, Config>(a, device, sm_count, nullptr, &status); });
  cudaFree(a.workspace);
  if (status != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    printf("  %-44s failed: %s\n", name, cudaGetErrorString(status != cudaSuccess ? status : cudaGetLastError()));
    return;
  }
  report(name, a, ms);
}

// cuBLAS's y = x·wᵀ without an epilogue, in the problem's precision.
void time_cublas(cublasHandle_t handle, const FusedLinearArgs& a) {
  const float alpha = 1.f, beta = 0.f;
  const bool bf16 = a.dtype == FUSED_BF16;
  const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = bf16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
  const int m = int(a.m), n = int(a.n), k = int(a.k);
  const float ms = median_ms([&] {
    cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, a.w, type, k, a.x, type, k, &beta, a.y, type, n,
                 compute, CUBLAS_GEMM_DEFAULT);
  });
  report("cuBLAS, GEMM only", a, ms);
}

// Uniform values in [-scale, scale), from a hash of the index.
template <class T>
__global__ void fill_kernel(T* p, int64_t count, uint32_t seed, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = from_float<T>(scale * (float(h & 0xffffu) / 32768.f - 1.f));
  }
}

template <class T>
T* random_buffer(int64_t count, uint32_t seed, float scale) {
  T* p = nullptr;
  if (cudaMalloc(&p, count * sizeof(T)) != cudaSuccess) return nullptr;
  fill_kernel<T><<<1024, 256>>>(p, count, seed, scale);
  return p;
}

// A problem with a bias and the given activation, scalar factor 2 and residual.
template <class T>
FusedLinearArgs problem(int64_t m, int64_t n, int64_t k, int activation, int residual) {
  FusedLinearArgs a{};
  a.m = m;
  a.n = n;
  a.k = k;
  a.x = random_buffer<T>(m * k, 1, 1.f);
  a.w = random_buffer<T>(n * k, 2, 1.f / 128.f);
  a.params.row[0] = random_buffer<T>(n, 3, 0.1f);
  a.params.count = 1;
  a.y = random_buffer<T>(m * n, 4, 0.f);
  a.dtype = sizeof(T) == 4 ? FUSED_F32 : FUSED_BF16;
  a.tf32 = 1;
  a.activation = activation;
  a.residual = residual;
  a.scale = 2.f;
  return a;
}

void release(FusedLinearArgs& a) {
  cudaFree(const_cast<void*>(a.x));
  cudaFree(const_cast<void*>(a.w));
  cudaFree(const_cast<void*>(a.params.row[0]));
  cudaFree(a.y);
}

// cuBLAS, the wide-batch configuration (`wide_name`) and its alternatives on `a`.
template <class T>
void time_wide_configs(cublasHandle_t handle, const FusedLinearArgs& a, const char* wide_name) {
  time_cublas(handle, a);
  time_config<T, WideBatch>(wide_name, a);
  time_config<T, WidePingPongClusterN>("ping-pong 128x128, cluster 1x2", a);
  time_config<T, WideBatchSlowMemory>("cooperative 128x256, cluster 2x1 (slow, TF32)", a);
  time_config<T, WideCooperative256x128>("cooperative 256x128, cluster 2x1", a);
  time_config<T, WideBatchSlowMemory16Bit>("cooperative 256x128, cluster 1x2 (slow, 16-bit)", a);
}

// The wide-batch alternatives on SigmoidResidual's epilogue at 1024×8192→8192, in T.
template <class T>
void sweep_wide(cublasHandle_t handle, const char* precision) {
  FusedLinearArgs a = problem<T>(1024, 8192, 8192, ACT_SIGMOID, 1);
  printf("%s 1024x8192->8192, SigmoidResidual epilogue, k step %d\n", precision, 128 / int(sizeof(T)));
  time_wide_configs<T>(handle, a, "ping-pong 128x128, cluster 2x1 (fast memory)");
  release(a);
}

// The weight-gradient kernel of configuration C on the sweep's weight-gradient problem a, whose k
// is the batch: its x and w are the transposed copies dzᵀ and xᵀ in TF32, and, of the same
// sizes, dz and x as they lie in f16 and bf16.
template <class C>
void time_weight_grad_kernel(const char* name, const FusedLinearArgs& a) {
  using T = typename C::Element;
  const weight_grad::Problem<T> g{static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<T*>(a.y), a.k,
                                  a.m, a.n};
  int device = 0, sm_count = 0;
  if (!weight_grad::takes(g) || !usable_device(&device, &sm_count)) {
    printf("  %-44s not taken\n", name);
    return;
  }
  const float ms = median_ms([&] { weight_grad::launch<C>(g, device, sm_count, nullptr); });
  const cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) {
    printf("  %-44s failed: %s\n", name, cudaGetErrorString(status));
    return;
  }
  report(name, a, ms);
}

// A weight gradient dW = dzᵀ·x of SwishScale's train step, as the fused GEMM would take it from
// the transposed copies: 32768×32768 outputs from a 128-deep contraction (the batch), no
// epilogue. Writing dW bounds it (2.15 GB in bf16: 0.51 ms at the measured copy rate), so the
// epilogue's stores are tried with larger subtiles too.
template <class T>
void sweep_weight_grad(cublasHandle_t handle, const char* precision) {
  FusedLinearArgs a = problem<T>(32768, 32768, 128, ACT_IDENTITY, 0);
  cudaFree(const_cast<void*>(a.params.row[0]));
  a.params = FusedParamRows{};
  a.scale = 1.f;
  printf("%s weight gradient 32768x32768, k 128, no epilogue\n", precision);
  time_wide_configs<T>(handle, a, "ping-pong 128x128, cluster 2x1 (wide batch)");
  if constexpr (sizeof(T) == 2) {  // in f32 these leave the mainloop fewer than two stages
    time_config<T, Store128x64Cooperative128x256>("cooperative 128x256, cluster 2x1, store 128x64", a);
    time_config<T, Store128x64Cooperative128x256NoCluster>("cooperative 128x256, no cluster, store 128x64", a);
  }
  time_config<T, Store128x64Cooperative128x128>("cooperative 128x128, cluster 2x1, store 128x64", a);
  time_config<T, Store128x32Cooperative128x128>("cooperative 128x128, cluster 2x1, store 128x32", a);
  time_config<T, Store64x64PingPong>("ping-pong 128x128, cluster 2x1, store 64x64", a);
  if constexpr (sizeof(T) == 2) {
    time_weight_grad_kernel<typename weight_grad::Shipped<T>::type>(
        "weight-grad kernel, strip 256, 4 tiles, 1x32 KB out (shipped)", a);
    time_weight_grad_kernel<WeightGrad16TwoTiles<T>>("weight-grad kernel, strip 256, 3x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16Strip128<T>>("weight-grad kernel, strip 128, 3x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16Strip128Deep<T>>("weight-grad kernel, strip 128, 4 tiles, 3x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16Deep<T>>("weight-grad kernel, strip 256, 4 tiles, 2x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16Narrow<T>>("weight-grad kernel, strip 256, 4x8 KB out", a);
    time_weight_grad_kernel<WeightGrad16Deep3<T>>("weight-grad kernel, strip 256, 4 tiles, 3x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16Deeper<T>>("weight-grad kernel, strip 256, 6 tiles, 2x16 KB out", a);
    time_weight_grad_kernel<WeightGrad16DeepNarrow<T>>("weight-grad kernel, strip 256, 4 tiles, 4x8 KB out", a);
    time_weight_grad_kernel<WeightGrad16DeeperNarrow<T>>("weight-grad kernel, strip 256, 6 tiles, 3x8 KB out", a);
    time_weight_grad_kernel<WeightGrad16Wide<T>>("weight-grad kernel, strip 256, 2x32 KB out", a);
  }
  if constexpr (sizeof(T) == 4) {
    time_weight_grad_kernel<weight_grad::Shipped<float>::type>("weight-grad kernel, strip 128, 3x16 KB out (shipped)",
                                                               a);
    time_weight_grad_kernel<WeightGradStrip256>("weight-grad kernel, strip 256, 2x8 KB out", a);
    time_weight_grad_kernel<WeightGradDeep>("weight-grad kernel, strip 128, 4 tiles, 2x8 KB out", a);
    time_weight_grad_kernel<WeightGradManyBuffers>("weight-grad kernel, strip 128, 6x8 KB out", a);
  }
  release(a);
}

// The narrow-batch alternatives on SwishScale's epilogue at 128×32768→32768, in T.
template <class T>
void sweep_narrow(cublasHandle_t handle, const char* precision) {
  FusedLinearArgs a = problem<T>(128, 32768, 32768, ACT_SILU, 0);
  printf("%s 128x32768->32768, SwishScale epilogue\n", precision);
  time_cublas(handle, a);
  time_config<T, NarrowBatch>("cooperative 128x128, k 256 B, cluster 1x2 (shipped)", a);
  time_config<T, Narrow128x128Cluster4>("cooperative 128x128, k 256 B, cluster 1x4", a);
  time_config<T, Narrow128x128StreamK>("cooperative 128x128, k 256 B, cluster 1x2, stream-K", a);
  time_config<T, Narrow128x128<128>>("cooperative 128x128, k 128 B, cluster 1x2", a);
  time_config<T, Narrow128x256<128>>("cooperative 128x256, k 128 B, cluster 1x2", a);
  if constexpr (sizeof(T) == 2) {  // in f32, 128x256 tiles with 256-byte steps leave one stage
    time_config<T, Narrow128x256<256>>("cooperative 128x256, k 256 B, cluster 1x2", a);
  } else {
    time_config<T, Narrow128x256<64>>("cooperative 128x256, k 64 B, cluster 1x2", a);
    time_config<T, Narrow128x128<64>>("cooperative 128x128, k 64 B, cluster 1x2", a);
    time_config<T, Narrow128x256NoCluster>("cooperative 128x256, k 64 B, no cluster", a);
  }
  time_config<T, NarrowCluster4<T>>("cooperative 128x256, cluster 1x4", a);
  time_config<T, NarrowStreamK<T>>("cooperative 128x256, cluster 1x2, stream-K", a);
  time_config<T, NarrowStreamKNoCluster<T>>("cooperative 128x256, no cluster, stream-K", a);
  release(a);
}

// The exact f32 forward of linear_exact_sm90.cu on `a`, its pass over x included.
void time_exact_forward(const char* name, FusedLinearArgs a) {
  int device = 0, sm_count = 0;
  if (!usable_device(&device, &sm_count) || !fused::exact_forward::takes_shape(a, sm_count)) {
    printf("  %-44s not taken\n", name);
    return;
  }
  if (cudaMalloc(&a.workspace, fused::exact_forward::workspace_floats(a) * sizeof(float)) != cudaSuccess) {
    printf("  %-44s no memory for its workspace\n", name);
    return;
  }
  cudaError_t status = cudaSuccess;
  const float ms = median_ms([&] { status = fused::exact_forward::launch(a, device, nullptr); });
  cudaFree(a.workspace);
  if (status != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    printf("  %-44s failed: %s\n", name, cudaGetErrorString(status != cudaSuccess ? status : cudaGetLastError()));
    return;
  }
  report(name, a, ms);
}

// The exact f32 GEMM with whole tiles per CTA and with stream-K's split of the last two waves
// (shipped), on SigmoidResidual's 1024×8192→8192 forward (512 tiles: 3.88 waves of 132), on
// the weight gradient of its train step (8192×8192 from a 1024-deep contraction: 4096 tiles,
// 31.03 waves) and on SwishScale's 128×32768→32768 forward (256 tiles: 1.94 waves).
void sweep_exact() {
  struct Case {
    const char* title;
    int64_t m, n, k;
    int activation, residual;
  };
  const Case cases[] = {
      {"exact f32 1024x8192->8192, SigmoidResidual epilogue", 1024, 8192, 8192, ACT_SIGMOID, 1},
      {"exact f32 weight gradient 8192x8192, k 1024, no epilogue", 8192, 8192, 1024, ACT_IDENTITY, 0},
      {"exact f32 128x32768->32768, SwishScale epilogue", 128, 32768, 32768, ACT_SILU, 0},
  };
  for (const Case& c : cases) {
    FusedLinearArgs a = problem<float>(c.m, c.n, c.k, c.activation, c.residual);
    a.tf32 = 0;
    printf("%s\n", c.title);
    time_exact_forward("register-operand kernel (shipped where taken)", a);
    if (c.m <= NARROW_BATCH_ROWS) {
      time_config<float, ExactNarrowBatch>("cooperative 128x128, cluster 1x2, stream-K", a);
      time_config<float, ExactNarrowWholeTiles>("cooperative 128x128, cluster 1x2, whole tiles", a);
    } else {
      time_config<float, ExactWideBatch>("cooperative 128x128, cluster 2x1, stream-K", a);
      time_config<float, ExactWideWholeTiles>("cooperative 128x128, cluster 2x1, whole tiles", a);
    }
    release(a);
  }
}

// The input-gradient kernel of configuration C on the input gradient dx = dz·W of problem a,
// whose x is dz, w is W and y is dx (a square problem: n and k may be read either way).
template <class C>
void time_input_grad_kernel(const char* name, const FusedLinearArgs& a, float* dz_part) {
  const input_grad::Problem g{static_cast<const float*>(a.x), static_cast<const float*>(a.w), static_cast<float*>(a.y),
                              dz_part, a.m, a.k, a.n};
  int device = 0, sm_count = 0;
  if (!usable_device(&device, &sm_count) || !input_grad::takes(g, sm_count)) {
    printf("  %-44s not taken\n", name);
    return;
  }
  const float ms = median_ms([&] { input_grad::launch<C>(g, device, nullptr); });
  const cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) {
    printf("  %-44s failed: %s\n", name, cudaGetErrorString(status));
    return;
  }
  report(name, a, ms);
}

// The f32 input gradients of SwishScale's train step, dx (128, 32768) = dz (128, 32768) · W
// (32768, 32768), and of the 1024x8192->8192 ones, dx (1024, 8192) = dz (1024, 8192) · W (8192,
// 8192): the kernel that reads W as it lies, in exact f32 against the general path (W's
// transposed copy, then the 3xTF32 GEMM from it) and cuBLAS fp32, and in TF32 against cuBLAS
// TF32.
template <class GeneralPath>
void sweep_input_grad_problem(cublasHandle_t handle, int64_t batch, int64_t width) {
  FusedLinearArgs a = problem<float>(batch, width, width, ACT_IDENTITY, 0);
  cudaFree(const_cast<void*>(a.params.row[0]));
  a.params = FusedParamRows{};
  a.scale = 1.f;
  a.tf32 = 0;
  printf("f32 input gradient %lldx%lld from W %lldx%lld\n", (long long)batch, (long long)width, (long long)width,
         (long long)width);
  float* dz_part = random_buffer<float>(a.m * a.k, 5, 0.f);
  time_input_grad_kernel<input_grad::ShippedExact>("exact: input-grad kernel, 4 stages (shipped)", a, dz_part);
  time_input_grad_kernel<InputGradExact3>("exact: input-grad kernel, 3 stages", a, dz_part);
  time_input_grad_kernel<InputGradExact2>("exact: input-grad kernel, 2 stages", a, dz_part);
  time_input_grad_kernel<input_grad::ShippedTf32>("TF32: input-grad kernel, 6 stages (shipped)", a, dz_part);
  time_input_grad_kernel<InputGradTf32x4>("TF32: input-grad kernel, 4 stages", a, dz_part);
  time_input_grad_kernel<InputGradTf32x7>("TF32: input-grad kernel, 7 stages", a, dz_part);
  cudaFree(dz_part);
  float* w_t = random_buffer<float>(a.n * a.k, 6, 0.f);
  const float transpose_ms = median_ms([&] { fused_transpose(a.w, w_t, a.n, a.k, FUSED_F32, nullptr); });
  cudaFree(w_t);
  printf("  %-44s %9.1f us\n", "exact: general path, W's transposed copy", transpose_ms * 1e3);
  time_config<float, GeneralPath>("exact: general path, 3xTF32 GEMM from it", a);
  const float alpha = 1.f, beta = 0.f;
  const int m = int(a.m), n = int(a.k), k = int(a.n);
  for (const auto& [mode, name] : {std::pair{CUBLAS_COMPUTE_32F_PEDANTIC, "exact: cuBLAS fp32"},
                                   std::pair{CUBLAS_COMPUTE_32F_FAST_TF32, "TF32: cuBLAS TF32"}}) {
    const cublasComputeType_t compute = mode;  // a lambda may not capture a structured binding (C++17)
    const float ms = median_ms([&] {
      cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, k, m, n, &alpha, a.w, CUDA_R_32F, k, a.x, CUDA_R_32F, n, &beta,
                   a.y, CUDA_R_32F, k, compute, CUBLAS_GEMM_DEFAULT);
    });
    report(name, a, ms);
  }
  release(a);
}

void sweep_input_grad(cublasHandle_t handle) {
  sweep_input_grad_problem<ExactNarrowBatch>(handle, 128, 32768);
  sweep_input_grad_problem<ExactWideBatch>(handle, 1024, 8192);
}

// Runs the named parts (wide, narrow, weight-grad, exact, input-grad), or all of them.
int sweep(int argc, char** argv) {
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    printf("cuBLAS could not start\n");
    return 1;
  }
  const auto wanted = [&](const char* part) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i) {
      if (strcmp(argv[i], part) == 0) return true;
    }
    return false;
  };
  if (wanted("wide")) {
    sweep_wide<__nv_bfloat16>(handle, "bf16");
    sweep_wide<float>(handle, "tf32");
  }
  if (wanted("narrow")) {
    sweep_narrow<__nv_bfloat16>(handle, "bf16");
    sweep_narrow<float>(handle, "tf32");
  }
  if (wanted("weight-grad")) {
    sweep_weight_grad<__nv_bfloat16>(handle, "bf16");
    sweep_weight_grad<float>(handle, "tf32");
  }
  if (wanted("exact")) sweep_exact();
  if (wanted("input-grad")) sweep_input_grad(handle);
  cublasDestroy(handle);
  const cudaError_t last = cudaDeviceSynchronize();
  printf("%s\n", last == cudaSuccess ? "done" : cudaGetErrorString(last));
  return last == cudaSuccess ? 0 : 1;
}

}  // namespace fused::sm90

int main(int argc, char** argv) { return fused::sm90::sweep(argc, argv); }
