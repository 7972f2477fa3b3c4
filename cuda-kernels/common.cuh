// Helpers shared by the kernel files: element conversions, error propagation, index maths.
// Every kernel computes in f32 and converts at the loads and stores, so one template body
// serves f32, f16 and bf16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fused_linear.h"

// Returns the error of a CUDA runtime call from the enclosing function.
#define FUSED_TRY(expr)                    \
  do {                                     \
    const cudaError_t fused_err_ = (expr); \
    if (fused_err_ != cudaSuccess) {       \
      return fused_err_;                   \
    }                                      \
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

// f rounded to the nearest TF32 value (the low 13 mantissa bits cleared), as the bits of an f32.
__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
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

// Calls `f(T{})` with the element type named by a FusedDType.
template <class F>
cudaError_t with_dtype(int32_t dtype, F f) {
  switch (dtype) {
    case FUSED_F32: return f(float{});
    case FUSED_F16: return f(__half{});
    case FUSED_BF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fused
