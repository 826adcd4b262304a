#!/usr/bin/env bash
# Isolate churn soak: healthy requests mixed with requests whose isolates are terminated
# and replaced (CPU spins past the limit, heap bombs past the memory limit) and handler
# exceptions, for WARMUP + DURATION seconds. Samples the server's RSS every SAMPLE seconds and
# prints, after the warm-up, the RSS slopes (least squares, MiB per minute), the first and
# last RSS, and how many isolates were terminated and replaced.
#
#   benches/load/churn.sh [OUTPOST_BINARY]
#
# Defaults: WARMUP=60, DURATION=600, SAMPLE=5, FAULT_LOOPS=2. Goal: a slope within noise of
# zero over 10 minutes (memory per replaced isolate is given back). Uses
# target/release/outpost unless a binary is given.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/release/outpost}
warmup=${WARMUP:-60}
duration=${DURATION:-600}
sample=${SAMPLE:-5}
fault_loops=${FAULT_LOOPS:-2}
source benches/load/common.sh
load_setup
cat >"$scratch/healthy.js" <<'JS'
export default { fetch: () => new Response("hello") };
JS
cat >"$scratch/faulty.js" <<'JS'
const kept = [];
export default {
  fetch(request) {
    switch (new URL(request.url).pathname) {
      case "/spin": for (;;) {}
      case "/bomb": for (;;) kept.push(new Array(100000).fill(Math.random()));
      case "/throw": throw new Error("thrown on purpose");
    }
    return new Response("faulty but fine");
  },
};
JS
cat >"$scratch/churn.toml" <<'TOML'
[[listen]]
address = "127.0.0.1:0"

[[functions]]
name = "healthy"
entry = "healthy.js"
routes = ["/"]

[[functions]]
name = "faulty"
entry = "faulty.js"
routes = ["faulty.test/"]
limits = { cpu_ms = 20, memory_mb = 32 }
TOML
start_outpost churn warn
pid=${servers[-1]}

fault_loop() {
  while true; do
    for path in /spin /bomb /throw /spin /bomb; do
      curl -s -o /dev/null -H "host: faulty.test" "$url$path" || true
    done
  done
}
for _ in $(seq "$fault_loops"); do fault_loop & done
wrk -t1 -c4 -d"$((warmup + duration))s" "$url/" >"$scratch/wrk.txt" &

rss_mib() { awk '/^VmRSS:/ { printf "%.1f\n", $2 / 1024 }' "/proc/$pid/status"; }
echo "warming up for ${warmup}s (RSS $(rss_mib) MiB)"
sleep "$warmup"
: >"$scratch/rss.txt"
start=$(date +%s)
while [ $(($(date +%s) - start)) -lt "$duration" ]; do
  echo "$(($(date +%s) - start)) $(rss_mib)" | tee -a "$scratch/rss.txt"
  sleep "$sample"
done
replaced=$(grep -c "isolate terminated" "$scratch/churn.stderr" || true)
# Two slopes (least squares, MiB per minute): over every sample, and over each minute's lowest
# sample. A heap bomb holds up to its memory limit until its isolate is replaced, so single
# samples jump by tens of MiB and back; memory left behind by replaced isolates raises the
# lowest sample of every minute as well.
awk -v replaced="$replaced" '
  function slope(n, x, y,    i, sx, sy, mx, my, sxy, sxx) {
    for (i = 1; i <= n; i++) { sx += x[i]; sy += y[i] }
    mx = sx / n; my = sy / n
    for (i = 1; i <= n; i++) { sxy += (x[i] - mx) * (y[i] - my); sxx += (x[i] - mx) ^ 2 }
    return sxx > 0 ? sxy / sxx : 0
  }
  {
    n++; x[n] = $1 / 60; y[n] = $2
    minute = int(x[n]); if (!(minute in low) || $2 < low[minute]) low[minute] = $2
  }
  END {
    for (minute in low) { m++; mx_[m] = minute + 0; my_[m] = low[minute] }
    printf "RSS after warm-up: %.1f MiB -> %.1f MiB over %.1f min; slope %.2f MiB/min over every sample, %.2f MiB/min over each minute'"'"'s lowest (%.1f -> %.1f MiB); %d isolates terminated and replaced\n",
      y[1], y[n], x[n], slope(n, x, y), slope(m, mx_, my_), low[0], low[int(x[n])], replaced
  }' "$scratch/rss.txt"
grep -E "Requests/sec|Non-2xx" "$scratch/wrk.txt" || true
