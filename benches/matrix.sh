#!/usr/bin/env bash
# The fetch matrix, the whole method in one command: every kvshelf path, the ceilings
# (redis-benchmark GET/SET, a loopback TCP stream) and the redis-py baseline, over value
# sizes × batch × concurrency, against one Redis, on this machine.
#
#   benches/matrix.sh            # 192KiB/2MiB/32MiB × batch 1/8/32 × concurrency 1/4/16
#   benches/matrix.sh --quick    # 2MiB, batch 8, concurrency 4 only
#
# Writes $OUT/matrix.json (default target/bench), $OUT/fetch-gbps.svg and $OUT/tables.md.
#
# Environment:
#   KVSHELF_BENCH_REDIS        redis://host:port to use instead of starting a redis-server
#                              (no password: redis_py.py takes host and port only)
#   KVSHELF_BIN                kvshelf binary (default target/release/kvshelf; built if missing)
#   KVSHELF_BENCH_VENV         Python venv for redis-py and matplotlib (default target/bench-venv)
#   KVSHELF_BENCH_BYTES        payload bytes each path moves per cell and round (default 1000000000)
#   KVSHELF_BENCH_ROUNDS       rounds per cell (kvshelf bench --rounds; default 1)
#   KVSHELF_BENCH_SIZES        sizes, of 192KiB 2MiB 32MiB (space or comma separated)
#   KVSHELF_BENCH_BATCHES      blocks per request
#   KVSHELF_BENCH_CONCURRENCY  concurrent clients
#   OUT                        output directory (default target/bench)
# Relative paths are taken from the repository root.
#
# Cells whose in-flight bytes (size × batch × concurrency) exceed 2 GiB are skipped and
# listed. A cell that fails is recorded and the rest still run; the script then exits 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "matrix.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

if ((quick)); then
    sizes="2MiB" batches="8" concurrencies="4"
else
    sizes="192KiB 2MiB 32MiB" batches="1 8 32" concurrencies="1 4 16"
fi
sizes=${KVSHELF_BENCH_SIZES:-$sizes}
batches=${KVSHELF_BENCH_BATCHES:-$batches}
concurrencies=${KVSHELF_BENCH_CONCURRENCY:-$concurrencies}
read -r -a sizes <<<"${sizes//,/ }"
read -r -a batches <<<"${batches//,/ }"
read -r -a concurrencies <<<"${concurrencies//,/ }"

bench_bytes=${KVSHELF_BENCH_BYTES:-1000000000}
rounds=${KVSHELF_BENCH_ROUNDS:-1}
max_inflight=$((2 << 30))
out=${OUT:-target/bench}
venv=${KVSHELF_BENCH_VENV:-target/bench-venv}
bin=${KVSHELF_BIN:-target/release/kvshelf}

size_bytes() {
    case "$1" in
        192KiB) echo 196608 ;;
        2MiB) echo 2097152 ;;
        32MiB) echo 33554432 ;;
        *)
            echo "matrix.sh: unknown size $1 (192KiB, 2MiB or 32MiB)" >&2
            return 1
            ;;
    esac
}
for s in "${sizes[@]}"; do size_bytes "$s" >/dev/null; done
for n in "${batches[@]}" "${concurrencies[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "matrix.sh: not a positive count: $n" >&2; exit 2; }
done

log() { echo "matrix.sh: $*" >&2; }

# --- Python: redis-py (the baseline) and matplotlib (the plot), pinned by major version.
if [[ ! -x $venv/bin/python ]]; then
    log "creating venv $venv"
    python3 -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install --quiet --disable-pip-version-check 'redis>=8,<9' 'matplotlib>=3,<4'

# --- kvshelf
if [[ ! -x $bin ]]; then
    log "building $bin"
    cargo build --release --bin kvshelf
fi

# --- Redis: our own, unless one is given.
redis_pid=
cleanup() {
    if [[ -n $redis_pid ]]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
mkdir -p "$out"
rm -f "$out/matrix.json" "$out/fetch-gbps.svg" "$out/tables.md"
if [[ -n ${KVSHELF_BENCH_REDIS:-} ]]; then
    url=$KVSHELF_BENCH_REDIS
else
    port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --maxmemory 6gb --maxmemory-policy volatile-lfu \
        --dir "$(cd "$out" && pwd)" --logfile redis.log &
    redis_pid=$!
    url=redis://127.0.0.1:$port
    for _ in $(seq 100); do
        redis-cli -u "$url" ping >/dev/null 2>&1 && break
        kill -0 "$redis_pid" 2>/dev/null || { log "redis-server did not start, see $out/redis.log"; exit 1; }
        sleep 0.1
    done
    log "started redis-server on port $port (pid $redis_pid)"
fi
if [[ $url =~ ^redis://([^:/@]+):([0-9]+)/?$ ]]; then
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
else
    log "KVSHELF_BENCH_REDIS must look like redis://host:port, not $url"
    exit 2
fi
redis_version=$(redis-cli -u "$url" info server | tr -d '\r' | sed -n 's/^redis_version://p')
[[ -n $redis_version ]] || { log "no Redis answers at $url"; exit 1; }

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
machine="$(nproc) vCPU ${cpu_model:-unknown CPU}, ${mem_gib} GiB, $(uname -r), redis $redis_version"
started=$(date -Iseconds)

# --- The cells: per-run files in $out/cells, listed in index.tsv, merged after each cell so
# an interrupted run still leaves a matrix.json.
cells=$out/cells
rm -rf "$cells"
mkdir -p "$cells"
index=$cells/index.tsv
: >"$index"

merge() {
    MACHINE=$machine STARTED=$started "$py" - "$index" "$out/matrix.json" <<'EOF'
import json, os, sys

index, dest = sys.argv[1], sys.argv[2]
doc = {"machine": os.environ["MACHINE"], "started": os.environ["STARTED"],
       "cells": [], "skipped": [], "failed": []}
with open(index) as fh:
    for line in fh:
        size, n, b, c, r, status, stem = line.rstrip("\n").split("\t")
        cell = {"size": size, "value_bytes": int(n), "batch": int(b), "concurrency": int(c)}
        if status == "skipped":
            doc["skipped"].append({**cell, "inflight_bytes": int(n) * int(b) * int(c),
                                   "reason": "in-flight bytes (size × batch × concurrency) over 2 GiB"})
            continue
        if status != "ok":
            doc["failed"].append({**cell, "reason": status})
            continue
        with open(stem + ".kvshelf.json") as f:
            kv = json.load(f)
        with open(stem + ".redis-py.json") as f:
            rp = json.load(f)
        doc["cells"].append({
            **cell, "requests": int(r),
            "paths": kv["paths"] + rp["paths"],
            "ceilings": kv.get("ceilings", []),
            "redis_py": {k: rp.get(k) for k in ("redis_py", "parser", "protocol")},
        })
if not doc["failed"]:
    del doc["failed"]
with open(dest + ".tmp", "w") as f:
    json.dump(doc, f, indent=2)
os.replace(dest + ".tmp", dest)
EOF
}

total=$((${#sizes[@]} * ${#batches[@]} * ${#concurrencies[@]}))
i=0 failed=0 skipped=()
log "$machine"
log "Redis $url; $total cells; each path moves ~$bench_bytes bytes per cell"
for size in "${sizes[@]}"; do
    n=$(size_bytes "$size")
    for b in "${batches[@]}"; do
        for c in "${concurrencies[@]}"; do
            i=$((i + 1))
            cell="$size batch $b concurrency $c"
            stem=$cells/$size-b$b-c$c
            if ((n * b * c > max_inflight)); then
                log "[$i/$total] $cell: skipped (in flight $((n * b * c >> 20)) MiB > 2 GiB)"
                skipped+=("$cell")
                printf '%s\t%s\t%s\t%s\t0\tskipped\t%s\n' "$size" "$n" "$b" "$c" "$stem" >>"$index"
                merge
                continue
            fi
            r=$(((bench_bytes + n * b - 1) / (n * b)))
            ((r >= 2 * c)) || r=$((2 * c))
            status=ok
            log "[$i/$total] $cell: kvshelf bench, $r requests per path"
            if ! "$bin" --redis "$url" bench --size "$size" --batch "$b" --concurrency "$c" \
                --requests "$r" --rounds "$rounds" --ceilings --json >"$stem.kvshelf.json"; then
                status="kvshelf bench failed"
            fi
            if [[ $status == ok ]]; then
                log "[$i/$total] $cell: redis-py, $r requests per path"
                if ! "$py" benches/redis_py.py --host "$host" --port "$port" --value-bytes "$n" \
                    --batch "$b" --concurrency "$c" --requests "$r" --json >"$stem.redis-py.json"; then
                    status="redis_py.py failed"
                fi
            fi
            if [[ $status != ok ]]; then
                log "[$i/$total] $cell: $status"
                failed=$((failed + 1))
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$n" "$b" "$c" "$r" "$status" "$stem" >>"$index"
            merge
        done
    done
done

# --- Plot the batch 8 / concurrency 4 slice (or the first of each list without them).
pick() {
    local want=$1
    shift
    for v in "$@"; do [[ $v == "$want" ]] && { echo "$v"; return; }; done
    echo "$1"
}
plot_b=$(pick 8 "${batches[@]}")
plot_c=$(pick 4 "${concurrencies[@]}")
if ((i - ${#skipped[@]} - failed > 0)); then
    "$py" benches/plot.py "$out/matrix.json" --batch "$plot_b" --concurrency "$plot_c" \
        --out "$out/fetch-gbps.svg" || log "no plot: nothing measured at batch $plot_b, concurrency $plot_c"
fi
"$py" benches/plot.py "$out/matrix.json" --table >"$out/tables.md"
cat "$out/tables.md"

if ((${#skipped[@]})); then
    joined=$(printf '%s; ' "${skipped[@]}")
    log "skipped (over 2 GiB in flight): ${joined%; }"
fi
log "wrote $out/matrix.json, $out/tables.md$( [[ -f $out/fetch-gbps.svg ]] && echo ", $out/fetch-gbps.svg")"
if ((failed)); then
    log "$failed cell(s) failed; see \"failed\" in $out/matrix.json"
    exit 1
fi
