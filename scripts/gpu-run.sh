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
    # The reference-size tests are left out: at those sizes the tools run for hours. Each test
    # runs in a process of its own: racecheck's host memory grows with every launch a process
    # makes, and one process for all the tests reached an H100 machine's 128 GB and was killed.
    # Each tool stops after SANITIZER_TIMEOUT seconds over all the tests; SANITIZER_TOOLS picks
    # the tools (default both), SANITIZER_TESTS (an extended regular expression) the tests.
    tests=$(.gpu/gpu_tests --list 2>/dev/null | sed -n 's/: test$//p' | grep -vE 'reference_sizes|exact_f32' \
      | grep -E "${SANITIZER_TESTS:-.}")
    [ -n "$tests" ] || { echo "compute-sanitizer: .gpu/gpu_tests listed no tests"; status=1; }
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
      echo "== compute-sanitizer $tool"
      log="$OUT/sanitizer_$tool.log"
      : >"$log"
      deadline=$(($(date +%s) + ${SANITIZER_TIMEOUT:-600}))
      for test in $tests; do
        left=$((deadline - $(date +%s)))
        if [ $left -le 0 ]; then
          echo "$test: not run, SANITIZER_TIMEOUT spent" | tee -a "$log"; status=1; continue
        fi
        timeout $left compute-sanitizer --tool $tool --error-exitcode 9 .gpu/gpu_tests --test-threads=1 \
          --exact "$test" >"$log.part" 2>&1
        rc=$?
        cat "$log.part" >>"$log"
        # cuBLAS's own kernels (nvjet_*, sm90_xmma_*), which the 16-bit products of the smallest
        # batches run on, draw racecheck hazards that the crate cannot change; a test that passed
        # and whose every reported access lies in them counts as clean for the crate's kernels,
        # and says so.
        verdict="exit $rc"
        if [ $rc -eq 9 ] && [ $tool = racecheck ] && grep -q "test result: ok" "$log.part" \
          && grep -q "Race reported" "$log.part" \
          && ! grep -E "(Race reported between|and) (Read|Write) access at" "$log.part" \
            | grep -qvE "access at (nvjet_|sm90_xmma_)"; then
          verdict="clean: every hazard reported lies in cuBLAS's kernels, none in the crate's"
          rc=0
        fi
        if [ $rc -eq 0 ] && ! grep -q "test result: ok. 1 passed" "$log.part"; then
          verdict="ran no test"
          rc=1
        fi
        echo "$test: $verdict; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log.part" | sed 's/=* *//')" | tee -a "$log"
        [ $rc -eq 0 ] || status=1
      done
      rm -f "$log.part"
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
