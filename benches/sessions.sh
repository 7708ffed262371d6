#!/usr/bin/env bash
# Session store bench: per-turn latency (p50, p99), start-up time and disk bytes per session at
# 100, 1k, 10k and 100k stored sessions, as a table with ratios against 100. Extra arguments go
# to sessions.py (see `python3 benches/sessions.py --help`), e.g. `--sizes 100,1000 --turns 500`
# or `--dir /dev/shm` (a tmpfs state dir: the store's own cost without the disk's sync time).
#
#   nice -n 10 bash benches/sessions.sh
#   GATELET_BIN=/path/to/gatelet bash benches/sessions.sh
#
# Standard-library Python only. Stops by itself within 30 minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
if [[ -n "${GATELET_BIN:-}" ]]; then
  bin=$GATELET_BIN
else
  (cd "$root" && cargo build --release --quiet)
  bin=$root/target/release/gatelet
fi
[[ -x "$bin" ]] || { echo "sessions.sh: no gatelet binary at $bin" >&2; exit 2; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/gatelet-bench.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp "$bin" "$scratch/gatelet"

cmd="${GATELET_BIN:+GATELET_BIN=$GATELET_BIN }bash benches/sessions.sh${*:+ $*}"
timeout --kill-after=10 1800 python3 "$here/sessions.py" --bin "$scratch/gatelet" --command "$cmd" "$@"
