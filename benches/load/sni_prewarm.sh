#!/usr/bin/env bash
# A never-seen function's first response over TLS, with SNI pre-warm (`server.sni_prewarm`,
# default 4) and without (0): FUNCTIONS functions with `pool.prewarm = 0` (none has an
# isolate until asked), each on a host of its own, each requested once on a fresh connection
# (curl, HTTP/1.1) 100 ms apart, so a spare is always waiting. Reported: the median and worst
# time from TCP connect to the first response byte, and the same for requests to a warm
# function on fresh connections made in between (its isolate is always ready). The TLS
# handshake is in both; the difference is what the never-seen function's start-up adds.
#
#   benches/load/sni_prewarm.sh [path/to/outpost]      (default: target/release/outpost)
#
# Needs curl and openssl. FUNCTIONS (default 40) sets the count.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/release/outpost}
functions=${FUNCTIONS:-40}
source benches/load/common.sh
load_setup

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:*.bench.test" \
  -keyout "$scratch/key.pem" -out "$scratch/cert.pem" 2>/dev/null
echo 'export default { fetch: (r) => new Response("hello from " + new URL(r.url).host) };' >"$scratch/handler.js"

config() { # $1 name, $2 sni_prewarm
  {
    printf '[server]\nsni_prewarm = %s\n\n' "$2"
    printf '[[listen]]\naddress = "127.0.0.1:0"\ntls = [{ cert = "cert.pem", key = "key.pem" }]\n'
    printf '\n[[functions]]\nname = "warm"\nentry = "handler.js"\nroutes = ["warm.bench.test/"]\n'
    for i in $(seq "$functions"); do
      printf '\n[[functions]]\nname = "f%s"\nentry = "handler.js"\nroutes = ["f%s.bench.test/"]\npool = { prewarm = 0 }\n' "$i" "$i"
    done
  } >"$scratch/$1.toml"
}

# Milliseconds from TCP connect to the first byte of https://$1.bench.test/ on a fresh connection.
first_byte_ms() {
  local port=${url##*:}
  curl -sk -o /dev/null --http1.1 --resolve "$1.bench.test:$port:127.0.0.1" \
    -w '%{time_connect} %{time_starttransfer}\n' "https://$1.bench.test:$port/" |
    awk '{ printf "%.3f\n", ($2 - $1) * 1000 }'
}

printf '| sni_prewarm | never-seen function: p50 / max | warm function: p50 / max | difference of p50s |\n|---|---:|---:|---:|\n'
for prewarm in 4 0; do
  config "prewarm-$prewarm" "$prewarm"
  start_outpost "prewarm-$prewarm"
  : >"$scratch/new" && : >"$scratch/warm"
  for _ in 1 2 3; do first_byte_ms warm >/dev/null; done
  for i in $(seq "$functions"); do
    first_byte_ms "f$i" >>"$scratch/new"
    first_byte_ms warm >>"$scratch/warm"
    sleep 0.1
  done
  kill "${servers[-1]}"
  new_p50=$(median <"$scratch/new") warm_p50=$(median <"$scratch/warm")
  printf '| %s | %s / %s ms | %s / %s ms | %.3f ms |\n' "$prewarm" \
    "$new_p50" "$(sort -g "$scratch/new" | tail -n 1)" \
    "$warm_p50" "$(sort -g "$scratch/warm" | tail -n 1)" \
    "$(awk -v a="$new_p50" -v b="$warm_p50" 'BEGIN { print a - b }')"
done
