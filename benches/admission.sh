#!/usr/bin/env bash
# Request bodies bounded before admission: the RSS of a `kvshelf serve` process while N slow
# clients each upload a big framed put (POST /v1/put with its Content-Length, paced to a
# fixed rate, so that every body is in flight at once). The sidecar runs with L1 off and
# synchronous puts, so request bodies are the only memory that grows; its RSS must stay
# within idle + body_memory_bytes + 1 MiB per connection (docs/api.md §9). Samples VmRSS
# every 50 ms and prints the peak next to that bound, and what the clients got back.
#
#   benches/admission.sh
#
# Environment: KVSHELF_BIN (default target/release/kvshelf, built if missing),
# KVSHELF_BENCH_CLIENTS (default 16), KVSHELF_BENCH_BLOCKS (2 MiB blocks per request,
# default 16, so 32 MiB bodies), KVSHELF_BENCH_RATE (bytes/s per client, default 8 MiB/s),
# KVSHELF_BENCH_BUDGET (body_memory_bytes, default 128 MiB), KVSHELF_BENCH_WAIT (put_timeout:
# how long a request waits for room in the budget, default 30s), OUT (default target/bench).
# A build without `body_memory_bytes` (before it existed) runs without the key and says so.
# Starts its own redis-server on a free port and removes it on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin=${KVSHELF_BIN:-target/release/kvshelf}
clients=${KVSHELF_BENCH_CLIENTS:-16}
blocks=${KVSHELF_BENCH_BLOCKS:-16}
rate=${KVSHELF_BENCH_RATE:-8388608}
budget=${KVSHELF_BENCH_BUDGET:-134217728}
wait=${KVSHELF_BENCH_WAIT:-30s}
out=${OUT:-target/bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[[ -x $bin ]] || cargo build --release --bin kvshelf

# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
start_redis 4gb "$out/admission-redis.log"

config=$out/admission.toml
write_config() {
    cat >"$config" <<EOF
[store]
response_timeout = "60s"

[server]
l1_bytes = 0                 # request bodies are the only memory this load makes grow
put_timeout = "$wait"
max_body_bytes = 268435456
max_concurrent_requests = 256
$1

[[namespaces]]
label = "admission-2mib"
model_id = "kvshelf/bench-2mib"
kv_dtype = "bfloat16"
block_size = 16
layout = { num_layers = 32, num_kv_heads = 8, head_dim = 128, order = "lkthd" }
ttl = "2m"
EOF
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

start_sidecar() {
    sport=$(free_port)
    "$bin" serve --config "$config" --redis "$redis" --listen "127.0.0.1:$sport" \
        >"$out/admission-sidecar.log" 2>&1 &
    sidecar=$!
    until curl -sf "http://127.0.0.1:$sport/readyz" >/dev/null; do
        kill -0 "$sidecar" 2>/dev/null || return 1
        sleep 0.1
    done
}

write_config "body_memory_bytes = $budget"
bound_note="idle + body_memory_bytes ($((budget >> 20)) MiB) + $clients MiB (1 MiB per connection)"
if ! start_sidecar; then
    grep -q 'body_memory_bytes' "$out/admission-sidecar.log" || { cat "$out/admission-sidecar.log"; exit 1; }
    write_config ""
    budget=""
    bound_note="none: this build has no body_memory_bytes"
    start_sidecar
fi
pids+=("$sidecar")
idle=$(rss_kib "$sidecar")
peak=$idle

python3 - "$sport" "$clients" "$blocks" "$rate" >"$out/admission-clients.txt" <<'EOF' &
import collections, os, socket, struct, sys, threading, time

port, clients, blocks, rate = (int(a) for a in sys.argv[1:5])
block_bytes = 2 << 20
payload = os.urandom(block_bytes)  # shared by every block: client memory is not measured
body_len = 8 + blocks * (45 + block_bytes) + 6
results = []

def pieces():
    yield b"KVFRAME1"
    for i in range(blocks):
        yield struct.pack("<BI", 1, i) + os.urandom(32) + struct.pack("<Q", block_bytes)
        yield payload
    yield struct.pack("<BIB", 2, blocks, 1)

def client():
    start = time.monotonic()
    sent, status = 0, "no answer"
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(300)
    try:
        s.sendall((f"POST /v1/put?namespace=admission-2mib HTTP/1.1\r\nHost: kvshelf\r\n"
                   f"Content-Length: {body_len}\r\nConnection: close\r\n\r\n").encode())
        for piece in pieces():
            view = memoryview(piece)
            for off in range(0, len(view), 65536):
                chunk = view[off:off + 65536]
                s.sendall(chunk)
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:
        pass  # refused while sending: the answer (429) may still be readable
    try:
        line = s.recv(4096).split(b"\r\n", 1)[0].decode()
        status = line.split(" ")[1] if line else "closed"
    except OSError as e:
        status = type(e).__name__
    results.append((status, sent, time.monotonic() - start))

threads = [threading.Thread(target=client) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
counts = collections.Counter(r[0] for r in results)
print(" ".join(f"{n} x {s}" for s, n in sorted(counts.items())),
      f"(body {body_len >> 20} MiB each; longest {max(r[2] for r in results):.1f} s)")
EOF
load=$!
while kill -0 "$load" 2>/dev/null; do
    now=$(rss_kib "$sidecar")
    ((now > peak)) && peak=$now
    sleep 0.05
done
wait "$load"
if [[ -n $budget ]]; then
    bound=$((idle / 1024 + (budget >> 20) + clients))
    verdict=$( ((peak / 1024 <= bound)) && echo "within" || echo "OVER")
    bound_text="bound $bound MiB = $bound_note: $verdict"
else
    bound_text="bound $bound_note"
fi
printf '%s clients x %s x 2 MiB at %s MiB/s each: sidecar RSS idle %d MiB, peak %d MiB; %s\nclients got: %s\n' \
    "$clients" "$blocks" $((rate >> 20)) $((idle / 1024)) $((peak / 1024)) "$bound_text" \
    "$(cat "$out/admission-clients.txt")"
