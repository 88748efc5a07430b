#!/usr/bin/env bash
# One device call on a multi-GPU machine (nvidia-h200-x2): build, the tensor-parallel GPU
# tests, then `bench --tp $TP` for the issue's models. Logs and results go to $OUT.
# Usage: MK_COMMIT=<hash> TP=2 MODELS="llama-3.1-8b llama-3.1-70b" bash bench/device_tp.sh
# (TESTS=0 skips the tests, BENCH=0 the bench; VARIANTS=a,b,... picks the bench's variants,
# EXTRA_TESTS adds test files to the tp ones; TP_SETS: an A/B of settings, below)
source "$(dirname "$0")/device_lib.sh"
TP=${TP:-2}; MODELS=${MODELS:-"llama-3.1-8b llama-3.1-70b"}; BATCHES=${BATCHES:-1}
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())"; } > "$OUT/env.txt" 2>&1
build_extension
if [ "${TESTS:-1}" = 1 ]; then
  SECONDS=0
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests/test_gpu_tp.py tests/test_tp_baseline.py ${EXTRA_TESTS:-} \
    -p no:cacheprovider -rfE > "$OUT/pytest_tp.log" 2>&1
  echo "tp gpu tests rc=$? (${SECONDS}s)"; tail -12 "$OUT/pytest_tp.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  SECONDS=0
  args=(); for m in $MODELS; do args+=(--model "$m"); done
  for b in $BATCHES; do args+=(--batch "$b"); done
  [ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
  timeout "${BENCH_TIMEOUT:-480}" python3 -m megakernel bench --tp "$TP" "${args[@]}" --iters "${ITERS:-30}" \
    --warmup 5 --graph-timeout "${GRAPH_TIMEOUT:-150}" --out "$OUT" > "$OUT/bench_tp.log" 2>&1
  echo "bench --tp $TP rc=$? (${SECONDS}s)"; grep -E "^\[bench" "$OUT/bench_tp.log" | tail -14
fi
# TP_SETS="set1;set2;..." (each as tp_options --set: plan options k=v and build flags -D...,
# comma-separated; an empty set is the default): a same-process A/B per model.
if [ -n "${TP_SETS:-}" ]; then
  IFS=';' read -ra sets <<< "$TP_SETS"
  set_args=(); for s in "${sets[@]}"; do set_args+=("--set=$s"); done
  for m in $MODELS; do
    SECONDS=0
    timeout "${SETS_TIMEOUT:-240}" python3 -m megakernel.bench.tp_options --model "$m" --tp "$TP" \
      "${set_args[@]}" > "$OUT/tp_options_$m.log" 2>&1
    echo "tp_options $m rc=$? (${SECONDS}s)"; grep '^{' "$OUT/tp_options_$m.log"
  done
fi
archive_logs 'bench_nvidia*'  # at most 8 files come back: the bench's, and logs.tgz
