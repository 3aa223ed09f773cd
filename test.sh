#!/usr/bin/env bash
# Set everything up (first run only), lint, and run the whole test suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh requirements-dev.txt

# The browser tests drive Debian's Chromium (never a downloaded browser); install it when we can.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "optdemo: installing chromium (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "optdemo: could not install chromium; browser tests will be skipped"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export OPTDEMO_CACHE="${OPTDEMO_CACHE:-$PWD/.venv/optdemo-cache}"
ruff check .
ruff format --check .
python -m pytest "$@"
