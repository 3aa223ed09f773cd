#!/usr/bin/env bash
# Prove the GPU paths on a machine with an NVIDIA GPU, in one command (about 5-8 minutes):
#   1. the engine tests, the CUDA tests included (tests/test_cuda.py: real Accelerate dispatch over
#      GPU + CPU + disk, every CPU-layer policy against plain Accelerate, memory bounds, unload,
#      bitsandbytes), on this GPU;
#   2. scripts/gpu_bench.py: random-weight opt-6.7b float16 with 0=5GiB,cpu=10GiB and with a disk
#      tier, plain Accelerate against each policy, written to $OUT/gpu-bench.{json,md}.
# Usage: scripts/gpu-check.sh   (results in $OUT, default ./gpu-check-out)
# Wheels in .whl/ (e.g. the pinned transformers, bitsandbytes, httpx2 with httpcore2 and truststore)
# are installed first when present, for machines that cannot reach a package index. Says plainly
# what it could not run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
[ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/optdemo-gpu-site .whl/*.whl && export PYTHONPATH=/tmp/optdemo-gpu-site
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
export OPTDEMO_CACHE="${OPTDEMO_CACHE:-/tmp/optdemo-gpu-cache}"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max \
    --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null \
    || echo "bitsandbytes: not installed (the 8-bit/4-bit tests are skipped)"
  nproc | sed 's/^/cpus: /'
} 2>&1 | tee "$OUT/environment.txt"

# Engine tests only: the app tests need gradio and a browser, which GPU boxes often lack.
echo "== tests"
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_gpu_offload.py \
  tests/test_budget.py tests/test_config_catalog.py tests/test_planner.py tests/test_loading.py \
  tests/test_generation.py tests/test_fast_offload.py 2>&1 | tee "$OUT/pytest.txt"
tests=${PIPESTATUS[0]}
[ "$tests" = 124 ] && echo "NOT RUN: the tests passed their 120 s limit" | tee -a "$OUT/pytest.txt"

echo "== benchmark"
timeout 360 "$PY" scripts/gpu_bench.py --out "$OUT" --time-limit 330 "$@" 2>&1 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
[ "$bench" = 124 ] && echo "NOT RUN: the benchmark passed its 360 s limit" | tee -a "$OUT/bench.txt"

echo "== summary: tests exit $tests, benchmark exit $bench; results in $OUT"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
