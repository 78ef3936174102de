#!/usr/bin/env bash
# Start-up time on a large store, after a clean stop and after a kill -9 mid-flood, for one
# or more builds, each on its own copy of the same store.
#
#   benches/restart.sh STORE [BINARY...]
#
# STORE: a sled data directory, e.g. the e2e bench's 1 M pre-fill
#   (`cargo bench --bench e2e -- --only none-of-the-cases --prefill 1000000 --prefill-dir D`
#   leaves it in D/prefilled-1000000/data). BINARY defaults to target/release/webhook-inbox.
# ROUNDS (default 3) kills per build; FLOOD (default 4000) deliveries sent before each kill.
#
# Prints, per build and round, the milliseconds from spawning the server to its first
# `/readyz` answer: once after a kill -9 that landed while deliveries were arriving (the
# process died holding `received` items in memory), once after a clean stop.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:?usage: benches/restart.sh STORE [BINARY...]}
shift
builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=(target/release/webhook-inbox)
ROUNDS=${ROUNDS:-3}
FLOOD=${FLOOD:-4000}
FIXTURE=fixtures/credicorp/application.created.json

# shellcheck source=benches/common.sh
. benches/common.sh

now_ms() { date +%s%3N; }

# start BIN DIR ADMIN: starts the server in the background (pid in $pid), waits for
# `/readyz` polling every 5 ms, and sets $took to the milliseconds that took.
start() {
  local t0; t0=$(now_ms)
  RUST_LOG=warn "$1" serve --config "$2/config.toml" >> "$2/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 24000); do ready "$3" && break; sleep 0.005; done
  took=$(( $(now_ms) - t0 ))
}

printf '%s\t%s\t%s\t%s\n' build round "after kill -9 (ms)" "after a clean stop (ms)"
for bin in "${builds[@]}"; do
  dir=$(mktemp -d)
  cp -r "$store" "$dir/data"
  port=$(free_port); admin=$(free_port)
  write_config "$dir" "$port" "$admin"
  # The pre-fill's deliveries are bound to `noop` of source `bench` (the e2e bench's).
  cat >> "$dir/config.toml" <<CONFIG

[sources.bench]
secrets = ["whsec_YmVuY2htYXJrLXNlY3JldC1ub3QtZm9yLXByb2R1Y3Rpb24="]

[[handlers]]
name = "noop"
source = "bench"
kind = "log"
CONFIG
  start "$bin" "$dir" "$admin"
  for round in $(seq "$ROUNDS"); do
    "$bin" replay --config "$dir/config.toml" --concurrency 64 --new-ids --times "$FLOOD" \
      "$FIXTURE" > /dev/null 2>&1 &
    flood=$!
    # Kill once a few hundred deliveries are in, while the rest are arriving.
    wait_until runs_done 200 "$admin"
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    kill "$flood" 2>/dev/null || true; wait "$flood" 2>/dev/null || true
    start "$bin" "$dir" "$admin"; after_kill=$took
    kill "$pid"; wait "$pid" || true
    start "$bin" "$dir" "$admin"; after_stop=$took
    printf '%s\t%s\t%s\t%s\n' "$bin" "$round" "$after_kill" "$after_stop"
  done
  kill "$pid"; wait "$pid" || true
  rm -rf "$dir"
done
