#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs on a machine without a CUDA install (CI,
# or a build machine without a GPU), from PyPI wheels, into DIR:
#   - nvcc, the CUDA 13.0 headers and the link libraries (cudart, cuBLAS, cuRAND, NVRTC),
#   - the CUTLASS 4.2 headers,
#   - a link-time stand-in for the driver library libcuda.so, whose every entry point returns
#     CUDA_ERROR_NO_DEVICE: the real one comes with the NVIDIA driver on the machine that runs
#     the binaries.
#
#   source scripts/cuda-toolchain.sh [DIR]      (default DIR: ~/.cache/candle-fused-cuda)
#
# It is meant to be sourced (it sets PATH and the CUDA variables) and returns non-zero on failure.
#
# Every wheel is pinned to the 13.0 release: a newer nvcc writes PTX that a 13.0 driver rejects
# ("Unsupported .version"), and the compiler's own pieces (nvvm, crt) must match it.
_cf_install() {
_cf_dir=${1:-$HOME/.cache/candle-fused-cuda}
if [ ! -x "$_cf_dir/venv/bin/python" ]; then
  python3 -m venv "$_cf_dir/venv" || return 1
fi
"$_cf_dir/venv/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cutlass==4.2.0.0 || return 1
_cf_site=$("$_cf_dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
_cf_cuda="$_cf_site/nvidia/cu13"

# The wheels ship versioned libraries only; the linker looks for the unversioned names.
for _cf_lib in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
  ln -sf "lib$_cf_lib" "$_cf_cuda/lib/lib${_cf_lib%.so.*}.so"
done

# The driver stand-in: one function per driver entry point named in cuda.h.
if [ ! -f "$_cf_cuda/lib/libcuda.so" ]; then
  "$_cf_dir/venv/bin/python" - "$_cf_cuda/include/cuda.h" >"$_cf_dir/cuda_stub.c" <<'EOF'
import re, sys
header = open(sys.argv[1]).read()
entry_points = set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", header))
entry_points |= set(re.findall(r"#define\s+cu\w+\s+(cu\w+)", header))
for name in sorted(entry_points):
    print(f"int {name}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}")
EOF
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_cf_cuda/lib/libcuda.so" "$_cf_dir/cuda_stub.c" || return 1
fi

export PATH="$_cf_cuda/bin:$PATH"
export CUDA_ROOT="$_cf_cuda" CUDA_PATH="$_cf_cuda" CUDA_HOME="$_cf_cuda"
export LIBRARY_PATH="$_cf_cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUTLASS_DIR="$_cf_site/cutlass_library/source"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "CUDA toolchain: $(nvcc --version | tail -1); CUTLASS: $CUTLASS_DIR"
}
_cf_install "$@"
