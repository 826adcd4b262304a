#!/usr/bin/env bash
# Neighbour degradation: the p99 latency of a hello-world function under load, alone and
# while another tenant's function burns 40 ms of CPU per request on 4 connections, on three
# nodes:
#   lane          the defaults: the hog moves to the slow lane (a thread of its own) and its
#                 long entries are demoted to SCHED_IDLE (`server.demote_long_entries`)
#   lane-only     the hog moves to the slow lane, no demotion
#   no-lane       the hog stays on the shards (`server.slow_lane_entry_ms = 0`), no demotion
#
#   benches/load/neighbour.sh [OUTPOST_BINARY]
#
# Runs `alone` and `with hog` on the three nodes interleaved, ROUNDS times (default 3), each for
# DURATION seconds (default 10), with wrk (Debian package `wrk`), and prints the median p99
# of each and their ratio. Uses target/release/outpost unless a binary is given.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/release/outpost}
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
source benches/load/common.sh
load_setup
cat >"$scratch/healthy.js" <<'EOF'
export default { fetch: () => new Response("hello") };
EOF
cat >"$scratch/hog.js" <<'EOF'
export default {
  fetch() {
    const end = performance.now() + 40;
    while (performance.now() < end) {}
    return new Response("burned");
  },
};
EOF
cat >"$scratch/outpost.toml" <<'EOF'
[[listen]]
address = "127.0.0.1:0"

[[functions]]
name = "healthy"
entry = "healthy.js"
routes = ["/"]

[[functions]]
name = "hog"
entry = "hog.js"
routes = ["hog.test/"]
limits = { cpu_ms = 100 }
EOF
# The three nodes, measured side by side.
start_node() { # name, extra [server] lines
  { printf '[server]\n%s\n' "$2"; cat "$scratch/outpost.toml"; } >"$scratch/$1.toml"
  start_outpost "$1"
}
variants=(lane lane-only no-lane)
declare -A urls
start_node lane "demote_long_entries = true"
urls[lane]=$url
start_node lane-only "demote_long_entries = false"
urls[lane-only]=$url
start_node no-lane $'demote_long_entries = false\nslow_lane_entry_ms = 0'
urls[no-lane]=$url

# The p99 wrk reports for the healthy function at $1, in milliseconds.
p99_ms() {
  wrk -t1 -c8 -d"${duration}s" --latency "$1/" | awk '$1 == "99%" {
    v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v);
    if (unit == "us") v /= 1000; else if (unit == "s") v *= 1000;
    print v }'
}

declare -A alone hog
for variant in "${variants[@]}"; do
  wrk -t1 -c8 -d2s "${urls[$variant]}/" >/dev/null # warm-up
  # The hog's first requests show it is slow; it then moves to the slow lane (where allowed).
  wrk -t1 -c4 -d3s -H "Host: hog.test" "${urls[$variant]}/" >/dev/null
done
for round in $(seq "$rounds"); do
  for variant in "${variants[@]}"; do
    url=${urls[$variant]}
    a=$(p99_ms "$url")
    wrk -t1 -c4 -d"$((duration + 2))s" -H "Host: hog.test" "$url/" >/dev/null &
    hog_load=$!
    sleep 1
    h=$(p99_ms "$url")
    wait "$hog_load"
    alone[$variant]+="$a "
    hog[$variant]+="$h "
    echo "round $round $variant: p99 alone $a ms, with hog $h ms" >&2
  done
done
echo "healthy function p99, median of $rounds rounds ($(nproc) cores, $(uname -r)):"
printf '%-12s %10s %10s %7s\n' variant alone_ms hog_ms ratio
for variant in "${variants[@]}"; do
  a=$(printf '%s\n' ${alone[$variant]} | median)
  h=$(printf '%s\n' ${hog[$variant]} | median)
  printf '%-12s %10s %10s %7s\n' "$variant" "$a" "$h" "$(awk -v a="$a" -v h="$h" 'BEGIN { printf "%.2f", h / a }')"
done
