#!/usr/bin/env bash
# Set everything up (first run only) and start the app: ./run.sh [app.py flags, see --help]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh requirements.txt
exec python app.py "$@"
