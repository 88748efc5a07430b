#!/usr/bin/env bash
# Issue 5 in one device call (<= 9 min on an H100): build the extension, trace llama-3.2-1b
# batch 1 with calibration, then the bench (llama-3.2-1b and llama-3.1-8b at batch 1 and 8,
# every contender; torch.compile children get whatever is left of the time budget).
# Writes at most 8 flat files to $OUT (default ./out): device_bench.log, trace.json,
# gantt.png, trace.npz, <gpu>.json (calibration), bench_<gpu>_<time>.json/.md/.png.
# Copy them into bench/results/ (the calibration into bench/results/calibration/).
# Usage: MK_COMMIT=$(git rev-parse --short HEAD) bash bench/device_bench.sh
#        (BUDGET_S=540 total seconds; COMPILE_TIMEOUT_S=120 per torch.compile child)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAKERNEL_JIT=1 MEGAKERNEL_CACHE_DIR=/tmp/mkcache
export MAX_JOBS=16 NCCL_NVLS_ENABLE=0 MK_COMMIT=${MK_COMMIT:-unknown}
BUDGET_S=${BUDGET_S:-540}
LOG="$OUT/device_bench.log"
: > "$LOG"
step() { echo "== $* ($SECONDS s)" | tee -a "$LOG"; }

step environment
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import matplotlib" 2>/dev/null || echo "matplotlib missing: PNGs are redone offline"
} >> "$LOG" 2>&1

step build
python3 -c "from megakernel.runtime import load_extension as l; l()" >> "$LOG" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$LOG"; exit 1; }

step "trace llama-3.2-1b batch 1 --calibrate"
python3 -m megakernel trace --model llama-3.2-1b --batch 1 --pos 512 --calibrate \
  --out "$OUT" --calibration-dir "$OUT" >> "$LOG" 2>&1
echo "trace rc=$?" | tee -a "$LOG"

LEFT=$((BUDGET_S - SECONDS))
step "bench, time limit ${LEFT} s"
python3 -m megakernel bench --model llama-3.2-1b --model llama-3.1-8b --batch 1 --batch 8 \
  --pos 512 --compile-timeout "${COMPILE_TIMEOUT_S:-120}" --time-limit "$LEFT" --out "$OUT" \
  >> "$LOG" 2>&1
echo "bench rc=$?" | tee -a "$LOG"
step done

# The summary: the trace's verdicts, the bench's progress and table.
grep -E "^(timing overhead|calibration|step:|  predicted|re-planned|trace:|gantt:|kept|bench:)" "$LOG"
grep -E "^\[bench" "$LOG" | tail -30
sed -n '/^# megakernel bench/,$p' "$LOG" | head -60
grep -E "Traceback|Error" "$LOG" | head -10
ls -la "$OUT"
