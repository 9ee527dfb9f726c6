#!/usr/bin/env bash
# One GPU session's measurements for issue 21 in one command, within ~9.5 minutes (the device's per-command limit is
# 10): the environment, `bench/gpu_launch.py` (do program launches wait for the devices? the attention kernels'
# settings) and `bench/gpu_serve.py` (serving through HTTP and the engine alone, then the engine once more under the
# profiler: how long the device sat idle between programs), then `bench/gpu.py --diagnose --quantization fp8` (float8
# weights and products beside bfloat16). Results land in OUT as they come (a timeout still leaves them). On the GPU
# host:
#   pip install --no-deps --target /tmp/wh .gpu_wheels/*.whl; PYTHONPATH=.:/tmp/wh bench/gpu_session.sh $OUT
# where .gpu_wheels holds, for CPython 3.12 on manylinux x86-64, what the host lacks: llguidance, gguf and aiohttp-cors
# at pyproject.toml's versions (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`).
# On a CPU: PY=.venv/bin/python bench/gpu_session.sh /tmp/gpu_out --smoke
set -o pipefail
OUT=${1:?usage: bench/gpu_session.sh OUT [--smoke]}
SMOKE=${2:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log"
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/log"
if [ -z "$SKIP_LAUNCH" ]; then
  timeout "${LAUNCH_LIMIT:-240}" $PY bench/gpu_launch.py $SMOKE 2>&1 | tee "$OUT/launch.log"
fi
EXTRA=""
if grep -q "chunks: failed" "$OUT/launch.log" 2>/dev/null; then  # the ragged kernel did not run: serve without it
  EXTRA="--flat-step off"
  echo "--- the ragged kernel failed: serving with $EXTRA" | tee -a "$OUT/log"
fi
timeout "${SERVE_LIMIT:-330}" $PY bench/gpu_serve.py --tokenizer .gpu_tok --out /tmp/gpu_serve --results "$OUT" \
  --server-args="$EXTRA" $SMOKE 2>&1 | tee -a "$OUT/log"
pkill -f "m server --model" 2>/dev/null
# --quantization fp8, then bfloat16 (decode at 1 and 256 rows, a prefill's forward pass), in what time is left of the
# call (SESSION_LIMIT: its seconds; fp8 first, so a cut keeps it)
LEFT=$(( ${SESSION_LIMIT:-430} - SECONDS ))
if [ -n "$SMOKE" ] || [ "$LEFT" -ge 60 ]; then
  timeout "${FP8_LIMIT:-$LEFT}" $PY bench/gpu.py --diagnose --scan-only --quantization fp8 $SMOKE 2>&1 | tee "$OUT/fp8.log"
else
  echo "--- fp8 skipped: $LEFT s left" | tee -a "$OUT/log"
fi
echo "--- done at $SECONDS s" | tee -a "$OUT/log"
