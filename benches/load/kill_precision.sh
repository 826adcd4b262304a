#!/usr/bin/env bash
# Kill precision: how far past its CPU limit (cpu_ms = 50) a handler that never yields
# (`while (true) {}`) runs before the watchdog terminates its isolate. Each 503 names the CPU
# time the entry had used; the overshoot is that minus the limit.
#
#   benches/load/kill_precision.sh [OUTPOST_BINARY]
#
# Sends KILLS (default 200) such requests one after another and prints p50, p99 and max of
# the overshoot in microseconds. Uses target/release/outpost unless a binary is given.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/release/outpost}
kills=${KILLS:-200}
[ -x "$binary" ] || { echo "$binary is missing: cargo build --release -p outpost" >&2; exit 1; }

scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT
echo 'export default { fetch() { while (true) {} } };' >"$scratch/spin.js"
cat >"$scratch/outpost.toml" <<'EOF'
[[listen]]
address = "127.0.0.1:0"

[[functions]]
name = "spin"
entry = "spin.js"
routes = ["/"]
limits = { cpu_ms = 50 }
EOF
OUTPOST_LOG=error "$binary" serve --config "$scratch/outpost.toml" >"$scratch/stdout" 2>"$scratch/stderr" &
for _ in $(seq 100); do
  url=$(sed -n 's/^outpost listening on //p' "$scratch/stdout")
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { cat "$scratch/stderr" >&2; exit 1; }

for _ in $(seq "$kills"); do
  curl -s "$url/" | sed -n 's/.*terminated after \([0-9]*\) us.*/\1/p'
done | awk '{ print $1 - 50000 }' | sort -n >"$scratch/overshoot"
awk -v n="$(wc -l <"$scratch/overshoot")" '
  { v[NR] = $1 }
  END {
    if (n == 0) { print "no terminations measured"; exit 1 }
    printf "CPU limit overshoot over %d kills: p50 %d us, p99 %d us, max %d us\n",
      n, v[int(n * 0.5 + 0.5)], v[int(n * 0.99 + 0.5)], v[n]
  }' "$scratch/overshoot"
