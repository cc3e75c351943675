#!/usr/bin/env bash
# Runs every test: GoogleTest through ctest, then pytest. Sets up first (scripts/setup.sh), so it
# also works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
echo "== C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j "$(nproc)"
echo "== Python tests (pytest)"
python3 -m pytest tests/python -q
