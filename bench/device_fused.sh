#!/usr/bin/env bash
# One H100 call for plan(fuse_reduce=True): build, the GPU tests, the ablate rows default
# and fuse_reduce (same process, same build) at llama-3.2-1b batch 1 and 8 and llama-3.1-8b
# batch 1, and compute-sanitizer memcheck / racecheck of tiny with the ticket merge.
source "$(dirname "$0")/device_lib.sh"
build_extension
run_gpu_tests 6
for mb in "llama-3.2-1b 1" "llama-3.2-1b 8" "llama-3.1-8b 1"; do
  run_ablate $mb "${ROWS:-default,fuse_reduce}"
done
for run in "memcheck 1" "racecheck 1" "racecheck 5"; do run_sanitize $run fuse_reduce=1; done
archive_logs 'ablate_*'
