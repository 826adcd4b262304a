#!/usr/bin/env bash
# Side-by-side comparison of Outpost with Deno, workerd and a bare hyper server (no JS: the
# ceiling), all on loopback with the same handler file:
#   hello   GET /hello    a short text body
#   echo    POST /echo    a 1 KiB JSON body parsed and sent back
#   stream  GET /stream   256 KiB streamed in 16 chunks
#   hello on `outpost-spread`: the same handler deployed as 100 functions, requests spread over
#   their hosts (80% to 10 of them, 20% to the other 90), against Outpost with one function
# Throughput: wrk, the same connections and duration for every server, servers interleaved
# within each round, ROUNDS rounds (median), in two modes:
#   pinned    each server alone on core 0 (taskset -c 0; Outpost with server.shards = 1, deno
#             serve without --parallel, one workerd process), wrk alone on core 1
#   unpinned  Outpost with the default shards (one per core), deno serve --parallel
# Each run reports req/s, p50/p99 and the server's CPU time per request (utime + stime of all
# its threads from /proc/PID/stat over the measured run, after a warm-up).
# Cold start: process start to first response (median of COLD_RUNS). Memory: RSS per isolate
# with FUNCTIONS functions deployed (Outpost, workerd), Outpost's thread count, and the floor:
# bare deno_core runtimes from a minimal snapshot on one thread (FUNCTIONS / 2 of them).
#
#   benches/compare/run.sh [--smoke] [--mode pinned|unpinned|both] [--out DIR]
#                                                   (default: both, DIR target/compare)
#
# Deno and workerd come from the npm registry into a scratch directory (PEERS_DIR to reuse an
# install). Not part of CI. Needs wrk and curl; builds Outpost and the helpers in release.
set -euo pipefail
cd "$(dirname "$0")/../.."
project=$(pwd)

smoke=false
out=""
modes=(pinned unpinned)
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=true ;;
    --out) out=$2; shift ;;
    --mode)
      case "${2:-}" in
        pinned | unpinned) modes=("$2") ;;
        both) modes=(pinned unpinned) ;;
        *) echo "--mode takes pinned, unpinned or both, not '${2:-}'" >&2; exit 2 ;;
      esac
      shift
      ;;
    *) echo "usage: $0 [--smoke] [--mode pinned|unpinned|both] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
if $smoke; then
  rounds=1 duration=2 cold_runs=1 functions=20
else
  rounds=${ROUNDS:-3} duration=${DURATION:-10} cold_runs=${COLD_RUNS:-5} functions=${FUNCTIONS:-1000}
fi
connections=${CONNECTIONS:-32}

for tool in wrk curl npm taskset; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install wrk curl npm util-linux)" >&2; exit 1; }
done
if [[ " ${modes[*]} " == *" pinned "* ]] && [ "$(nproc)" -lt 2 ]; then
  echo "the pinned mode needs two cores (server on core 0, wrk on core 1); use --mode unpinned" >&2
  exit 1
fi
clock_ticks=$(getconf CLK_TCK)
if [ -z "${RUSTY_V8_ARCHIVE:-}" ] && [ -d ../shared/v8 ]; then
  RUSTY_V8_ARCHIVE=$(ls "$(cd ../shared/v8 && pwd)"/librusty_v8_*.a.gz | head -n 1)
  export RUSTY_V8_ARCHIVE
fi
# Two builds: with --example, cargo builds only the examples of the packages named.
cargo build --release --quiet -p outpost
cargo build --release --quiet -p outpost-benches --example bare_hyper --example bare_isolates --example chart

scratch=$(mktemp -d)
servers=()
trap 'kill "${servers[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
out=${out:-$project/target/compare}
mkdir -p "$out"

peers=${PEERS_DIR:-$scratch/peers}
if [ ! -x "$peers/node_modules/.bin/deno" ] || [ ! -x "$peers/node_modules/.bin/workerd" ]; then
  echo "installing deno and workerd from npm into $peers"
  mkdir -p "$peers"
  npm install --prefix "$peers" --no-audit --no-fund --loglevel=error deno workerd >/dev/null
fi
deno=$peers/node_modules/.bin/deno
workerd=$peers/node_modules/.bin/workerd
export DENO_NO_UPDATE_CHECK=1

cat >"$scratch/handler.js" <<'EOF'
const chunk = new Uint8Array(16 * 1024).fill(120);
export default {
  async fetch(request) {
    const { pathname } = new URL(request.url);
    if (pathname === "/hello") return new Response("Hello, world!");
    if (pathname === "/echo") return Response.json(await request.json());
    if (pathname === "/stream") {
      let sent = 0;
      return new Response(new ReadableStream({
        pull(controller) {
          if (sent++ < 16) controller.enqueue(chunk.slice());
          else controller.close();
        },
      }));
    }
    return new Response("not found", { status: 404 });
  },
};
EOF
# A 1 KiB JSON document for /echo.
body='{"items":['
for i in $(seq 0 27); do body+="{\"id\":$i,\"name\":\"item-$i\",\"ok\":true},"; done
body+='{"id":-1}],"pad":"'
while [ ${#body} -lt 1021 ]; do body+="x"; done
body+='"}'
cat >"$scratch/echo.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
EOF
# 100 functions f0..f99 at hosts f0.test..f99.test: 80% of requests to f0..f9, 20% to the rest.
cat >"$scratch/spread.lua" <<'EOF'
math.randomseed(42)
request = function()
  local f
  if math.random(100) <= 80 then f = math.random(0, 9) else f = math.random(10, 99) end
  return wrk.format(nil, "/hello", { Host = "f" .. f .. ".test" })
end
EOF

# outpost.toml with $1 functions, the first one routed at every host, f1... at host f1.test
# and so on; $3 extra [server] lines.
outpost_config() {
  local n=$1 port=$2 file=$scratch/outpost-$1.toml
  {
    printf '[server]\nspare_isolates = 0\n%s\n\n[[listen]]\naddress = "127.0.0.1:%s"\n' "${3:-}" "$port"
    printf '\n[[functions]]\nname = "f0"\nentry = "handler.js"\nroutes = ["/", "f0.test/"]\n'
    for i in $(seq 1 $((n - 1))); do
      printf '\n[[functions]]\nname = "f%s"\nentry = "handler.js"\nroutes = ["f%s.test/"]\n' "$i" "$i"
    done
  } >"$file"
  echo "$file"
}

# workerd config with $1 workers, the first one on the socket.
workerd_config() {
  local n=$1 port=$2 file=$scratch/workerd-$1.capnp
  {
    echo 'using Workerd = import "/workerd/workerd.capnp";'
    echo 'const config :Workerd.Config = ('
    printf '  services = ['
    for i in $(seq 0 $((n - 1))); do
      printf '(name = "w%s", worker = (modules = [(name = "worker", esModule = embed "handler.js")], compatibilityDate = "2024-09-23")),' "$i"
    done
    echo '],'
    printf '  sockets = [(name = "http", address = "127.0.0.1:%s", http = (), service = "w0")]\n' "$port"
    echo ');'
  } >"$file"
  echo "$file"
}

# Starts server $1 in mode $2 (pinned or unpinned; default unpinned) in the background (pid
# in $pid, URL in $url).
start() {
  local pin=() shards="" parallel=(--parallel)
  if [ "${2:-unpinned}" = pinned ]; then
    pin=(taskset -c 0)
    shards="shards = 1"
    parallel=()
  fi
  case "$1" in
    outpost | outpost-spread)
      local n=1
      [ "$1" = outpost-spread ] && n=100
      url=http://127.0.0.1:18081
      OUTPOST_LOG=warn "${pin[@]}" target/release/outpost serve --config "$(outpost_config "$n" 18081 "$shards")" \
        >"$scratch/outpost.log" 2>&1 &
      ;;
    deno)
      url=http://127.0.0.1:18082
      "${pin[@]}" "$deno" serve "${parallel[@]}" --quiet --host 127.0.0.1 --port 18082 "$scratch/handler.js" \
        >"$scratch/deno.log" 2>&1 &
      ;;
    workerd)
      url=http://127.0.0.1:18083
      "${pin[@]}" "$workerd" serve "$(workerd_config 1 18083)" >"$scratch/workerd.log" 2>&1 &
      ;;
    hyper)
      url=http://127.0.0.1:18084
      "${pin[@]}" target/release/examples/bare_hyper 127.0.0.1:18084 >"$scratch/hyper.log" 2>&1 &
      ;;
  esac
  pid=$!
  servers+=("$pid")
}

# Waits until $url/hello answers; prints the milliseconds since $1 (ns since the epoch).
await_ready() {
  for _ in $(seq 3000); do
    if curl -fs -o /dev/null "$url/hello"; then
      echo $(( ($(date +%s%N) - $1) / 1000000 ))
      return
    fi
    sleep 0.005
  done
  echo "server at $url did not answer; its output:" >&2
  cat "$scratch"/*.log >&2
  exit 1
}

# Stops a server; one that has not exited 3 s after SIGTERM (deno serve --parallel, stopped
# while its workers start, has been seen to hang) gets SIGKILL.
stop() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# utime + stime of process $1 (all its threads), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# One wrk run against $url for scenario $1 (server $2) for $3 seconds, in mode $4; prints
# "req/s p50_ms p99_ms cpu_us_per_request" (CPU of process $pid over the run).
load() {
  local wrk=(wrk -t1 -c"$connections" -d"${3}s" --latency) before after
  [ "$4" = pinned ] && wrk=(taskset -c 1 "${wrk[@]}")
  before=$(cpu_ticks "$pid")
  case "$1" in
    hello)
      if [ "$2" = outpost-spread ]; then
        "${wrk[@]}" -s "$scratch/spread.lua" "$url/hello"
      else
        "${wrk[@]}" "$url/hello"
      fi
      ;;
    echo) "${wrk[@]}" -s "$scratch/echo.lua" "$url/echo" ;;
    stream) "${wrk[@]}" "$url/stream" ;;
  esac >"$scratch/wrk.out"
  after=$(cpu_ticks "$pid")
  awk -v ticks=$((after - before)) -v hz="$clock_ticks" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    / requests in / { requests = $1 }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx/ { bad = 1 }
    END {
      if (bad) { print "non-2xx responses" > "/dev/stderr"; exit 1 }
      print rps, p50, p99, (requests > 0 ? ticks * 1e6 / hz / requests : 0) }' "$scratch/wrk.out"
}

all=(outpost deno workerd hyper)
scenarios=(hello echo stream)
# The servers of scenario $1: the 100-function spread runs the hello handler only.
servers_of() {
  if [ "$1" = hello ]; then echo "${all[@]}" outpost-spread; else echo "${all[@]}"; fi
}

echo "== throughput: ${modes[*]}; $rounds round(s) x ${duration}s after 2 s of warm-up, wrk -t1 -c$connections"
: >"$scratch/raw.tsv"
for round in $(seq "$rounds"); do
  for mode in "${modes[@]}"; do
    for scenario in "${scenarios[@]}"; do
      for server in $(servers_of "$scenario"); do
        start "$server" "$mode"
        await_ready "$(date +%s%N)" >/dev/null
        load "$scenario" "$server" 2 "$mode" >/dev/null
        read -r rps p50 p99 cpu < <(load "$scenario" "$server" "$duration" "$mode")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$server" "$scenario" "$rps" "$p50" "$p99" "$cpu" |
          tee -a "$scratch/raw.tsv"
        stop "$pid"
      done
    done
  done
done

# Medians per mode, server and scenario: results-MODE.tsv has server, scenario, req/s, p50,
# p99, CPU µs per request.
for mode in "${modes[@]}"; do
  : >"$out/results-$mode.tsv"
  for server in "${all[@]}" outpost-spread; do
    for scenario in "${scenarios[@]}"; do
      [[ " $(servers_of "$scenario") " == *" $server "* ]] || continue
      pick() { awk -F'\t' -v m="$mode" -v s="$server" -v c="$scenario" -v k="$1" '$1 == m && $2 == s && $3 == c { print $k }' "$scratch/raw.tsv" | median; }
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$scenario" "$(pick 4)" "$(pick 5)" "$(pick 6)" "$(pick 7)" >>"$out/results-$mode.tsv"
    done
  done
done

echo "== cold start: process start to first response, median of $cold_runs"
: >"$scratch/cold.tsv"
for run in $(seq "$cold_runs"); do
  for server in "${all[@]}"; do
    began=$(date +%s%N)
    start "$server"
    printf '%s\t%s\n' "$server" "$(await_ready "$began")" >>"$scratch/cold.tsv"
    stop "$pid"
  done
done

rss_kib() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
# RSS of $1 (pid) once it has stopped growing.
settled_rss() {
  local last=0 now
  for _ in $(seq 240); do
    sleep 0.5
    now=$(rss_kib "$1")
    [ "$now" = "$last" ] && { echo "$now"; return; }
    last=$now
  done
  echo "$now"
}
echo "== memory: RSS per isolate, $functions functions deployed vs 1"
memory=()
threads=""
for server in outpost workerd; do
  sizes=()
  for n in 1 "$functions"; do
    began=$(date +%s%N)
    if [ "$server" = outpost ]; then
      OUTPOST_LOG=warn target/release/outpost serve --config "$(outpost_config "$n" 18081)" >"$scratch/mem.log" 2>&1 &
      url=http://127.0.0.1:18081
    else
      "$workerd" serve "$(workerd_config "$n" 18083)" >"$scratch/mem.log" 2>&1 &
      url=http://127.0.0.1:18083
    fi
    pid=$!
    servers+=("$pid")
    await_ready "$began" >/dev/null
    sizes+=("$(settled_rss "$pid")")
    if [ "$server" = outpost ] && [ "$n" = "$functions" ]; then
      threads=$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status")
    fi
    stop "$pid"
  done
  # Every function has one isolate (Outpost: pool.prewarm = 1, spare_isolates = 0).
  per=$(awk -v a="${sizes[0]}" -v b="${sizes[1]}" -v n="$functions" 'BEGIN { printf "%.2f", (b - a) / (n - 1) / 1024 }')
  memory+=("| $server | $((sizes[0] / 1024)) MiB | $((sizes[1] / 1024)) MiB | $per MiB |")
done
floor_runtimes=$((functions / 2))
floor=$(target/release/examples/bare_isolates "$floor_runtimes" | sed -n 's/.*per_runtime_mib=//p')

# The report.
{
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr)."
  echo "Versions: Outpost $(git rev-parse --short HEAD), $("$deno" --version | head -n 1), workerd $("$workerd" --version | awk '{ print $2 }'), $(wrk --version 2>&1 | head -n 1 | awk '{ print $1, $2 }')."
  echo "Load: wrk -t1 -c$connections -d${duration}s after 2 s of warm-up, $rounds round(s), servers interleaved; medians. CPU: the server's utime + stime over the run per request."
  for mode in "${modes[@]}"; do
    echo
    if [ "$mode" = pinned ]; then
      echo "Pinned: each server alone on core 0, wrk on core 1. Outpost: server.shards = 1; Deno: deno serve; workerd: one process; hyper: tokio, pinned to the same core."
    else
      echo "Unpinned: Outpost with one shard per core; Deno: deno serve --parallel; workerd: one process; hyper: multi-threaded tokio."
    fi
    echo
    echo "| $mode | server | req/s | p50 ms | p99 ms | CPU µs/request | req/s vs Outpost | CPU vs Outpost |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for scenario in "${scenarios[@]}"; do
      read -r base_rps base_cpu < <(awk -F'\t' -v c="$scenario" '$1 == "outpost" && $2 == c { print $3, $6 }' "$out/results-$mode.tsv")
      awk -F'\t' -v c="$scenario" -v rps="$base_rps" -v cpu="$base_cpu" '$2 == c {
        name = ($1 == "outpost-spread" ? "outpost, 100 functions, spread" : $1)
        printf "| %s | %s | %.0f | %.2f | %.2f | %.1f | %.2f | %.2f |\n", c, name, $3, $4, $5, $6,
          (rps > 0 ? $3 / rps : 0), (cpu > 0 ? $6 / cpu : 0) }' "$out/results-$mode.tsv"
    done
  done
  echo
  echo "| server | cold start p50 (process start to first response) |"
  echo "|---|---:|"
  for server in "${all[@]}"; do
    echo "| $server | $(awk -F'\t' -v s="$server" '$1 == s { print $2 }' "$scratch/cold.tsv" | median) ms |"
  done
  echo
  echo "| server | RSS, 1 function | RSS, $functions functions | per additional isolate |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${memory[@]}"
  echo "| floor: bare deno_core runtimes, minimal snapshot, one thread ($floor_runtimes) | | | $floor MiB |"
  echo
  echo "Outpost threads with $functions functions: $threads ($(nproc) shards)."
} >"$out/table.md"
for mode in "${modes[@]}"; do
  target/release/examples/chart "$out/results-$mode.tsv" "$out/chart-$mode.svg"
done
echo
cat "$out/table.md"
echo
echo "wrote $out/table.md, $out/results-*.tsv and $out/chart-*.svg"
