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

# shellcheck source=benches/common.sh
. benches/common.sh

# total OUT: the instruction count of a callgrind dump.
total() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }

for bin in "${binaries[@]}"; do
  dir=$(mktemp -d)
  port=$(free_port); admin=$(free_port)
  write_config "$dir" "$port" "$admin"
  RUST_LOG=warn WEBHOOK_INBOX_ADMIN_TOKEN=instructions \
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p" --dump-instr=no \
    "$bin" serve --config "$dir/config.toml" > "$dir/server.log" 2>&1 &
  pid=$!
  wait_until ready "$admin"
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
  wait_until runs_done "$N" "$admin"
  line "new deliveries (instructions per delivery, claim to run)"

  send --times 1                       # the delivery the redeliveries repeat
  wait_until runs_done "$((N + 1))" "$admin"
  cg -z
  send --times "$N"
  line "redeliveries (instructions per request)"

  kill "$pid"; wait "$pid" || true
  if [ "${KEEP:-}" = 1 ]; then echo "kept: $dir" >&2; else rm -rf "$dir"; fi
done
