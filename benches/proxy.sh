#!/usr/bin/env bash
# Proxied-load bench entry point: build the release binary if needed, copy it to a scratch dir (so
# a rebuild during the run cannot change what is measured), then run benches/proxy.py (gatelet's
# `openai` backend in front of a canned nginx upstream, direct vs through gatelet) and the
# time-to-first-token bench over a kept-alive upstream. Extra arguments go to proxy.py.
#
#   nice -n 10 bash benches/proxy.sh                        # build, then bench target/release/gatelet
#   GATELET_BIN=/path/to/gatelet bash benches/proxy.sh      # bench an existing binary, no build
#
# Needs wrk, nginx and taskset (Debian: apt-get install -y wrk nginx-light util-linux).
# Stops by itself within 10 minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

if [[ -n "${GATELET_BIN:-}" ]]; then
  bin=$GATELET_BIN
else
  (cd "$root" && cargo build --release --quiet)
  bin=$root/target/release/gatelet
fi
[[ -x "$bin" ]] || { echo "proxy.sh: no gatelet binary at $bin" >&2; exit 2; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/gatelet-proxy.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp "$bin" "$scratch/gatelet"

echo "== openai backend under load: canned nginx upstream, direct vs through gatelet ($(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown))"
timeout --kill-after=10 400 python3 "$here/proxy.py" --bin "$scratch/gatelet" \
  --command "bash benches/proxy.sh${*:+ $*}" "$@"
echo
echo "== openai backend: time to first token over a kept-alive upstream, direct vs through gatelet"
timeout --kill-after=10 200 python3 "$here/ttft_bench.py" --bin "$scratch/gatelet" -n 300
