#!/usr/bin/env bash
# Neighbour degradation: the p99 latency of a hello-world function under load, alone and
# while another tenant's function burns 40 ms of CPU per request on 4 connections, on a
# node that demotes long entries into JS (`server.demote_long_entries`, the default) and on
# one that does not.
#
#   benches/load/neighbour.sh [OUTPOST_BINARY]
#
# Runs `alone` and `with hog` on both nodes interleaved, ROUNDS times (default 3), each for
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
# One node with long entries demoted (the default), one without: measured side by side.
start_node() { # name, extra [server] lines
  { printf '[server]\n%s\n' "$2"; cat "$scratch/outpost.toml"; } >"$scratch/$1.toml"
  start_outpost "$1"
}
declare -A urls
start_node demoted "demote_long_entries = true"
urls[demoted]=$url
start_node not-demoted "demote_long_entries = false"
urls[not-demoted]=$url

# The p99 wrk reports for the healthy function at $1, in milliseconds.
p99_ms() {
  wrk -t1 -c8 -d"${duration}s" --latency "$1/" | awk '$1 == "99%" {
    v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v);
    if (unit == "us") v /= 1000; else if (unit == "s") v *= 1000;
    print v }'
}

declare -A alone hog
for variant in demoted not-demoted; do
  wrk -t1 -c8 -d2s "${urls[$variant]}/" >/dev/null # warm-up
done
for round in $(seq "$rounds"); do
  for variant in demoted not-demoted; do
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
for variant in demoted not-demoted; do
  a=$(printf '%s\n' ${alone[$variant]} | median)
  h=$(printf '%s\n' ${hog[$variant]} | median)
  printf '%-12s %10s %10s %7s\n' "$variant" "$a" "$h" "$(awk -v a="$a" -v h="$h" 'BEGIN { printf "%.2f", h / a }')"
done
