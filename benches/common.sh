# Shared by the shell measures (`instructions.sh`, `faults.sh`): sourced, not run. Each
# serves one fresh sled store with the same config and reads the same metric.

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

# write_config DIR PORT ADMIN: DIR/config.toml, a fresh fsync sled store in DIR/data, the
# credicorp source of the fixtures, one `log` handler bound.
write_config() {
  cat > "$1/config.toml" <<CONFIG
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
workers = 2

[storage]
path = "$1/data"
durability = "fsync"

[sources.credicorp]
scheme = "standard-webhooks"
secrets = ["whsec_ZGV2LW9ubHktc2VjcmV0LWZvci1jcmVkaWNvcnAtZGVtbw=="]

[[handlers]]
name = "log"
source = "credicorp"
kind = "log"
CONFIG
}

# runs_done COUNT ADMIN: whether the `log` handler has finished COUNT runs.
runs_done() { [ "$(metric 'webhook_inbox_handler_runs_total{handler="log"' "$2")" -ge "$1" ]; }

# ready ADMIN: whether the server answers `/readyz`.
ready() { curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; }
