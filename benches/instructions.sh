#!/usr/bin/env bash
# Instructions per delivery, counted by valgrind's callgrind: a measure that repeats for the
# same binary and inputs whatever else the machine is doing, for changes too small to show
# above the wall-clock noise of the end-to-end bench (BENCHMARKS.md, session 21).
#
#   benches/instructions.sh [BINARY...]      # default: target/release/webhook-inbox
#
# Each binary serves a fresh sled store (fsync, one `log` handler) under callgrind. After
# start-up the counters are zeroed; then `webhook-inbox replay` sends N new deliveries one at
# a time (`--new-ids`, so every request is its own group commit: no batching to vary), the
# script waits until every run has finished, and dumps the counts; then the same for N
# redeliveries of one stored delivery (the replay path). Printed: instructions per request
# of the whole server (every thread: HTTP, the claim, the sync, the run), per case.
#
# Environment: N (default 2000), CONCURRENCY (default 1: requests one at a time; more
# batches group commits and dispatcher passes, and the counts then vary by a few per cent
# with how they batch under valgrind), FIXTURE (default the credicorp `application.created`
# fixture, a 400-byte body, so it goes to the body log), KEEP=1 keeps the callgrind files
# (for `callgrind_annotate --inclusive=yes`).
set -euo pipefail

cd "$(dirname "$0")/.."
N=${N:-2000}
CONCURRENCY=${CONCURRENCY:-1}
FIXTURE=${FIXTURE:-fixtures/credicorp/application.created.json}
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=(target/release/webhook-inbox)
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# metric NAME PORT: the sum of a metric's samples on the admin listener.
metric() {
  curl -s "http://127.0.0.1:$2/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'
}

# wait_until CMD...: polls (every 100 ms, at most 600 s) until the command succeeds.
wait_until() {
  for _ in $(seq 6000); do "$@" && return 0; sleep 0.1; done
  echo "timed out: $*" >&2; return 1
}

runs_done() { [ "$(metric 'webhook_inbox_handler_runs_total{handler="log"' "$admin")" -ge "$1" ]; }
ready() { curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; }

# total OUT: the instruction count of a callgrind dump.
total() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }

for bin in "${binaries[@]}"; do
  dir=$(mktemp -d)
  port=$(free_port); admin=$(free_port)
  cat > "$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
workers = 2

[storage]
path = "$dir/data"
durability = "fsync"

[sources.credicorp]
scheme = "standard-webhooks"
secrets = ["whsec_ZGV2LW9ubHktc2VjcmV0LWZvci1jcmVkaWNvcnAtZGVtbw=="]

[[handlers]]
name = "log"
source = "credicorp"
kind = "log"
EOF
  RUST_LOG=warn WEBHOOK_INBOX_ADMIN_TOKEN=instructions \
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p" --dump-instr=no \
    "$bin" serve --config "$dir/config.toml" > "$dir/server.log" 2>&1 &
  pid=$!
  wait_until ready
  cg() { callgrind_control "$@" "$pid" > /dev/null 2>&1; }
  line() {
    local before after
    before=$(ls "$dir"/cg.* | wc -l)
    cg -d
    wait_until test "$(ls "$dir"/cg.* | wc -l)" -gt "$before"
    after=$(ls -t "$dir"/cg.* | head -1)
    printf '%s\t%s\t%s\n' "$bin" "$1" "$(( $(total "$after") / N ))"
  }
  send() { "$bin" replay --config "$dir/config.toml" --concurrency "$CONCURRENCY" "$@" "$FIXTURE" > /dev/null; }

  cg -z
  send --times "$N" --new-ids
  wait_until runs_done "$N"
  line "new deliveries (instructions per delivery, claim to run)"

  send --times 1                       # the delivery the redeliveries repeat
  wait_until runs_done "$((N + 1))"
  cg -z
  send --times "$N"
  line "redeliveries (instructions per request)"

  kill "$pid"; wait "$pid" || true
  if [ "${KEEP:-}" = 1 ]; then echo "kept: $dir" >&2; else rm -rf "$dir"; fi
done
