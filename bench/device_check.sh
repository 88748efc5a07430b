#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests, compute-sanitizer on tiny, the
# main job, and (switches) the pip-install path, the trace overhead, a quick bench row. Logs and JSON go to $OUT (or ./out). Usage: bash bench/device_check.sh
source "$(dirname "$0")/device_lib.sh"
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1
build_extension
SECONDS=0
python3 -m pytest -q -m gpu tests ${PYTEST_ARGS:-} -p no:cacheprovider -rfE \
  --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests rc=$? (${SECONDS}s)"; tail -25 "$OUT/pytest_gpu.log"
if [ "${PIPCHECK:-0}" = 1 ]; then
  # The install path: setup.py builds megakernel._C; then run it from outside the source tree.
  SECONDS=0
  python3 -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/pip_install.log" 2>&1
  echo "pip install . rc=$? (${SECONDS}s)"
  (cd /tmp && env -u PYTHONPATH MEGAKERNEL_JIT=0 python3 -c "
import torch, megakernel, megakernel._C as C  # a torch extension loads after torch
print('installed:', megakernel.__file__, C.__file__)
from megakernel.runtime import load_extension
assert load_extension() is C, 'the runtime did not pick the installed extension'
from megakernel.run_main import gpu_main
raise SystemExit(gpu_main('tiny', 2, 16))") >> "$OUT/pip_install.log" 2>&1
  echo "installed extension main job rc=$?"; tail -4 "$OUT/pip_install.log"
fi
if [ "${TRACE:-0}" = 1 ]; then
  python3 -m megakernel trace --model llama-3.2-1b --batch 1 --pos 512 --out /tmp/trace \
    > "$OUT/trace.log" 2>&1
  echo "trace rc=$?"; grep -E "^(timing overhead|step:|  predicted)" "$OUT/trace.log"
fi
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    SECONDS=0
    compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_tiny.py 4 \
      > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$? (${SECONDS}s)"; tail -4 "$OUT/sanitize_$tool.log"
  done
fi
if [ "${MAINJOB:-1}" = 1 ]; then
  python3 -m megakernel run > "$OUT/run_main.log" 2>&1
  echo "python -m megakernel run rc=$?"; tail -4 "$OUT/run_main.log"
fi
if [ "${TIMING:-1}" = 1 ]; then
  python3 -m megakernel bench --model llama-3.2-1b --batch 1 --contenders cuda_graph,megakernel \
    --out /tmp/bench > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "^\[bench" "$OUT/bench.log" | tail -4
fi
