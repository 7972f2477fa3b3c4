#!/usr/bin/env bash
# Builds the CUDA binaries on a machine without a GPU and packs them, stripped and xz'd, into
# .gpu/ for scripts/gpu-run.sh on the GPU machine: the GPU test binary and the run, train and
# bench examples. Needs the toolchain of scripts/cuda-toolchain.sh (sourced here).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolchain.sh >/dev/null
cargo build --release --features cuda --examples
test_bin=$(cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
mkdir -p .gpu
rm -f .gpu/gpu_tests* .gpu/run .gpu/run.xz .gpu/train .gpu/train.xz .gpu/bench .gpu/bench.xz
strip -o .gpu/gpu_tests "$test_bin"
for example in run train bench; do
  strip -o ".gpu/$example" "target/release/examples/$example"
done
xz -T2 .gpu/gpu_tests .gpu/run .gpu/train .gpu/bench
ls -la .gpu/*.xz
