// The pointwise epilogue of a fused linear layer, device side:
//
//     y = act(z) * s + (residual ? z : 0),   z = x·Wᵀ + bias
//
// This is the twin of `src/epilogue.rs`: the same formulas, the same activation codes. Each
// piece is a small functor so that the kernels compose them instead of repeating the math:
// an activation (`apply`, `grad`), `PointwiseEpilogue` that wraps one with the scale and the
// residual, and `BatchNormFold` for the per-feature normalisation that follows it.
#pragma once

#include <math.h>

namespace fused {

// Codes shared with `Activation::code()` on the Rust side.
enum ActivationCode : int {
  ACT_IDENTITY = 0,
  ACT_RELU = 1,
  ACT_GELU = 2,
  ACT_SILU = 3,
  ACT_SIGMOID = 4,
  ACT_TANH = 5,
};

// The logistic function: 1/(1 + e^−z) for z ≥ 0 and e^z/(1 + e^z) below, so that the
// exponential never overflows, with no branch (a data-dependent branch diverges within a warp
// and runs both sides). It uses the hardware exp2 and reciprocal (__expf, __fdividef; 1 + e is
// in (1, 2]), as the sm90 GEMM's epilogue does: relative error ~1e-6 against ~40 instructions
// with branches for expf and the IEEE division, which made the memory-bound backward kernels
// issue-bound (docs/BENCHMARKS.md).
__device__ __forceinline__ float sigmoid(float z) {
  const float e = __expf(-fabsf(z));
  const float s = __fdividef(1.f, 1.f + e);
  return z >= 0.f ? s : e * s;
}

struct Identity {
  __device__ __forceinline__ float apply(float z) const { return z; }
  __device__ __forceinline__ float grad(float) const { return 1.f; }
};

// torch.relu: a NaN stays NaN (fmaxf would return 0), and the derivative is 0 where z <= 0, as
// PyTorch's threshold_backward takes it, so a NaN passes the gradient.
struct Relu {
  __device__ __forceinline__ float apply(float z) const { return z < 0.f ? 0.f : z; }
  __device__ __forceinline__ float grad(float z) const { return z <= 0.f ? 0.f : 1.f; }
};

// The exact (erf) GELU.
struct Gelu {
  __device__ __forceinline__ float apply(float z) const {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
  }
  __device__ __forceinline__ float grad(float z) const {
    const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
    const float pdf = expf(-0.5f * z * z) * 0.39894228040143268f;
    return cdf + z * pdf;
  }
};

struct Silu {
  __device__ __forceinline__ float apply(float z) const { return z * sigmoid(z); }
  __device__ __forceinline__ float grad(float z) const {
    const float s = sigmoid(z);
    return s * (1.f + z * (1.f - s));
  }
};

struct Sigmoid {
  __device__ __forceinline__ float apply(float z) const { return sigmoid(z); }
  __device__ __forceinline__ float grad(float z) const {
    const float s = sigmoid(z);
    return s * (1.f - s);
  }
};

struct Tanh {
  __device__ __forceinline__ float apply(float z) const { return tanhf(z); }
  __device__ __forceinline__ float grad(float z) const {
    const float t = tanhf(z);
    return 1.f - t * t;
  }
};

// `act(z) * s + (residual ? z : 0)`, where `s` is the scalar factor or the feature's scale.
template <class Act>
struct PointwiseEpilogue {
  Act activation;
  bool residual;

  __device__ __forceinline__ float act(float z) const { return activation.apply(z); }
  __device__ __forceinline__ float apply(float z, float s) const {
    const float y = act(z) * s;
    return residual ? y + z : y;
  }
  // dy/dz.
  __device__ __forceinline__ float grad(float z, float s) const {
    const float d = activation.grad(z) * s;
    return residual ? d + 1.f : d;
  }
};

// Calls `f(epilogue)` with the `PointwiseEpilogue` of an activation code. Kernels call it once,
// outside their element loops, so that each activation gets its own straight-line code (one
// switch per element would inline all six formulas at every element). Host code calls it to
// launch a kernel instantiated for one activation, which then holds the registers of that
// activation alone.
#pragma nv_exec_check_disable
template <class F>
__host__ __device__ __forceinline__ decltype(auto) dispatch_epilogue(int activation, bool residual, F&& f) {
  switch (activation) {
    case ACT_RELU: return f(PointwiseEpilogue<Relu>{Relu{}, residual});
    case ACT_GELU: return f(PointwiseEpilogue<Gelu>{Gelu{}, residual});
    case ACT_SILU: return f(PointwiseEpilogue<Silu>{Silu{}, residual});
    case ACT_SIGMOID: return f(PointwiseEpilogue<Sigmoid>{Sigmoid{}, residual});
    case ACT_TANH: return f(PointwiseEpilogue<Tanh>{Tanh{}, residual});
    default: return f(PointwiseEpilogue<Identity>{Identity{}, residual});
  }
}

// `(u - mean) * gamma / sqrt(var + eps) + beta` with the per-feature factor precomputed. The
// subtraction comes first so that a mean far from zero cancels exactly instead of through
// `u * a - mean * a`.
struct BatchNormFold {
  float mean, factor, beta;
  __device__ __forceinline__ float apply(float u) const { return (u - mean) * factor + beta; }
};

__device__ __forceinline__ BatchNormFold batch_norm_fold(float mean, float var, float gamma, float beta,
                                                         float eps) {
  return BatchNormFold{mean, gamma / sqrtf(var + eps), beta};
}

// The fold that leaves u unchanged, for epilogues without a BatchNorm.
__device__ __forceinline__ BatchNormFold no_batch_norm() { return BatchNormFold{0.f, 1.f, 0.f}; }

}  // namespace fused
