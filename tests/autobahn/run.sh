#!/usr/bin/env bash
# Autobahn|Testsuite cases of groups 1–11 (everything but permessage-deflate, which gatelet does
# not offer) against examples/ws_echo.rs, driven by kosoku (a native runner of the original case
# files), then compared with tests/autobahn/expected-results.json. Any difference fails.
#   bash tests/autobahn/run.sh            # check
#   bash tests/autobahn/run.sh --update   # accept the current results as the expected ones
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="$root/target/e2e-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/autobahn/requirements.txt
# The debug build runs the 301 cases in seconds and reuses what `cargo test` built.
cargo build --quiet --example ws_echo
port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
target/debug/examples/ws_echo "127.0.0.1:$port" 2>target/autobahn-ws_echo.log &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  "$venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null && break
  sleep 0.1
done
out="$root/target/autobahn"
rm -rf "$out"
# kosoku exits non-zero when a case fails; the comparison below decides.
"$venv/bin/kosoku" "ws://127.0.0.1:$port" -x '12.*' -x '13.*' -p 2 -o "$out" >"$out.log" 2>&1 || true
if [ ! -f "$out/index.json" ]; then
  cat "$out.log"
  echo "kosoku wrote no report" >&2
  exit 1
fi
"$venv/bin/python" tests/autobahn/compare.py tests/autobahn/expected-results.json "$out/index.json" "$@"
