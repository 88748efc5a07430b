#!/usr/bin/env bash
# One H100 call for the overlap work of issue 6: build, the GPU decoder and attention tests,
# the ablation grid rows named in ROWS_1B / ROWS_8B / ROWS_B8 (llama-3.2-1b batch 1,
# llama-3.1-8b batch 1, llama-3.2-1b batch 8; "all": the whole grid), and traces of
# llama-3.2-1b batch 1 with the default build and with each entry of TRACE_FLAGS (space
# separated: a build flag such as "-DMK_INPUT_PREFETCH=0", or a runtime switch such as
# "no_load"). Logs, JSON and traces go to $OUT. Set MK_COMMIT.
source "$(dirname "$0")/device_lib.sh"
build_extension
if [ "${TESTS:-1}" = 1 ]; then
  SECONDS=0
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=5 \
    ${TEST_FILES:-tests/test_gpu_decoder.py tests/test_op_attn.py tests/test_op_attn_reduce.py tests/test_op_residual.py tests/test_op_qkv.py} > "$OUT/pytest_gpu.log" 2>&1
  echo "gpu tests rc=$? (${SECONDS}s)"; tail -4 "$OUT/pytest_gpu.log"
fi
run_ablate llama-3.2-1b 1 "${ROWS_1B:-}"
run_ablate llama-3.1-8b 1 "${ROWS_8B:-}"
run_ablate llama-3.2-1b 8 "${ROWS_B8:-}"
run_traces ${TRACE_FLAGS:-}
# Few files come back from a call: everything but the ablation JSON/markdown in one archive.
archive_logs 'ablate_*.json' 'ablate_*.md'
