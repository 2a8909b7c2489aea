# Shared by the bench scripts (sourced): free ports, a private redis-server, and cleanup of
# every process a script started.

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start_redis MAXMEMORY LOGFILE: a throwaway redis-server (no persistence, volatile-lfu) on a
# free port; sets $redis to its URL once it answers.
start_redis() {
  local port
  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
      --maxmemory "$1" --maxmemory-policy volatile-lfu --logfile "$2" &
  pids+=($!)
  redis=redis://127.0.0.1:$port
  for _ in $(seq 100); do redis-cli -u "$redis" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server did not start; see $2" >&2
  return 1
}
