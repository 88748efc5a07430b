#!/usr/bin/env bash
# One H100 call for the overlap work of issue 6: build, the GPU decoder and attention tests,
# the ablation grid rows named in ROWS_1B / ROWS_8B / ROWS_B8 (llama-3.2-1b batch 1,
# llama-3.1-8b batch 1, llama-3.2-1b batch 8), and traces of llama-3.2-1b batch 1 with the
# default build and with each entry of TRACE_FLAGS (space separated: a build flag such as
# "-DMK_INPUT_PREFETCH=0", or a runtime switch such as "no_load"). Logs, JSON and traces go
# to $OUT. Set MK_COMMIT.
source "$(dirname "$0")/device_lib.sh"
build_extension
if [ "${TESTS:-1}" = 1 ]; then
  SECONDS=0
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=5 \
    ${TEST_FILES:-tests/test_gpu_decoder.py tests/test_op_attn.py tests/test_op_attn_reduce.py tests/test_op_residual.py tests/test_op_qkv.py} > "$OUT/pytest_gpu.log" 2>&1
  echo "gpu tests rc=$? (${SECONDS}s)"; tail -4 "$OUT/pytest_gpu.log"
fi
run_ablate() {  # model batch rows
  [ -n "$3" ] || return 0
  SECONDS=0
  timeout "${ABLATE_TIMEOUT:-240}" python3 -m megakernel ablate --model "$1" --batch "$2" --iters 50 \
    --rows "$3" --out "$OUT" > "$OUT/ablate_$1_b$2.log" 2>&1
  echo "ablate $1 b$2 rc=$? (${SECONDS}s)"; grep -E "^\|" "$OUT/ablate_$1_b$2.log" | cut -c1-150 | head -30
}
run_ablate llama-3.2-1b 1 "${ROWS_1B:-}"
run_ablate llama-3.1-8b 1 "${ROWS_8B:-}"
run_ablate llama-3.2-1b 8 "${ROWS_B8:-}"
for flags in "" ${TRACE_FLAGS:-}; do
  SECONDS=0
  dir="$OUT/trace${flags:+_${flags#-D}}"
  case "$flags" in -D*) opt=--build-flag=$flags ;; ?*) opt=--ablate=$flags ;; *) opt= ;; esac
  timeout 120 python3 -m megakernel trace --model llama-3.2-1b --batch 1 --out "$dir" \
    $opt > "$dir.log" 2>&1
  echo "trace ${flags:-default} rc=$? (${SECONDS}s)"; tail -3 "$dir.log"
  sed -n '/^ring pages/,/^$/p' "$dir.log"
  rm -f "$dir/trace.json"  # the .npz keeps it (trace --from-npz)
done
# Few files come back from a call: everything but the ablation JSON/markdown in one archive.
archive_logs 'ablate_*.json' 'ablate_*.md'
