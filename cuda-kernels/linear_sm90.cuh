// The Hopper (sm_90a) fast path of the fused linear forward; see linear_sm90.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fused_linear.h"

namespace fused {

// Runs the forward of `args` (the GEMM with its epilogue, after the eval-mode BatchNorm's fold) on
// `stream` and returns true, with *status set to the first CUDA error met (cudaSuccess
// otherwise) and, for a train-mode BatchNorm, *stats_row_tile to the rows per tile of the partial
// statistics it left in the workspace; or returns false, having launched nothing, when it does
// not take the problem, in which case the caller runs the portable kernel.
bool linear_forward_sm90(const FusedLinearArgs& args, cudaStream_t stream, cudaError_t* status,
                         int64_t* stats_row_tile);

// Floats of `args.workspace` that the fast path needs (0 when it does not take the shape, or the
// device is not sm_90): 2n for an eval-mode BatchNorm (its folded per-feature factor and shift);
// for a train-mode one, the partial statistics of every epilogue subtile in the portable path's
// layout, and the folds; then, for the exact f32 GEMM, stream-K's partial tiles and flags.
int64_t linear_sm90_workspace_floats(const FusedLinearArgs& args);

// The exact f32 forward on the kernel that feeds W through registers (linear_exact_sm90.cu), for
// the problems with enough output tiles to fill the device; linear_forward_sm90 runs it between
// the BatchNorm kernels, and CUTLASS's 3xTF32 GEMM runs the other exact f32 problems.
namespace exact_forward {
// Rows of the tiles of the train-mode BatchNorm's partial statistics.
constexpr int64_t kRowTile = 128;
// Whether the kernel takes a problem of this shape and epilogue on a device of `sm_count` SMs.
bool takes_shape(const FusedLinearArgs& args, int sm_count);
// takes_shape, and the pointers aligned as TMA needs.
bool takes(const FusedLinearArgs& args, int sm_count);
// Floats of `args.workspace` it needs: BatchNorm's (as the CUTLASS path's, over tiles of
// kRowTile rows), then x's TF32 remainders.
int64_t workspace_floats(const FusedLinearArgs& args);
// Enqueues the pass that splits x and the GEMM with the whole epilogue (the train-mode
// BatchNorm's partial statistics included).
cudaError_t launch(const FusedLinearArgs& args, int device, cudaStream_t stream);
}  // namespace exact_forward

// Shared by the Hopper kernels (weight_grad_sm90.cu, input_grad_sm90.cu, linear_exact_sm90.cu) to
// decide what they take and to lay out their workspace.
namespace sm90 {
// Whether the current device (stored in *device) is sm_90 and runs the sm_90a code, with its
// SM count in *sm_count.
bool usable_device(int* device, int* sm_count);
// Whether `p` is 16-byte aligned, as TMA needs.
bool aligned16(const void* p);
// Floats at the start of `args.workspace` that the BatchNorm around a GEMM takes, rounded up to
// 128 bytes (what the GEMM keeps in the workspace follows): an eval-mode one's fold (2n), a
// train-mode one's partial statistics over tiles of `row_tile` rows and its folds; 0 without.
int64_t batch_norm_workspace_floats(const FusedLinearArgs& args, int64_t row_tile);
}  // namespace sm90

}  // namespace fused
