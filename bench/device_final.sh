#!/usr/bin/env bash
# One H100 call: build, every GPU test (tensor-core matvec, TP ranks sharing the GPU, the
# rest), the bench rows of issue 6 with the CUDA-graph baseline, and the tensor-core A/B.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAKERNEL_JIT=1 MEGAKERNEL_CACHE_DIR=/tmp/mkcache MAX_JOBS=16
SECONDS=0
python3 -c "from megakernel.runtime import load_extension as l; l(verbose=True)" > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build: ${SECONDS}s"
SECONDS=0
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --maxfail=10 \
  tests/test_op_matvec_tc.py tests > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests rc=$? (${SECONDS}s)"; tail -12 "$OUT/pytest_gpu.log"
SECONDS=0
timeout 300 python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 \
  --contenders eager,cuda_graph,megakernel --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? (${SECONDS}s)"; grep -E "ms/step|FAILED" "$OUT/bench.log" | tail -12
SECONDS=0
timeout 200 python3 - > "$OUT/tc_ab.log" 2>&1 <<'PY'
import json, torch, megakernel as mk
from megakernel.bench import harness, baselines
for batch in (8, 16):
    cfg = mk.ModelConfig.preset("llama-3.2-1b")
    w = mk.Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    tokens, k, v = harness.seeded_inputs(cfg, batch, 512, "cuda")
    flush = harness.L2Flush("cuda")
    for name, flags in (("tensor_cores", ()), ("cuda_cores", ("-DMK_TC_MIN_BUCKET=32",))):
        dec, step, before = baselines.megakernel(cfg, w, batch, 512, tokens, k, v, build_flags=flags)
        ms = harness.time_steps(step, 50, 5, before=lambda: (flush(), before()))
        print(json.dumps({"model": cfg.name, "batch": batch, "matvec": name, **harness.summarize(ms)}), flush=True)
        del dec
PY
echo "tc a/b rc=$? (${SECONDS}s)"; cat "$OUT/tc_ab.log" | tail -6
