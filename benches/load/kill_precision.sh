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
source benches/load/common.sh
load_setup
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
start_outpost outpost error

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
