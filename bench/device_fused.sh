#!/usr/bin/env bash
# One H100 call for plan(fuse_reduce=True): build, the GPU tests, the ablate rows baseline
# and fuse_reduce (same process, same build) at llama-3.2-1b batch 1 and 8 and llama-3.1-8b
# batch 1, and compute-sanitizer memcheck / racecheck of tiny with the ticket merge.
source "$(dirname "$0")/device_lib.sh"
build_extension
SECONDS=0
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=10 \
  tests/test_op_matvec_tc.py tests > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests rc=$? (${SECONDS}s)"; tail -6 "$OUT/pytest_gpu.log"
for mb in "llama-3.2-1b 1" "llama-3.2-1b 8" "llama-3.1-8b 1"; do
  run_ablate $mb "${ROWS:-default,fuse_reduce}"
done
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$san" ]; then
  for run in "memcheck 1" "racecheck 1" "racecheck 5"; do
    set -- $run; SECONDS=0
    timeout 150 "$san" --tool "$1" --error-exitcode 3 python3 bench/sanitize_tiny.py 16 "$2" fuse_reduce=1 \
      > "$OUT/sanitize_fused_$1_b$2.log" 2>&1
    echo "$1 batch $2 fused rc=$? (${SECONDS}s)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|tiny" "$OUT/sanitize_fused_$1_b$2.log"
  done
fi
archive_logs 'ablate_*'
