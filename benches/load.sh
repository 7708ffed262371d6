#!/usr/bin/env bash
# Load bench entry point: build the release binary if needed, copy it to a scratch dir (so a
# rebuild during the run cannot change what is measured), strip a copy for the size row, and run
# benches/load.py, then the WebSocket and time-to-first-token benches. Extra arguments go to
# load.py (see `python3 benches/load.py --help`).
#
#   GATELET_BIN=new bash benches/load.sh --ops-off same --ops-before old --ops-only
#       # cost of /metrics and the access log: each binary with them off, metrics only, and both,
#       # interleaved; server CPU per request beside req/s
#
#   bash benches/load.sh                       # build, then bench target/release/gatelet
#   GATELET_BIN=/path/to/gatelet bash benches/load.sh   # bench an existing binary, no build
#
# Needs wrk, nginx, curl and taskset (Debian: apt-get install -y wrk nginx curl util-linux);
# a missing tool is reported and its rows are left empty. Stops by itself within 10 minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
if [[ -n "${GATELET_BIN:-}" ]]; then
  bin=$GATELET_BIN
  rev="GATELET_BIN, tree at $rev"
else
  (cd "$root" && cargo build --release --quiet)
  bin=$root/target/release/gatelet
fi
[[ -x "$bin" ]] || { echo "load.sh: no gatelet binary at $bin" >&2; exit 2; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/gatelet-bench.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp "$bin" "$scratch/gatelet"
strip -o "$scratch/gatelet.stripped" "$scratch/gatelet"

exec_cmd="${GATELET_BIN:+GATELET_BIN=$GATELET_BIN }bash benches/load.sh${*:+ $*}"
timeout --kill-after=10 600 python3 "$here/load.py" \
  --gatelet "$scratch/gatelet.stripped" --stripped "$scratch/gatelet.stripped" \
  --rev "$rev" --command "$exec_cmd" "$@"

# --ops-only: only the operations-overhead table was asked for.
for arg in "$@"; do [[ $arg == --ops-only ]] && exit 0; done

# Same binary, same run: WebSocket memory and round trips, then the time to first token added by
# the `openai` backend over calling its upstream directly.
echo
echo "== WebSocket: 1,000 idle authenticated connections, agent-run round trips"
timeout --kill-after=10 300 python3 "$here/ws_bench.py" --bin "$scratch/gatelet.stripped"
echo
echo "== openai backend: time to first token, direct vs through gatelet"
timeout --kill-after=10 300 python3 "$here/ttft_bench.py" --bin "$scratch/gatelet.stripped" -n 200
