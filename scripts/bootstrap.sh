#!/usr/bin/env bash
# Create (or reuse) .venv and install a requirements file into it; reinstall only when the file
# changed. Sourced by run.sh, test.sh and gpu-check.sh so that all set up the same way.
#   usage: source scripts/bootstrap.sh requirements.txt
# A first install takes minutes (torch alone is hundreds of MB): pip's own lines are shown, and a
# line every $OPTDEMO_PROGRESS_SECONDS (default 10) while pip is silent (a large download), so the
# terminal never looks stuck.
set -euo pipefail
_req="${1:?requirements file}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${OPTDEMO_VENV:-$_root/.venv}"
_python="${PYTHON:-python3}"

# Run a command (pip), printing its output and, every few seconds it runs, how long it has taken.
_optdemo_with_progress() {
  local every="${OPTDEMO_PROGRESS_SECONDS:-10}" waited=0 pid
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if [ $((waited % every)) = 0 ] && kill -0 "$pid" 2>/dev/null; then
      echo "optdemo: still installing ($waited s so far)..."
    fi
  done
  wait "$pid"
}

if [ ! -x "$_venv/bin/python" ]; then
  echo "optdemo: creating $_venv"
  "$_python" -m venv "$_venv"
fi
_stamp="$_venv/.installed-$(basename "$_req")"
_hash="$(cat "$_root/$_req" "$_root/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_hash" ]; then
  echo "optdemo: installing $_req into $_venv (the first time takes a few minutes)"
  _optdemo_with_progress "$_venv/bin/python" -m pip install --quiet --upgrade pip
  _optdemo_with_progress "$_venv/bin/python" -m pip install --progress-bar on -r "$_root/$_req"
  echo "$_hash" > "$_stamp"
  echo "optdemo: $_req installed"
fi
export PATH="$_venv/bin:$PATH"
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
