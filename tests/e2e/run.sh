#!/usr/bin/env bash
# End-to-end tests with real clients (the official `openai` SDK, `websockets`, curl).
# Creates a virtual environment under target/e2e-venv, builds the debug binary, runs pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="$root/target/e2e-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
cargo build --quiet
export GATELET_BIN="${GATELET_BIN:-$root/target/debug/gatelet}"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2e "$@"
