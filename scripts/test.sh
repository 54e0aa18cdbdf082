#!/usr/bin/env bash
# Set up the environment with the test tools and run the whole test suite.
# Extra arguments go to pytest (e.g. -k export, -m ray, or --reliability for the long suite).
# The `ray` extra is installed too, so the scale-out tests (tests/test_scale_ray.py) run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,ray
scripts/test_system_deps.sh
exec .venv/bin/python -m pytest "$@"
