#!/usr/bin/env bash
# One H100 call for an A/B of ablate grid rows: build, the GPU tests (TESTS=0: none;
# TEST_ARGS: pytest arguments instead of every GPU test), the
# rows $ROWS (default: default,fuse_reduce; same process, same build) for each "model batch"
# of $MODELS (default: llama-3.2-1b 1 and 8, llama-3.1-8b 1), $ROUNDS times, and
# compute-sanitizer runs $SANITIZE (tool:batch ...) of tiny with the plan options
# $SAN_OPTIONS (k=v,...; empty: the default plan). BUILD_FLAGS: the extra builds the rows
# and traces need, started with the default one (prebuild's arguments). TRACES: as
# run_traces, after the rows.
source "$(dirname "$0")/device_lib.sh"
prebuild ${BUILD_FLAGS:-}
build_extension
wait
[ "${TESTS:-1}" = 0 ] || run_gpu_tests 6
IFS=, read -ra models <<< "${MODELS:-llama-3.2-1b 1,llama-3.2-1b 8,llama-3.1-8b 1}"
for round in $(seq "${ROUNDS:-1}"); do
  for mb in "${models[@]}"; do
    run_ablate $mb "${ROWS:-default,fuse_reduce}"
    mv "$OUT/ablate_${mb// /_b}.log" "$OUT/ablate_${mb// /_b}_round$round.log"
  done
done
for run in ${SANITIZE-memcheck:1 racecheck:1 racecheck:5}; do  # tool:batch
  run_sanitize "${run%:*}" "${run#*:}" ${SAN_OPTIONS-fuse_reduce=1}
done
[ -z "${TRACES:-}" ] || run_traces $TRACES
archive_logs 'ablate_*.md'  # at most 8 files come back: the tables, and logs.tgz with the rest
