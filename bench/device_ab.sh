#!/usr/bin/env bash
# One H100 call: the working tree against another tree in abtree/ (an ignored directory,
# e.g. `git archive <commit> | tar -x -C abtree`, carried with carry=["abtree"]): both
# built, the decoder and TP GPU tests of the working tree, then two alternating rounds of
# the megakernel-only bench (llama-3.2-1b, llama-3.1-8b, batch 1 and 8). Set MK_COMMIT;
# TESTS=0 skips the tests, TEST_FILES adds test files; TRACES="flag ..." adds traces of the
# working tree (run_traces).
source bench/device_lib.sh
build_extension
SECONDS=0
[ "${TESTS:-1}" = 0 ] || timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=5 tests/test_gpu_tp.py tests/test_gpu_decoder.py ${TEST_FILES:-} > "$OUT/pytest_gpu.log" 2>&1
[ "${TESTS:-1}" = 0 ] || { echo "gpu tests rc=$? (${SECONDS}s)"; tail -3 "$OUT/pytest_gpu.log"; }
[ -z "${TRACES:-}" ] || run_traces $TRACES
(cd abtree && PYTHONPATH=$PWD MEGAKERNEL_CACHE_DIR=/tmp/mkcache_old python3 -c "from megakernel.runtime import load_extension as l; l()" > $OUT/build_old.log 2>&1; echo "old build rc=$?")
for i in 1 2; do
  for tree in new old; do
    if [ $tree = new ]; then d=.; c=/tmp/mkcache; else d=abtree; c=/tmp/mkcache_old; fi
    (cd $d && PYTHONPATH=$PWD MEGAKERNEL_CACHE_DIR=$c timeout 120 python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 --contenders megakernel --out $OUT/ab_${tree}_$i > $OUT/ab_${tree}_$i.log 2>&1)
    echo "$tree $i: $(grep -E 'megakernel: ' $OUT/ab_${tree}_$i.log | sed -E 's/.*\] (llama[^ ]*) batch ([0-9]+) megakernel: ([0-9.]+).*/\1 b\2 \3/' | tr '\n' ' ')"
  done
done
set -f; archive_logs ${KEEP:-}  # KEEP: name patterns, not expanded here
