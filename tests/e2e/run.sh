#!/usr/bin/env bash
# End-to-end tests with real clients: the official `openai` SDKs (Python and Node), the Vercel AI
# SDK, LangChain, LiteLLM (SDK and proxy), the `llm` CLI, `websockets`, curl.
# Creates a virtual environment under target/e2e-venv, installs the pinned Node packages of
# tests/e2e/node with `npm ci`, builds the debug binary, runs pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="$root/target/e2e-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt

node_dir="$root/tests/e2e/node"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "tests/e2e/run.sh: node and npm (Node 20 or later) are needed for the Node client tests" >&2
  exit 1
fi
# `npm ci` only when the lockfile changed since the last install (the stamp is a copy of it).
if ! cmp -s "$node_dir/package-lock.json" "$node_dir/node_modules/.installed-lock.json"; then
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$node_dir/package-lock.json" "$node_dir/node_modules/.installed-lock.json"
fi

cargo build --quiet
export GATELET_BIN="${GATELET_BIN:-$root/target/debug/gatelet}"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2e "$@"
