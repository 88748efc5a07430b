#!/usr/bin/env bash
# One H100 call: build, every GPU test (tensor-core matvec, TP ranks sharing the GPU, the
# rest) and the bench rows of issue 6 with the CUDA-graph baseline. Set MK_COMMIT; TESTS=0
# skips the tests (the whole suite and the bench do not fit one 600 s call together).
source "$(dirname "$0")/device_lib.sh"
build_extension
[ "${TESTS:-1}" = 0 ] || run_gpu_tests
SECONDS=0
timeout 300 python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 \
  --contenders eager,cuda_graph,megakernel --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? (${SECONDS}s)"; grep -E "ms/step|FAILED" "$OUT/bench.log" | tail -12
# SANITIZE=1: compute-sanitizer memcheck and racecheck of a few tiny steps (CUDA-core batch 1
# and 2, tensor-core batch 8), where the device has it.
if [ "${SANITIZE:-0}" = 1 ]; then
  for run in "memcheck 1" "racecheck 1" "racecheck 2" "memcheck 8" "racecheck 8"; do
    run_sanitize $run
  done
fi
# TRACES="flag ...": traces of llama-3.2-1b batch 1, the default build and one per build flag
# (-DMK_...) or runtime switch (run_traces).
[ -z "${TRACES:-}" ] || run_traces $TRACES
# Few files come back from a call: the bench JSON/markdown/PNG, the rest in one archive.
archive_logs 'bench_*'
