#!/usr/bin/env bash
# Prove the GPU paths on a machine with an NVIDIA GPU, in one command (about 5-8 minutes):
#   1. the engine tests, the CUDA tests included (tests/gpu/test_cuda.py: real Accelerate dispatch over
#      GPU + CPU + disk, every CPU-layer policy against plain Accelerate, memory bounds, unload,
#      bitsandbytes), on this GPU;
#   2. scripts/gpu_bench.py: random-weight opt-6.7b float16 with 0=5GiB,cpu=10GiB and with a disk
#      tier, plain Accelerate against each policy, written to $OUT/gpu-bench.{json,md}.
# Usage: scripts/gpu-check.sh   (results in $OUT, default ./gpu-check-out)
# On a fresh clone it sets itself up first: .venv (or $OPTDEMO_VENV) through scripts/bootstrap.sh
# with requirements-dev.txt, unless $PYTHON names an interpreter that has them. Without an NVIDIA
# GPU it stops at once, before installing anything, with one line saying so (exit 1).
# Wheels in .whl/ (e.g. the pinned transformers, bitsandbytes, httpx2 with httpcore2 and truststore)
# are installed first when present, for machines that cannot reach a package index. Says plainly
# what it could not run.
set -uo pipefail
cd "$(dirname "$0")/.."

no_gpu() {
  echo "no NVIDIA GPU here: $1; run scripts/gpu-check.sh on a machine with one (./test.sh runs the CPU tests)" >&2
  exit 1
}
# First, whether there is a GPU at all: nvidia-smi is the driver's own tool, and needs no Python.
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not installed (no NVIDIA driver)"
gpus="$(nvidia-smi -L 2>&1)" || no_gpu "nvidia-smi failed ($(echo "$gpus" | head -n 1))"
echo "$gpus" | grep -q "^GPU " || no_gpu "nvidia-smi lists none"

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  # The same setup as run.sh and test.sh, in a subshell (it stops at its first error).
  (source scripts/bootstrap.sh requirements-dev.txt) || {
    echo "optdemo: could not set up ${OPTDEMO_VENV:-.venv} (see pip above): or give PYTHON=an interpreter with requirements-dev.txt" >&2
    exit 1
  }
  PY="${OPTDEMO_VENV:-$PWD/.venv}/bin/python"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/optdemo-gpu-site .whl/*.whl && export PYTHONPATH=/tmp/optdemo-gpu-site
fi
# What the tests import, named when missing (rather than a ModuleNotFoundError's traceback).
needed="torch transformers accelerate psutil huggingface_hub safetensors pytest"
missing="$("$PY" -c "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if not u.find_spec(m)])" $needed 2>&1)" \
  || { echo "optdemo: $PY does not run: $missing" >&2; exit 1; }
[ -z "$missing" ] \
  || { echo "optdemo: $PY lacks $missing: install requirements-dev.txt into it (or unset PYTHON)" >&2; exit 1; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || no_gpu "nvidia-smi lists one, but torch (a CPU-only build?) cannot use it"

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
timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu tests/plan tests/core/test_budget.py \
  tests/runtime/test_loader.py tests/runtime/test_generation.py tests/runtime/tiers 2>&1 | tee "$OUT/pytest.txt"
tests=${PIPESTATUS[0]}
[ "$tests" = 124 ] && echo "NOT RUN: the tests passed their 300 s limit" | tee -a "$OUT/pytest.txt"

echo "== benchmark"
timeout 360 "$PY" scripts/gpu_bench.py --out "$OUT" --time-limit 330 "$@" 2>&1 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
[ "$bench" = 124 ] && echo "NOT RUN: the benchmark passed its 360 s limit" | tee -a "$OUT/bench.txt"

echo "== summary: tests exit $tests, benchmark exit $bench; results in $OUT"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
