#!/usr/bin/env bash
# Page faults, CPU time and sled writes per delivery, read from the server's /proc/<pid>/stat: a measure of
# what the allocator's purging costs (each page given back to the OS is faulted in, zeroed,
# when it is next used), which the wall-clock rounds cannot resolve and callgrind's user-space
# count does not see (BENCHMARKS.md, session 22).
#
#   benches/faults.sh ['[VAR=VALUE ...] BINARY' ...]   # default: target/release/webhook-inbox
#
# Each argument is a binary, optionally preceded by environment assignments for it (quoted as
# one argument), e.g. 'MIMALLOC_PURGE_DELAY=100 target/release/webhook-inbox'. Each serves a
# fresh sled store (fsync, one `log` handler); `webhook-inbox replay --new-ids` sends WARMUP
# deliveries, then N more at CONCURRENCY, and the script prints, for those N: minor page
# faults, user and system CPU time, sled writes (`store_writes_total`, every tree) and group
# commits (`store_flush_seconds_count`), per delivery (claim to run, every thread of the
# server), and the seconds the N took to send (`CONCURRENCY=1`: a lone sender's pace). The minor-fault count repeats within a few per cent for a binary and its
# environment; the CPU times move with the machine, so compare them within one invocation.
#
# Environment: N (default 20000), WARMUP (default 2000), CONCURRENCY (default 32), FIXTURE
# (default the credicorp `application.created` fixture).
set -euo pipefail

cd "$(dirname "$0")/.."
N=${N:-20000}
WARMUP=${WARMUP:-2000}
CONCURRENCY=${CONCURRENCY:-32}
FIXTURE=${FIXTURE:-fixtures/credicorp/application.created.json}
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(target/release/webhook-inbox)
ticks=$(getconf CLK_TCK)

# shellcheck source=benches/common.sh
. benches/common.sh

# counters PID: minor faults, user ticks, system ticks (fields 10, 14 and 15 of stat; the
# command name, field 2, is in parentheses and has no spaces here).
counters() { awk '{ print $10, $14, $15 }' "/proc/$1/stat"; }

printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "run" "minor faults" "user µs" "system µs" "sled writes" "group commits" "send s"
for run in "${runs[@]}"; do
  read -r -a words <<< "$run"
  bin=${words[${#words[@]}-1]}
  assignments=("${words[@]:0:${#words[@]}-1}")
  dir=$(mktemp -d)
  port=$(free_port); admin=$(free_port)
  write_config "$dir" "$port" "$admin"
  env "${assignments[@]}" RUST_LOG=warn "$bin" serve --config "$dir/config.toml" > "$dir/server.log" 2>&1 &
  pid=$!
  wait_until ready "$admin"
  send() { "$bin" replay --config "$dir/config.toml" --concurrency "$CONCURRENCY" --new-ids --times "$1" "$FIXTURE" > /dev/null; }

  send "$WARMUP"
  wait_until runs_done "$WARMUP" "$admin"
  read -r faults0 user0 system0 < <(counters "$pid")
  writes0=$(metric webhook_inbox_store_writes_total "$admin")
  commits0=$(metric webhook_inbox_store_flush_seconds_count "$admin")
  started=$(date +%s.%N)
  send "$N"
  sent=$(date +%s.%N)
  wait_until runs_done "$((WARMUP + N))" "$admin"
  read -r faults1 user1 system1 < <(counters "$pid")
  writes1=$(metric webhook_inbox_store_writes_total "$admin")
  commits1=$(metric webhook_inbox_store_flush_seconds_count "$admin")
  kill "$pid"; wait "$pid" || true
  rm -rf "$dir"
  awk -v r="$run" -v n="$N" -v t="$ticks" -v f=$((faults1 - faults0)) -v u=$((user1 - user0)) -v s=$((system1 - system0)) -v w=$((writes1 - writes0)) \
    -v c=$((commits1 - commits0)) -v d0="$started" -v d1="$sent" \
    'BEGIN { printf "%s\t%.2f\t%.0f\t%.0f\t%.2f\t%.3f\t%.2f\n", r, f / n, u / t * 1e6 / n, s / t * 1e6 / n, w / n, c / n, d1 - d0 }'
done
