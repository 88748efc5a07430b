# Sourced by the bench/device_*.sh scripts: the environment of a device call, the extension
# build, and the archive that keeps a call's files few (only a handful come back from it).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAKERNEL_JIT=1 MEGAKERNEL_CACHE_DIR=/tmp/mkcache
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NCCL_NVLS_ENABLE=0

# Build (or find in the JIT cache) the extension; log in $OUT/build.log; exit on failure.
build_extension() {
  SECONDS=0
  python3 -c "from megakernel.runtime import load_extension as l; l(verbose=True)" \
    > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build: ${SECONDS}s"
}

# Everything in $OUT except the files matching the given name patterns -> $OUT/logs.tgz.
archive_logs() {
  local ex=() keep=() p
  for p in "$@"; do ex+=(--exclude="$p"); keep+=(! -name "$p"); done
  (cd "$OUT" && tar czf /tmp/logs.tgz "${ex[@]}" . \
    && find . -mindepth 1 "${keep[@]}" -delete && mv /tmp/logs.tgz .)
}
