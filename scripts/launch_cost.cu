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
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); return 1; } } while (0)
#define CKD(x) do { CUresult e = (x); if (e != CUDA_SUCCESS) { printf("%s:%d driver error %d\n", __FILE__, __LINE__, int(e)); return 1; } } while (0)

template <int Bytes>
struct Blob { alignas(64) unsigned char b[Bytes]; };

template <int Bytes>
__global__ void kern(const __grid_constant__ Blob<Bytes> p, int* out) {
  if (p.b[threadIdx.x % Bytes] == 255 && out) out[blockIdx.x] = 1;
}

using Clock = std::chrono::steady_clock;
static double us(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::micro>(b - a).count(); }

struct Stat { double med, p10, p90; };
static Stat stat(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[v.size() / 10], v[v.size() * 9 / 10]};
}

template <class F>
int measure(const char* name, cudaStream_t s, F launch) {
  // Warm up.
  for (int i = 0; i < 20; ++i) if (launch() != 0) { printf("%s: launch failed\n", name); return 1; }
  CK(cudaStreamSynchronize(s));
  std::vector<double> host, idle;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int rep = 0; rep < 300; ++rep) {
    CK(cudaEventRecord(e0, s));
    auto t0 = Clock::now();
    if (launch() != 0) return 1;
    auto t1 = Clock::now();
    CK(cudaEventRecord(e1, s));
    CK(cudaStreamSynchronize(s));
    float ms = 0; CK(cudaEventElapsedTime(&ms, e0, e1));
    host.push_back(us(t0, t1)); idle.push_back(ms * 1e3);
  }
  // Back-to-back (queue not empty): host time per launch over 100 launches.
  std::vector<double> b2b;
  for (int rep = 0; rep < 20; ++rep) {
    auto t0 = Clock::now();
    for (int i = 0; i < 50; ++i) launch();
    auto t1 = Clock::now();
    CK(cudaStreamSynchronize(s));
    b2b.push_back(us(t0, t1) / 50);
  }
  Stat h = stat(host), d = stat(idle), b = stat(b2b);
  printf("%-58s host %5.2f us (p10 %5.2f p90 %5.2f)  back-to-back %5.2f  events-around %6.2f us\n", name, h.med, h.p10,
         h.p90, b.med, d.med);
  return 0;
}

int main() {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int sms = 0; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, sms);
  const int smem = 200 * 1024;
  CK(cudaFuncSetAttribute(kern<1024>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(kern<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  Blob<1024> big{}; Blob<64> small{};
  const unsigned grid = unsigned(sms / 2 * 2);
  auto launch_ex = [&](const void* f, void* arg, bool cluster, int dyn) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 2; attr.val.clusterDim.y = 1; attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t c{};
    c.gridDim = dim3(grid); c.blockDim = dim3(384); c.dynamicSmemBytes = dyn; c.stream = s;
    c.attrs = cluster ? &attr : nullptr; c.numAttrs = cluster ? 1 : 0;
    int* out = nullptr;
    void* args[] = {arg, &out};
    return int(cudaLaunchKernelExC(&c, f, args));
  };
  const void* fb = reinterpret_cast<const void*>(kern<1024>);
  const void* fs = reinterpret_cast<const void*>(kern<64>);
  if (measure("runtime Ex, 1 KB params, cluster 2, 200 KB smem", s, [&] { return launch_ex(fb, &big, true, smem); })) return 1;
  if (measure("runtime Ex, 1 KB params, no cluster, 200 KB smem", s, [&] { return launch_ex(fb, &big, false, smem); })) return 1;
  if (measure("runtime Ex, 1 KB params, cluster 2, no smem", s, [&] { return launch_ex(fb, &big, true, 0); })) return 1;
  if (measure("runtime Ex, 64 B params, cluster 2, 200 KB smem", s, [&] { return launch_ex(fs, &small, true, smem); })) return 1;
  if (measure("runtime Ex, 64 B params, no cluster, no smem", s, [&] { return launch_ex(fs, &small, false, 0); })) return 1;
  if (measure("runtime <<<>>>, 64 B params, 256 blocks of 256", s, [&] {
        kern<64><<<256, 256, 0, s>>>(small, nullptr); return int(cudaGetLastError()); })) return 1;
  // Driver API with a cached function handle.
  CUfunction cf;
  CK(cudaGetFuncBySymbol(reinterpret_cast<cudaFunction_t*>(&cf), fb));
  auto launch_drv = [&](bool cluster) {
    CUlaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 2; attr.value.clusterDim.y = 1; attr.value.clusterDim.z = 1;
    CUlaunchConfig c{};
    c.gridDimX = grid; c.gridDimY = 1; c.gridDimZ = 1; c.blockDimX = 384; c.blockDimY = 1; c.blockDimZ = 1;
    c.sharedMemBytes = smem; c.hStream = reinterpret_cast<CUstream>(s);
    c.attrs = cluster ? &attr : nullptr; c.numAttrs = cluster ? 1 : 0;
    int* out = nullptr;
    void* args[] = {&big, &out};
    return int(cuLaunchKernelEx(&c, cf, args, nullptr));
  };
  if (measure("driver Ex (cached CUfunction), 1 KB params, cluster 2", s, [&] { return launch_drv(true); })) return 1;
  if (measure("driver Ex (cached CUfunction), 1 KB params, no cluster", s, [&] { return launch_drv(false); })) return 1;
  {
    cudaStream_t saved = s;
    s = cudaStreamPerThread;
    if (measure("per-thread stream: runtime Ex, 1 KB params, cluster 2", s, [&] { return launch_ex(fb, &big, true, smem); })) return 1;
    if (measure("per-thread stream: runtime <<<>>> 64 B", s, [&] {
          kern<64><<<256, 256, 0, s>>>(small, nullptr); return int(cudaGetLastError()); })) return 1;
    s = saved;
  }
  // A memset, for scale.
  void* buf; CK(cudaMalloc(&buf, 1 << 20));
  if (measure("cudaMemsetAsync 4 KB", s, [&] { return int(cudaMemsetAsync(buf, 0, 4096, s)); })) return 1;
  return 0;
}
