#!/usr/bin/env bash
# One H100 call: the working tree against another tree in abtree/ (an ignored directory,
# e.g. `git archive <commit> | tar -x -C abtree`, carried with carry=["abtree"]): both
# built, the decoder and TP GPU tests of the working tree, then two alternating rounds of
# the megakernel-only bench (llama-3.2-1b, llama-3.1-8b, batch 1 and 8). Set MK_COMMIT;
# TESTS=0 skips the tests, TEST_FILES adds test files; TRACES="flag ..." adds traces of the
# working tree (run_traces). ROWS=row,row: instead of the bench, those ablate grid rows of
# each "model batch" in MODELS (default: llama-3.2-1b 1), both trees alternating, with every
# build both trees need (BUILD_FLAGS: one flag per extra build) started at once; the old
# tree's results in $OUT/old, carrying OLD_COMMIT; OLD_ROWS: its rows, if not ROWS.
source bench/device_lib.sh
build_old() {  # the abtree build with the given flags, logged in $OUT/build_old<flags>.log
  (cd abtree && PYTHONPATH=$PWD MEGAKERNEL_CACHE_DIR=/tmp/mkcache_old python3 -c \
    "import sys; from megakernel.runtime import load_extension as l; l(build_flags=tuple(sys.argv[1:]))" \
    "$@" > "$OUT/build_old${1:-}.log" 2>&1; echo "old build ${1:-default} rc=$?")
}
for f in ${BUILD_FLAGS:-}; do build_old "$f" & done
prebuild ${BUILD_FLAGS:-}
build_old & build_extension
SECONDS=0
if [ "${TESTS:-1}" != 0 ]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=5 tests/test_gpu_tp.py tests/test_gpu_decoder.py ${TEST_FILES:-} > "$OUT/pytest_gpu.log" 2>&1
  echo "gpu tests rc=$? (${SECONDS}s)"; tail -3 "$OUT/pytest_gpu.log"  # pytest's status
fi
[ -z "${TRACES:-}" ] || run_traces $TRACES
wait
if [ -n "${ROWS:-}" ]; then
  IFS=, read -ra models <<< "${MODELS:-llama-3.2-1b 1}"
  for i in $(seq "${ROUNDS:-2}"); do
    for mb in "${models[@]}"; do
      run_ablate $mb "$ROWS"; mv "$OUT/ablate_${mb// /_b}.log" "$OUT/ablate_${mb// /_b}_new_$i.log"
      (cd abtree && export PYTHONPATH=$PWD MEGAKERNEL_CACHE_DIR=/tmp/mkcache_old \
         MK_COMMIT=${OLD_COMMIT:-abtree} OUT=$OUT/old && mkdir -p "$OUT" && run_ablate $mb "${OLD_ROWS:-$ROWS}" \
         && mv "$OUT/ablate_${mb// /_b}.log" "$OUT/ablate_${mb// /_b}_$i.log")
    done
  done
  set -f; archive_logs ${KEEP:-}; exit 0
fi
for i in 1 2; do
  for tree in new old; do
    if [ $tree = new ]; then d=.; c=/tmp/mkcache; else d=abtree; c=/tmp/mkcache_old; fi
    (cd $d && PYTHONPATH=$PWD MEGAKERNEL_CACHE_DIR=$c timeout 120 python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 --contenders megakernel --out $OUT/ab_${tree}_$i > $OUT/ab_${tree}_$i.log 2>&1)
    echo "$tree $i: $(grep -E 'megakernel: ' $OUT/ab_${tree}_$i.log | sed -E 's/.*\] (llama[^ ]*) batch ([0-9]+) megakernel: ([0-9.]+).*/\1 b\2 \3/' | tr '\n' ' ')"
  done
done
set -f; archive_logs ${KEEP:-}  # KEEP: name patterns, not expanded here
