#!/usr/bin/env bash
# On the GPU machine, from the repository root, with the binaries of scripts/gpu-pack.sh in
# .gpu/ (and the PyTorch peers script with the models.py it imports in .gpu/peers/ for the
# benchmark): GPU tests, the compute-sanitizer runs, every shipped model through
# `run --device cuda` in every dtype, and the benchmark next to PyTorch. Logs and results (at
# most nine files) go to $OUT (default ./gpu-out); the benchmark tables go to standard output.
#
#   scripts/gpu-run.sh [tests] [sanitizer] [models] [bench] [tiles]   (default: the first four)
#
# `tiles` runs the Hopper GEMM's tile-configuration sweep built by scripts/sm90-tile-sweep.sh: all of
# it, or the parts named in SWEEP_PARTS (wide, narrow, weight-grad, exact, input-grad).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for f in .gpu/*.xz; do [ -e "$f" ] && xz -d -f "$f"; done
chmod +x .gpu/gpu_tests .gpu/run .gpu/train .gpu/bench .gpu/sm90_tile_sweep 2>/dev/null
steps=${*:-tests sanitizer models bench}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

for step in $steps; do
  case $step in
  tests)
    echo "== GPU tests"
    .gpu/gpu_tests --test-threads=1 --nocapture 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^test |result|error vs|panicked" || status=1
    grep -q "test result: ok" "$OUT/gpu_tests.log" || status=1
    ;;
  sanitizer)
    # The reference-size tests are left out: at those sizes the tools run for hours. Each tool
    # stops after SANITIZER_TIMEOUT seconds (racecheck took 453 s over the rest on an H200).
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool"
      timeout "${SANITIZER_TIMEOUT:-600}" compute-sanitizer --tool $tool --error-exitcode 9 .gpu/gpu_tests --test-threads=1 \
        --skip reference_sizes --skip exact_f32 >"$OUT/sanitizer_$tool.log" 2>&1
      rc=$?
      tail -n 3 "$OUT/sanitizer_$tool.log"
      # cuBLAS's own kernels (nvjet_*, sm90_xmma_*), which the 16-bit products of the smallest
      # batches run on, draw racecheck hazards that the crate cannot change; a run whose tests
      # passed and whose every reported access lies in them counts as clean for the crate's
      # kernels, and says so.
      if [ $rc -eq 9 ] && [ $tool = racecheck ] && grep -q "test result: ok" "$OUT/sanitizer_$tool.log" \
        && grep -q "Race reported" "$OUT/sanitizer_$tool.log" \
        && ! grep -E "(Race reported between|and) (Read|Write) access at" "$OUT/sanitizer_$tool.log" \
          | grep -qvE "access at (nvjet_|sm90_xmma_)"; then
        echo "compute-sanitizer racecheck: every hazard reported lies in cuBLAS's kernels, none in the crate's"
        rc=0
      fi
      [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
    done
    ;;
  models)
    echo "== shipped models through run --device cuda"
    for model in models/*/; do
      for dtype in f32 f16 bf16; do
        for mode in "" --train; do
          .gpu/run "$model" --device cuda --dtype "$dtype" $mode >>"$OUT/models.log" 2>&1 \
            && echo "ok   $model $dtype $mode" || { echo "FAIL $model $dtype $mode"; status=1; }
        done
      done
      .gpu/run "$model" --device cuda --precision tf32 >>"$OUT/models.log" 2>&1 \
        && echo "ok   $model tf32" || { echo "FAIL $model tf32"; status=1; }
    done
    ;;
  bench)
    echo "== benchmark"
    .gpu/bench --train --json "$OUT/bench.json" 2>&1
    if [ -f .gpu/peers/peers.py ]; then
      if [ -f .gpu/peers/models.py ]; then
        (cd .gpu/peers && python3 peers.py --compile --train --json "$OUT/peers.json") 2>&1 | grep -v Warn
        python3 scripts/bench_report.py "$OUT/bench.json" "$OUT/peers.json" --svg "$OUT/bench.svg" | tee "$OUT/report.md"
      else
        echo "bench: .gpu/peers/models.py, which peers.py imports, is missing"; status=1
      fi
    fi
    ;;
  tiles)
    echo "== Hopper GEMM tile configurations"
    .gpu/sm90_tile_sweep ${SWEEP_PARTS:-} 2>&1 | tee "$OUT/tiles.log" || status=1
    ;;
  *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
