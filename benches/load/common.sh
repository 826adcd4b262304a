# Shared by the load scripts (sourced, not run): a scratch directory, and starting Outpost
# on a config written there.

# $binary must be set. Checks the tools, makes $scratch; on exit every server started and
# every job is stopped and $scratch removed.
load_setup() {
  command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
  [ -x "$binary" ] || { echo "$binary is missing: cargo build --release -p outpost" >&2; exit 1; }
  scratch=$(mktemp -d)
  servers=()
  trap 'kill "${servers[@]}" $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT
}

# Starts `outpost serve --config $scratch/$1.toml` (logging at $2, default warn) in the
# background and sets $url to its first listener's URL once it listens. Not to be called in
# a subshell: the server must stay known to the exit trap.
start_outpost() {
  OUTPOST_LOG=${2:-warn} "$binary" serve --config "$scratch/$1.toml" >"$scratch/$1.stdout" 2>"$scratch/$1.stderr" &
  servers+=("$!")
  for _ in $(seq 100); do
    url=$(sed -n 's/^outpost listening on //p' "$scratch/$1.stdout")
    [ -n "$url" ] && return
    sleep 0.1
  done
  cat "$scratch/$1.stderr" >&2
  exit 1
}

# The median of the numbers on standard input.
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
