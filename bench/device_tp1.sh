set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAKERNEL_JIT=1 MEGAKERNEL_CACHE_DIR=/tmp/mkcache MAX_JOBS=16
SECONDS=0
python3 -c "from megakernel.runtime import load_extension as l; l(verbose=True)" > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -40 "$OUT/build.log"; exit 1; }
echo "build ${SECONDS}s"
SECONDS=0
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_tp.py -p no:cacheprovider -rfE -x > "$OUT/pytest_tp.log" 2>&1
echo "tp tests rc=$? ${SECONDS}s"; tail -30 "$OUT/pytest_tp.log"
SECONDS=0
timeout 240 python3 -m pytest -q -m gpu tests --ignore=tests/test_gpu_tp.py -p no:cacheprovider -rfE > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests rc=$? ${SECONDS}s"; tail -8 "$OUT/pytest_gpu.log"
timeout 100 python3 -m megakernel bench --model llama-3.2-1b --batch 1 --contenders cuda_graph,megakernel --out $OUT > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -E "^\[bench" "$OUT/bench.log" | tail -3
