#!/usr/bin/env bash
# Side-by-side comparison of Outpost with Deno, workerd and a bare hyper server (no JS: the
# ceiling), all on loopback with the same handler file:
#   hello   GET /hello    a short text body
#   echo    POST /echo    a 1 KiB JSON body parsed and sent back
#   stream  GET /stream   256 KiB streamed in 16 chunks
# Throughput: wrk, the same connections and duration for every server, servers interleaved
# within each round, ROUNDS rounds (median). Cold start: process start to first response
# (median of COLD_RUNS). Memory: RSS per isolate with N functions deployed (Outpost, workerd).
#
#   benches/compare/run.sh [--smoke] [--out DIR]    (default DIR: target/compare)
#
# Deno and workerd come from the npm registry into a scratch directory (PEERS_DIR to reuse an
# install). Not part of CI. Needs wrk and curl; builds Outpost and the helpers in release.
set -euo pipefail
cd "$(dirname "$0")/../.."
project=$(pwd)

smoke=false
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=true ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
if $smoke; then
  rounds=1 duration=2 cold_runs=1 functions=20
else
  rounds=${ROUNDS:-3} duration=${DURATION:-10} cold_runs=${COLD_RUNS:-5} functions=${FUNCTIONS:-1000}
fi
connections=${CONNECTIONS:-32}

for tool in wrk curl npm; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install wrk curl npm)" >&2; exit 1; }
done
if [ -z "${RUSTY_V8_ARCHIVE:-}" ] && [ -d ../shared/v8 ]; then
  RUSTY_V8_ARCHIVE=$(ls "$(cd ../shared/v8 && pwd)"/librusty_v8_*.a.gz | head -n 1)
  export RUSTY_V8_ARCHIVE
fi
cargo build --release --quiet -p outpost -p outpost-benches --example bare_hyper --example chart

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

# outpost.toml with $1 functions, the first one routed at every host.
outpost_config() {
  local n=$1 port=$2 file=$scratch/outpost-$1.toml
  {
    printf '[server]\nspare_isolates = 0\n\n[[listen]]\naddress = "127.0.0.1:%s"\n' "$port"
    printf '\n[[functions]]\nname = "f0"\nentry = "handler.js"\nroutes = ["/"]\n'
    printf 'pool = { prewarm = 2, max_isolates = 2 }\n'
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

# Starts server $1 in the background (pid in $pid, URL in $url).
start() {
  case "$1" in
    outpost)
      url=http://127.0.0.1:18081
      OUTPOST_LOG=warn target/release/outpost serve --config "$(outpost_config 1 18081)" \
        >"$scratch/outpost.log" 2>&1 &
      ;;
    deno)
      url=http://127.0.0.1:18082
      "$deno" serve --parallel --quiet --host 127.0.0.1 --port 18082 "$scratch/handler.js" \
        >"$scratch/deno.log" 2>&1 &
      ;;
    workerd)
      url=http://127.0.0.1:18083
      "$workerd" serve "$(workerd_config 1 18083)" >"$scratch/workerd.log" 2>&1 &
      ;;
    hyper)
      url=http://127.0.0.1:18084
      target/release/examples/bare_hyper 127.0.0.1:18084 >"$scratch/hyper.log" 2>&1 &
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
  echo "server at $url did not answer" >&2
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

# "req/s p50_ms p99_ms" of one wrk run against $url for scenario $1.
load() {
  local args=(-t1 -c"$connections" -d"${duration}s" --latency)
  case "$1" in
    hello) wrk "${args[@]}" "$url/hello" ;;
    echo) wrk "${args[@]}" -s "$scratch/echo.lua" "$url/echo" ;;
    stream) wrk "${args[@]}" "$url/stream" ;;
  esac | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx/ { bad = 1 }
    END { if (bad) { print "non-2xx responses" > "/dev/stderr"; exit 1 } print rps, p50, p99 }'
}

all=(outpost deno workerd hyper)
scenarios=(hello echo stream)

echo "== throughput: $rounds round(s) x ${duration}s, wrk -t1 -c$connections"
: >"$scratch/raw.tsv"
for round in $(seq "$rounds"); do
  for scenario in "${scenarios[@]}"; do
    for server in "${all[@]}"; do
      start "$server"
      await_ready "$(date +%s%N)" >/dev/null
      read -r rps p50 p99 < <(load "$scenario")
      printf '%s\t%s\t%s\t%s\t%s\n' "$server" "$scenario" "$rps" "$p50" "$p99" | tee -a "$scratch/raw.tsv"
      stop "$pid"
    done
  done
done

# Medians per server and scenario.
: >"$out/results.tsv"
for server in "${all[@]}"; do
  for scenario in "${scenarios[@]}"; do
    pick() { awk -F'\t' -v s="$server" -v c="$scenario" -v k="$1" '$1 == s && $2 == c { print $k }' "$scratch/raw.tsv" | median; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$server" "$scenario" "$(pick 3)" "$(pick 4)" "$(pick 5)" >>"$out/results.tsv"
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
    stop "$pid"
  done
  # Outpost's first function has two isolates (prewarm = 2), every other one has one.
  per=$(awk -v a="${sizes[0]}" -v b="${sizes[1]}" -v n="$functions" 'BEGIN { printf "%.2f", (b - a) / (n - 1) / 1024 }')
  memory+=("| $server | $((sizes[0] / 1024)) MiB | $((sizes[1] / 1024)) MiB | $per MiB |")
done

# The report.
{
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr)."
  echo "Versions: Outpost $(git rev-parse --short HEAD), $("$deno" --version | head -n 1), workerd $("$workerd" --version | awk '{ print $2 }'), $(wrk --version 2>&1 | head -n 1 | awk '{ print $1, $2 }')."
  echo "Load: wrk -t1 -c$connections -d${duration}s, $rounds round(s), servers interleaved; medians. Outpost: one function, 2 isolates; Deno: deno serve --parallel; workerd: one worker; hyper: multi-threaded tokio."
  echo
  echo "| scenario | server | req/s | p50 ms | p99 ms | req/s vs Outpost |"
  echo "|---|---|---:|---:|---:|---:|"
  for scenario in "${scenarios[@]}"; do
    base=$(awk -F'\t' -v c="$scenario" '$1 == "outpost" && $2 == c { print $3 }' "$out/results.tsv")
    awk -F'\t' -v c="$scenario" -v base="$base" '$2 == c {
      printf "| %s | %s | %.0f | %.2f | %.2f | %.2f |\n", c, $1, $3, $4, $5, (base > 0 ? $3 / base : 0) }' "$out/results.tsv"
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
} >"$out/table.md"
target/release/examples/chart "$out/results.tsv" "$out/chart.svg"
echo
cat "$out/table.md"
echo
echo "wrote $out/table.md, $out/results.tsv and $out/chart.svg"
