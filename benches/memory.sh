#!/usr/bin/env bash
# Sidecar memory under load: the RSS of a `kvshelf serve` process (its own process, so
# the clients' memory is not counted) while 64 concurrent clients fetch 32 MiB batches
# over HTTP, with the default budgets (1 GiB of L1, 1 GiB of fetches in flight) — once as
# one 32 MiB block per request, once as 16 blocks of 2 MiB. Samples VmRSS every 50 ms and
# prints the peak next to the budgets.
#
#   benches/memory.sh
#
# Environment: KVSHELF_BENCH_CONFIG (sidecar config, default examples/bench.toml), KVSHELF_BIN (default target/release/kvshelf, built if missing),
# KVSHELF_BENCH_CLIENTS (default 64), KVSHELF_BENCH_REQUESTS (default 256), OUT (default
# target/bench). Starts its own redis-server on a free port and removes it on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin=${KVSHELF_BIN:-target/release/kvshelf}
config=${KVSHELF_BENCH_CONFIG:-examples/bench.toml}
setting() { awk -v k="$1" '$1 == k && $2 == "=" { print $3 }' "$config"; }
l1_budget=$(setting l1_bytes) l1_budget=${l1_budget:-1073741824}
fetch_budget=$(setting fetch_memory_bytes) fetch_budget=${fetch_budget:-1073741824}
clients=${KVSHELF_BENCH_CLIENTS:-64}
requests=${KVSHELF_BENCH_REQUESTS:-256}
out=${OUT:-target/bench}
mkdir -p "$out"
[[ -x $bin ]] || cargo build --release --bin kvshelf

# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
start_redis 6gb "$(pwd)/$out/memory-redis.log"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for shape in "32MiB 1" "2MiB 16"; do
    read -r size batch <<<"$shape"
    sport=$(free_port)
    "$bin" serve --config "$config" --redis "$redis" --listen "127.0.0.1:$sport" \
        >"$out/memory-sidecar.log" 2>&1 &
    sidecar=$!
    pids+=("$sidecar")
    until curl -sf "http://127.0.0.1:$sport/readyz" >/dev/null; do sleep 0.1; done
    idle=$(rss_kib "$sidecar")
    peak=$idle
    "$bin" --redis "$redis" bench --sidecar "http://127.0.0.1:$sport" --paths http \
        --size "$size" --batch "$batch" --concurrency "$clients" --requests "$requests" \
        --rounds 1 >"$out/memory-bench.txt" 2>/dev/null &
    load=$!
    while kill -0 "$load" 2>/dev/null; do
        now=$(rss_kib "$sidecar")
        ((now > peak)) && peak=$now
        sleep 0.05
    done
    wait "$load"
    l1=$(curl -sf "http://127.0.0.1:$sport/metrics" | awk '/^kvshelf_l1_bytes/ { print $2 }')
    after=$(rss_kib "$sidecar")
    gbps=$(awk '$1 == "http" { print $5 }' "$out/memory-bench.txt")
    printf '%s x %s per request, %s clients: sidecar RSS idle %d MiB, peak %d MiB, after %d MiB; L1 holds %d MiB; budgets: L1 %d MiB + fetches %d MiB; %s GB/s\n' \
        "$batch" "$size" "$clients" $((idle / 1024)) $((peak / 1024)) $((after / 1024)) \
        $((${l1%.*} / 1048576)) $((l1_budget >> 20)) $((fetch_budget >> 20)) "$gbps"
    kill "$sidecar"
    wait "$sidecar" 2>/dev/null || true
done
