// Host time of kernel launches, by what a launch carries: the crate's Hopper GEMM is launched
// with cudaLaunchKernelExC, a cluster attribute, ~200 KB of dynamic shared memory and a
// parameter block of about 1 KB (CUTLASS's Params with its TMA descriptors); the small kernels
// around it with <<<>>>. An empty kernel stands in for each, so only the launch is timed.
//
// Per variant: "host", the median (and 10th/90th percentiles) over 300 launches of the host
// time inside the launch call, each launched onto an idle stream; "back-to-back", the host time
// per launch of 50 launches in a row; "events-around", the device time between events recorded
// before and after one launch onto an idle stream.
//
//   nvcc -O2 -std=c++17 -arch=sm_90a -o launch_cost scripts/launch_cost.cu -lcuda && ./launch_cost
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

// Returns 1 from the enclosing function, having printed the error, when a runtime call fails.
#define CK(x)                                                                 \
  do {                                                                        \
    const cudaError_t e = (x);                                                \
    if (e != cudaSuccess) {                                                   \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));        \
      return 1;                                                               \
    }                                                                         \
  } while (0)

// A parameter block of Bytes bytes, standing in for CUTLASS's Params.
template <int Bytes>
struct Blob {
  alignas(64) unsigned char b[Bytes];
};

// Reads its parameters and, given a null `out`, writes nothing.
template <int Bytes>
__global__ void empty_kernel(const __grid_constant__ Blob<Bytes> p, int* out) {
  if (p.b[threadIdx.x % Bytes] == 255 && out) out[blockIdx.x] = 1;
}

using Clock = std::chrono::steady_clock;
static double us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

struct Stat {
  double med, p10, p90;
};
static Stat stat(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[v.size() / 10], v[v.size() * 9 / 10]};
}

// Times `launch` (a callable that enqueues one launch on `s` and returns its cudaError_t) and
// prints one line; returns 1 if a launch or a CUDA call failed.
template <class F>
int measure(const char* name, cudaStream_t s, F launch) {
  for (int i = 0; i < 20; ++i) CK(launch());  // warm-up
  CK(cudaStreamSynchronize(s));
  std::vector<double> host, idle;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int rep = 0; rep < 300; ++rep) {
    CK(cudaEventRecord(e0, s));
    const auto t0 = Clock::now();
    CK(launch());
    const auto t1 = Clock::now();
    CK(cudaEventRecord(e1, s));
    CK(cudaStreamSynchronize(s));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    host.push_back(us(t0, t1));
    idle.push_back(ms * 1e3);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  // Back-to-back, the queue not empty: host time per launch over 50 launches in a row.
  std::vector<double> b2b;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = Clock::now();
    for (int i = 0; i < 50; ++i) CK(launch());
    const auto t1 = Clock::now();
    CK(cudaStreamSynchronize(s));
    b2b.push_back(us(t0, t1) / 50);
  }
  const Stat h = stat(host), d = stat(idle), b = stat(b2b);
  printf("%-58s host %5.2f us (p10 %5.2f p90 %5.2f)  back-to-back %5.2f  events-around %6.2f us\n", name, h.med,
         h.p10, h.p90, b.med, d.med);
  return 0;
}

int main() {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, sms);
  const int smem = 200 * 1024;
  CK(cudaFuncSetAttribute(empty_kernel<1024>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(empty_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  Blob<1024> big{};
  Blob<64> small{};
  const unsigned grid = unsigned(sms / 2 * 2);  // whole clusters of two
  const void* big_kernel = reinterpret_cast<const void*>(empty_kernel<1024>);
  const void* small_kernel = reinterpret_cast<const void*>(empty_kernel<64>);

  // As the crate launches its GEMM: cudaLaunchKernelExC, 384 threads, optionally clusters of two.
  auto launch_ex = [&](cudaStream_t s, const void* kernel, void* params, bool cluster, int dynamic_smem) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 2;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t c{};
    c.gridDim = dim3(grid);
    c.blockDim = dim3(384);
    c.dynamicSmemBytes = dynamic_smem;
    c.stream = s;
    c.attrs = cluster ? &attr : nullptr;
    c.numAttrs = cluster ? 1 : 0;
    int* out = nullptr;
    void* args[] = {params, &out};
    return cudaLaunchKernelExC(&c, kernel, args);
  };
  // As the crate launches its small kernels.
  auto launch_plain = [&](cudaStream_t s) {
    empty_kernel<64><<<256, 256, 0, s>>>(small, nullptr);
    return cudaGetLastError();
  };
  // The driver's launch on a function handle looked up once.
  CUfunction big_function;
  CK(cudaGetFuncBySymbol(reinterpret_cast<cudaFunction_t*>(&big_function), big_kernel));
  auto launch_driver = [&](cudaStream_t s, bool cluster) {
    CUlaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 2;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    CUlaunchConfig c{};
    c.gridDimX = grid;
    c.gridDimY = c.gridDimZ = 1;
    c.blockDimX = 384;
    c.blockDimY = c.blockDimZ = 1;
    c.sharedMemBytes = smem;
    c.hStream = reinterpret_cast<CUstream>(s);
    c.attrs = cluster ? &attr : nullptr;
    c.numAttrs = cluster ? 1 : 0;
    int* out = nullptr;
    void* args[] = {&big, &out};
    const CUresult result = cuLaunchKernelEx(&c, big_function, args, nullptr);
    if (result == CUDA_SUCCESS) return cudaSuccess;
    printf("cuLaunchKernelEx: driver error %d\n", int(result));
    return cudaErrorUnknown;
  };

  const cudaStream_t per_thread = cudaStreamPerThread;
  void* buf;
  CK(cudaMalloc(&buf, 1 << 20));
  const bool failed =
      measure("runtime Ex, 1 KB params, cluster 2, 200 KB smem", stream,
              [&] { return launch_ex(stream, big_kernel, &big, true, smem); }) ||
      measure("runtime Ex, 1 KB params, no cluster, 200 KB smem", stream,
              [&] { return launch_ex(stream, big_kernel, &big, false, smem); }) ||
      measure("runtime Ex, 1 KB params, cluster 2, no smem", stream,
              [&] { return launch_ex(stream, big_kernel, &big, true, 0); }) ||
      measure("runtime Ex, 64 B params, cluster 2, 200 KB smem", stream,
              [&] { return launch_ex(stream, small_kernel, &small, true, smem); }) ||
      measure("runtime Ex, 64 B params, no cluster, no smem", stream,
              [&] { return launch_ex(stream, small_kernel, &small, false, 0); }) ||
      measure("runtime <<<>>>, 64 B params, 256 blocks of 256", stream, [&] { return launch_plain(stream); }) ||
      measure("driver Ex (cached CUfunction), 1 KB params, cluster 2", stream,
              [&] { return launch_driver(stream, true); }) ||
      measure("driver Ex (cached CUfunction), 1 KB params, no cluster", stream,
              [&] { return launch_driver(stream, false); }) ||
      measure("per-thread stream: runtime Ex, 1 KB params, cluster 2", per_thread,
              [&] { return launch_ex(per_thread, big_kernel, &big, true, smem); }) ||
      measure("per-thread stream: runtime <<<>>> 64 B", per_thread, [&] { return launch_plain(per_thread); }) ||
      measure("cudaMemsetAsync 4 KB", stream, [&] { return cudaMemsetAsync(buf, 0, 4096, stream); });
  return failed ? 1 : 0;
}
