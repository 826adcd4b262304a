#!/usr/bin/env bash
# Route caching: requests per second and p99 for the same 1 KiB response served by the
# function on every request, and served from the cache in front of it
# (`cache = { enabled = true }`, outpost-cache: HIT), interleaved, ROUNDS times (default 3),
# DURATION seconds each (default 10), with wrk (Debian package `wrk`).
#
#   benches/load/route_cache.sh [OUTPOST_BINARY]
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/release/outpost}
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
source benches/load/common.sh
load_setup
cat >"$scratch/page.js" <<'EOF'
const page = "x".repeat(1024);
export default {
  fetch: () => new Response(page, { headers: { "cache-control": "max-age=3600" } }),
};
EOF
cat >"$scratch/outpost.toml" <<'EOF'
[[listen]]
address = "127.0.0.1:0"

[[functions]]
name = "uncached"
entry = "page.js"
routes = ["uncached.test/"]

[[functions]]
name = "cached"
entry = "page.js"
routes = ["cached.test/"]
cache = { enabled = true }
EOF
start_outpost outpost

# "req/s p99_ms" for host $1.
measure() {
  wrk -t1 -c16 -d"${duration}s" --latency -H "Host: $1" "$url/" | awk '
    $1 == "Requests/sec:" { rps = $2 }
    $1 == "99%" { v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v);
      if (unit == "us") v /= 1000; else if (unit == "s") v *= 1000; p99 = v }
    END { print rps, p99 }'
}

curl -s -H "Host: cached.test" "$url/" >/dev/null # stores the entry
declare -A rps p99
for round in $(seq "$rounds"); do
  for host in uncached.test cached.test; do
    read -r r p < <(measure "$host")
    rps[$host]+="$r "
    p99[$host]+="$p "
    echo "round $round $host: $r req/s, p99 $p ms" >&2
  done
done
echo "1 KiB response, wrk -t1 -c16, median of $rounds rounds ($(nproc) cores):"
printf '%-14s %10s %8s\n' host req_s p99_ms
for host in uncached.test cached.test; do
  printf '%-14s %10s %8s\n' "$host" "$(printf '%s\n' ${rps[$host]} | median)" "$(printf '%s\n' ${p99[$host]} | median)"
done
