#!/usr/bin/env bash
# Quickstart: set up the environment, export the embedded default models (first run only)
# and serve them. Extra arguments go to `appliance up` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/appliance up "$@"
