#!/usr/bin/env bash
# Builds scripts/sm90_tile_sweep.cu, the tile-configuration sweep of the Hopper GEMM, stripped
# and xz'd into .gpu/ for `scripts/gpu-run.sh tiles` on the GPU machine. Needs the toolchain of
# scripts/cuda-toolchain.sh (sourced here); about ten minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolchain.sh >/dev/null
mkdir -p .gpu
objects=$(mktemp -d)
trap 'rm -rf "$objects"' EXIT
flags=(-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DFUSED_SM90 -DNDEBUG --expt-relaxed-constexpr
  -I"$CUTLASS_DIR/include" -Icuda-kernels)
# The sweep's GEMMs may finish a train-mode BatchNorm, whose kernels live in batch_norm.cu; the
# input-gradient part times the general path's transpose of transpose.cu.
nvcc "${flags[@]}" -c cuda-kernels/batch_norm.cu -o "$objects/batch_norm.o"
nvcc "${flags[@]}" -c cuda-kernels/transpose.cu -o "$objects/transpose.o"
nvcc "${flags[@]}" -c scripts/sm90_tile_sweep.cu -o "$objects/sweep.o"
nvcc -gencode=arch=compute_90a,code=sm_90a "$objects/sweep.o" "$objects/batch_norm.o" "$objects/transpose.o" -o .gpu/sm90_tile_sweep -lcublas
strip .gpu/sm90_tile_sweep
xz -T2 -f .gpu/sm90_tile_sweep
ls -la .gpu/sm90_tile_sweep.xz
