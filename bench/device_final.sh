#!/usr/bin/env bash
# One H100 call: build, every GPU test (tensor-core matvec, TP ranks sharing the GPU, the
# rest) and the bench rows of issue 6 with the CUDA-graph baseline. Set MK_COMMIT.
source "$(dirname "$0")/device_lib.sh"
build_extension
SECONDS=0
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=10 \
  tests/test_op_matvec_tc.py tests > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests rc=$? (${SECONDS}s)"; tail -12 "$OUT/pytest_gpu.log"
SECONDS=0
timeout 300 python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 \
  --contenders eager,cuda_graph,megakernel --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? (${SECONDS}s)"; grep -E "ms/step|FAILED" "$OUT/bench.log" | tail -12
# SANITIZE=1: compute-sanitizer memcheck and racecheck of a few tiny steps (CUDA-core batch 1
# and 2, tensor-core batch 8), where the device has it.
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ "${SANITIZE:-0}" = 1 ] && [ -n "$san" ]; then
  for run in "memcheck 1" "racecheck 1" "racecheck 2" "memcheck 8" "racecheck 8"; do
    set -- $run; SECONDS=0
    timeout 150 "$san" --tool "$1" --error-exitcode 3 python3 bench/sanitize_tiny.py 16 "$2" \
      > "$OUT/sanitize_$1_b$2.log" 2>&1
    echo "$1 batch $2 rc=$? (${SECONDS}s)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|tiny:" "$OUT/sanitize_$1_b$2.log"
  done
elif [ "${SANITIZE:-0}" = 1 ]; then echo "compute-sanitizer not found"; fi
# Few files come back from a call: the bench JSON/markdown/PNG, the rest in one archive.
archive_logs 'bench_*'
