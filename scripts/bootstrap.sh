#!/usr/bin/env bash
# Create (or reuse) .venv and install a requirements file into it; reinstall only when the file
# changed. Sourced by run.sh and test.sh so that both set up the same way.
#   usage: source scripts/bootstrap.sh requirements.txt
set -euo pipefail
_req="${1:?requirements file}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${OPTDEMO_VENV:-$_root/.venv}"
_python="${PYTHON:-python3}"

if [ ! -x "$_venv/bin/python" ]; then
  echo "optdemo: creating $_venv"
  "$_python" -m venv "$_venv"
fi
_stamp="$_venv/.installed-$(basename "$_req")"
_hash="$(cat "$_root/$_req" "$_root/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_hash" ]; then
  echo "optdemo: installing $_req into $_venv"
  "$_venv/bin/python" -m pip install --quiet --upgrade pip
  "$_venv/bin/python" -m pip install --quiet -r "$_root/$_req"
  echo "$_hash" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
