// Helpers shared by the kernel files: element conversions, error propagation, index maths.
// Every kernel computes in f32 and converts at the loads and stores, so one template body
// serves f32, f16 and bf16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <atomic>
#include <initializer_list>

#include "fused_linear.h"

// Returns the error of a CUDA runtime call from the enclosing function. Variadic, so that the
// call may hold unparenthesised commas (template arguments).
#define FUSED_TRY(...)                            \
  do {                                            \
    const cudaError_t fused_err_ = (__VA_ARGS__); \
    if (fused_err_ != cudaSuccess) {              \
      return fused_err_;                          \
    }                                             \
  } while (0)

namespace fused {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v as a T holds it: what a 16-bit tensor stores, back in f32 (v itself for f32).
template <class T>
__device__ __forceinline__ float rounded_to(float v) {
  return to_float(from_float<T>(v));
}

// f rounded to the nearest TF32 value (the low 13 mantissa bits cleared), as the bits of an f32.
__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
}

// x truncated to TF32 (the low 13 mantissa bits cleared): what TF32 tensor cores read of an f32
// operand, the "big" part of the 3xTF32 split.
__device__ __forceinline__ float tf32_truncate(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }

// What TF32 tensor cores drop of x (x minus tf32_truncate(x)), rounded to TF32: x = big + small
// to 2^-22 relative. An infinite x leaves 0 (inf − inf would be a NaN); a NaN stays a NaN.
__device__ __forceinline__ float tf32_remainder(float x) {
  return isinf(x) ? 0.f : __uint_as_float(to_tf32(x - tf32_truncate(x)));
}

// Stores two neighbouring elements with one access; `p` must be aligned to two elements.
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Two values rounded to the 16-bit type T and packed into one 32-bit word, `a` in the low half:
// a pair of neighbouring elements as it lies in memory, for the instructions that take registers
// (stmatrix).
template <class T>
__device__ __forceinline__ uint32_t pack_pair(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float a, float b) {
  const __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// V neighbouring elements moved with one access of V·sizeof(T) bytes and converted to or from
// f32: the memory-bound kernels move whole packs so that each warp has many bytes in flight.
// The address must be aligned to the pack (see packs_fit).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

template <class T, int V>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(pack.e[i]);
}

template <class T, int V>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.e[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Elements of type T in a pack of `BYTES` bytes.
template <class T, int BYTES>
constexpr int pack_width() {
  return BYTES / int(sizeof(T));
}

// Whether rows of n elements of type T, starting at each of `pointers` (null ones are skipped),
// can be read in packs of V: n a multiple of V and every start aligned to the pack.
template <class T, int V>
bool packs_fit(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % V != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) != 0) return false;
  }
  return true;
}

// Devices whose per-kernel settings are remembered (the others get them on every launch).
constexpr int MAX_DEVICES = 64;

// Raises the dynamic shared memory limit of `Kernel` (a kernel function) to `bytes` on `device`,
// once: the attribute call costs a few µs of host time, during which the GPU may sit idle. Each
// kernel keeps its own flags; racing first calls set the same value.
template <auto Kernel>
cudaError_t allow_dynamic_smem(int bytes, int device) {
  static std::atomic<bool> done[MAX_DEVICES];
  const bool remembered = device >= 0 && device < MAX_DEVICES;
  if (remembered && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  FUSED_TRY(cudaFuncSetAttribute(reinterpret_cast<const void*>(Kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 bytes));
  if (remembered) done[device].store(true, std::memory_order_release);
  return cudaSuccess;
}

// How many per-feature vectors a forward reads: none for a bare product (a bias is then
// optional); else the bias, the scale if per feature, and BatchNorm's gamma and beta, followed in
// eval mode by the running mean and variance.
inline int32_t param_rows_needed(const FusedLinearArgs& a) {
  if (a.has_scale == 0 && a.batch_norm == FUSED_BN_NONE) return 0;
  const int32_t batch_norm = a.batch_norm == FUSED_BN_EVAL ? 4 : a.batch_norm == FUSED_BN_TRAIN ? 2 : 0;
  return 1 + (a.has_scale != 0) + batch_norm;
}

// Element c of per-feature vector r of a forward (FusedParamRows' order: bias, [scale],
// [gamma, beta, [running_mean, running_var]]), in f32.
template <class T>
__device__ __forceinline__ float param(const FusedParamRows& rows, int64_t r, int64_t c) {
  return to_float(static_cast<const T*>(rows.row[r])[c]);
}

// Calls `f(T{})` with the element type named by a FusedDType, or returns `unknown`.
template <class F, class R>
R with_dtype(int32_t dtype, F f, R unknown) {
  switch (dtype) {
    case FUSED_F32: return f(float{});
    case FUSED_F16: return f(__half{});
    case FUSED_BF16: return f(__nv_bfloat16{});
    default: return unknown;
  }
}

// with_dtype for launches: an unknown dtype is an invalid value.
template <class F>
cudaError_t with_dtype(int32_t dtype, F f) {
  return with_dtype(dtype, f, cudaErrorInvalidValue);
}

}  // namespace fused
