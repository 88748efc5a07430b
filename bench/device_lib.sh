# Sourced by the bench/device_*.sh scripts: the environment of a device call, the extension
# build, and the archive that keeps a call's files few (only a handful come back from it).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAKERNEL_JIT=1 MEGAKERNEL_CACHE_DIR=/tmp/mkcache
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NCCL_NVLS_ENABLE=0
# A call killed by its time limit can leave a JIT build's lock file behind, and the next call
# on the same warm machine then waits on it forever (session 28: test_folding_readers hung in
# torch's file_baton.wait). Calls run one at a time, so no lock is live when one starts.
rm -f "$MEGAKERNEL_CACHE_DIR"/*/lock 2>/dev/null
# Results carry MK_COMMIT: the device copy's .git can be stale (it answered an old commit).
[ -n "${MK_COMMIT:-}" ] || echo "warning: MK_COMMIT unset: results will carry the device copy's git commit, which can be stale"

# Build (or find in the JIT cache) the extension; log in $OUT/build.log; exit on failure.
build_extension() {
  SECONDS=0
  python3 -c "from megakernel.runtime import load_extension as l; l(verbose=True)" \
    > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build: ${SECONDS}s"
}

# Start the JIT builds of the given flag sets in the background (one argument per build, its
# flags joined by '+', in the order the Runtime gets them: a row's or trace's own flags, then
# -DMK_PHASE_STAMPS=1 for `trace --phases`, then its plan options'); `wait` for them.
prebuild() {
  local f
  for f in "$@"; do
    python3 -c "import sys; from megakernel.runtime import load_extension as l; l(build_flags=tuple(sys.argv[1:]))" \
      ${f//+/ } > "$OUT/build$f.log" 2>&1 &
  done
}

# Every GPU test (the tensor-core op file first), or the pytest arguments $TEST_ARGS (files,
# node ids, -k expressions; shell-quoted: TEST_ARGS='tests/a.py -k "x or y"');
# $OUT/pytest_gpu.log, its last $1 lines. GPU_TESTS_TIMEOUT: seconds (330; the whole suite
# took ~393 s in session 22).
run_gpu_tests() {
  local args
  eval "args=(${TEST_ARGS:-tests/test_op_matvec_tc.py tests})"
  SECONDS=0
  timeout "${GPU_TESTS_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=10 \
    "${args[@]}" > "$OUT/pytest_gpu.log" 2>&1
  echo "gpu tests rc=$? (${SECONDS}s)"; tail -"${1:-12}" "$OUT/pytest_gpu.log"
}

# compute-sanitizer <tool> over a few tiny steps at <batch> (bench/sanitize_tiny.py), with
# optional plan options k=v; log $OUT/sanitize_<tool>_b<batch>[_<options>].log.
run_sanitize() {  # tool batch [options]
  local san log
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$san" ] || { echo "compute-sanitizer not found"; return 0; }
  log="$OUT/sanitize_$1_b$2${3:+_${3//[=,]/-}}.log"
  SECONDS=0
  timeout 150 "$san" --tool "$1" --error-exitcode 3 python3 bench/sanitize_tiny.py 16 "$2" ${3:-} \
    > "$log" 2>&1
  echo "$1 batch $2 ${3:-} rc=$? (${SECONDS}s)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^tiny" "$log"
}

# Everything in $OUT except the files matching the given name patterns -> $OUT/logs.tgz.
# A kept file inside a subdirectory leaves that directory behind (find cannot delete it):
# the tarball is moved in regardless (session 21 lost a call's traces to that `&&`).
archive_logs() {
  local ex=() keep=() p
  for p in "$@"; do ex+=(--exclude="$p"); keep+=(! -name "$p"); done
  (cd "$OUT" && tar czf /tmp/logs.tgz "${ex[@]}" . \
    && { find . -mindepth 1 "${keep[@]}" -delete 2>/dev/null; mv /tmp/logs.tgz .; })
}

# `ablate` of one model/batch over the comma-separated grid rows (all: the whole grid);
# log $OUT/ablate_<model>_b<batch>.log, the table printed. Nothing when rows is empty.
run_ablate() {  # model batch rows
  [ -n "$3" ] || return 0
  local rows=(--rows "$3"); [ "$3" = all ] && rows=()
  SECONDS=0
  timeout "${ABLATE_TIMEOUT:-240}" python3 -m megakernel ablate --model "$1" --batch "$2" --iters 50 \
    "${rows[@]}" --out "$OUT" > "$OUT/ablate_$1_b$2.log" 2>&1
  echo "ablate $1 b$2 rc=$? (${SECONDS}s)"; grep -E "^\|" "$OUT/ablate_$1_b$2.log" | cut -c1-150 | head -40
}

# Traces of $TRACE_MODEL (llama-3.2-1b) at batch $TRACE_BATCH (1): the default build, then one per argument
# (a build flag such as -DMK_RELEASE_QUIET=0, a trace option such as --phases, or a runtime
# switch such as no_load; several joined by '+', e.g. --phases+-DMK_INFLIGHT_PAGES=1);
# $OUT/trace*/.
run_traces() {
  local flags dir f opts
  for flags in "" "$@"; do
    SECONDS=0
    dir="$OUT/trace${flags:+_$(echo "$flags" | sed -E 's/(^|\+)-(-|D)/\1/g; s/\+/_/g')}"
    opts=()
    for f in ${flags//+/ }; do
      case "$f" in -D*) opts+=(--build-flag=$f) ;; --*) opts+=($f) ;; *) opts+=(--ablate=$f) ;; esac
    done
    timeout 120 python3 -m megakernel trace --model "${TRACE_MODEL:-llama-3.2-1b}" --batch "${TRACE_BATCH:-1}" \
      --out "$dir" "${opts[@]}" > "$dir.log" 2>&1
    echo "trace ${flags:-default} rc=$? (${SECONDS}s)"; tail -3 "$dir.log"
    sed -n '/^release/p; /^ring pages/,/^$/p; /^loader/,/^$/p; /^phases/,/^$/p' "$dir.log"
    rm -f "$dir/trace.json"  # the .npz keeps it (trace --from-npz)
  done
}

# ncu warp-state and source counters of one megakernel step (a `trace` run of <model> at
# <batch>, its third launch: timing off); $OUT/ncu_<model>_b<batch>.ncu-rep, the details
# page as CSV and the per-SASS-instruction source page (stall samples) as .csv.gz.
run_ncu() {  # model batch
  local ncu rep="$OUT/ncu_$1_b$2"
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu not found"; return 0; }
  SECONDS=0
  timeout 330 "$ncu" --clock-control none --target-processes all --kernel-name regex:megakernel \
    --launch-skip 2 --launch-count 1 --section WarpStateStats --section SourceCounters \
    --section SpeedOfLight --section MemoryWorkloadAnalysis -o "$rep" -f \
    python3 -m megakernel trace --model "$1" --batch "$2" --iters 3 --warmup 1 \
    --out /tmp/ncu_trace > "$rep.log" 2>&1
  echo "ncu $1 b$2 rc=$? (${SECONDS}s)"
  "$ncu" -i "$rep.ncu-rep" --page details --csv > "$rep.details.csv" 2>&1
  "$ncu" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1
  gzip -f "$rep.sass.csv"
}
