#!/usr/bin/env bash
# One H100 call for an A/B of ablate grid rows: build, the GPU tests, the rows $ROWS
# (default: default,fuse_reduce; same process, same build) at llama-3.2-1b batch 1 and 8 and
# llama-3.1-8b batch 1 ($ROUNDS times), and compute-sanitizer memcheck / racecheck of tiny
# with the plan options $SAN_OPTIONS (k=v,...; empty: the default plan).
source "$(dirname "$0")/device_lib.sh"
build_extension
run_gpu_tests 6
for round in $(seq "${ROUNDS:-1}"); do
  for mb in "llama-3.2-1b 1" "llama-3.2-1b 8" "llama-3.1-8b 1"; do
    run_ablate $mb "${ROWS:-default,fuse_reduce}"
    mv "$OUT/ablate_${mb// /_b}.log" "$OUT/ablate_${mb// /_b}_round$round.log"
  done
done
for run in ${SANITIZE-memcheck:1 racecheck:1 racecheck:5}; do  # tool:batch
  run_sanitize "${run%:*}" "${run#*:}" ${SAN_OPTIONS-fuse_reduce=1}
done
archive_logs 'ablate_*.md'  # at most 8 files come back: the tables, and logs.tgz with the rest
