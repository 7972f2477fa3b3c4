// The Hopper (sm_90a) fast path of the fused linear forward; see linear_sm90.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fused_linear.h"

namespace fused {

// Runs the whole forward of `args` (the GEMM with its epilogue, and the BatchNorm kernels) on
// `stream` and returns true, with *status set to the first CUDA error met (cudaSuccess
// otherwise); or returns false, having launched nothing, when it does not take the problem, in
// which case the caller runs the portable kernel.
bool linear_forward_sm90(const FusedLinearArgs& args, cudaStream_t stream, cudaError_t* status);

// Floats of `args.workspace` that the fast path needs (0 when it does not take the shape, or the
// device is not sm_90): 2n for an eval-mode BatchNorm (its folded per-feature factor and shift);
// for a train-mode one, the partial statistics of every epilogue subtile in the portable path's
// layout, and the folds; then, for the exact f32 GEMM, stream-K's partial tiles and flags.
int64_t linear_sm90_workspace_floats(const FusedLinearArgs& args);

// Shared by the Hopper kernels (weight_grad_sm90.cu, input_grad_sm90.cu) to decide what they take.
namespace sm90 {
// Whether the current device (stored in *device) is sm_90 and runs the sm_90a code, with its
// SM count in *sm_count.
bool usable_device(int* device, int* sm_count);
// Whether `p` is 16-byte aligned, as TMA needs.
bool aligned16(const void* p);
}  // namespace sm90

}  // namespace fused
