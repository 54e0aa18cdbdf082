#!/usr/bin/env bash
# Set up the environment with the test tools and run the whole test suite.
# Extra arguments go to pytest (e.g. -k export, or --reliability for the long suite).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
scripts/test_system_deps.sh
exec .venv/bin/python -m pytest "$@"
