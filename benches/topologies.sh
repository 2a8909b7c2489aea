#!/usr/bin/env bash
# The data path on each topology, side by side (issue 11: "TLS and Cluster within 15% of
# standalone plaintext on the same machine"): `kvshelf bench` library fetch, read_into and
# put of new blocks, one caller, 8 blocks per call, against
#   - one redis-server over plain TCP (the baseline),
#   - one redis-server over TLS only (a private CA made here with openssl),
#   - a Redis Cluster of 3 primaries (no replicas),
# all started here on free ports and removed afterwards. Rounds interleave the topologies;
# each cell is the median of its rounds. Also `kvshelf bench --lookup` (256-block lookups,
# one pipeline per node) on the baseline.
#
#   benches/topologies.sh                     # 3 rounds of 2 MiB and 32 MiB
#   ROUNDS=5 SIZES="2MiB" benches/topologies.sh
#
# Needs redis-server, redis-cli, openssl; builds the release binary unless KVSHELF_BIN is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${ROUNDS:-3}
sizes=${SIZES:-"2MiB 32MiB"}
bin=${KVSHELF_BIN:-}
if [[ -z $bin ]]; then
    cargo build --release --quiet --bin kvshelf
    bin=${CARGO_TARGET_DIR:-target}/release/kvshelf
fi

dir=$(mktemp -d /tmp/kvshelf-topologies.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
common=(--save '' --appendonly no --maxmemory 12gb --maxmemory-policy volatile-lru --bind 127.0.0.1)
start() { # name, args…
    local name=$1
    shift
    mkdir -p "$dir/$name"
    redis-server "${common[@]}" --dir "$dir/$name" --logfile "$dir/$name/log" "$@" &
    pids+=($!)
}
wait_ping() { # redis-cli args…
    for _ in $(seq 100); do
        redis-cli "$@" PING 2>/dev/null | grep -q PONG && return 0
        sleep 0.05
    done
    echo "topologies: a redis-server did not start" >&2
    exit 1
}

# Plain.
plain=$(free_port)
start plain --port "$plain"
wait_ping -p "$plain"

# TLS only.
(
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=bench CA" \
        -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key \
        -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
        -extfile san.ext -out server.pem 2>/dev/null
)
tls=$(free_port)
start tls --port 0 --tls-port "$tls" --tls-cert-file "$dir/server.pem" \
    --tls-key-file "$dir/server.key" --tls-ca-cert-file "$dir/ca.pem" --tls-auth-clients no
wait_ping --tls --cacert "$dir/ca.pem" -p "$tls"

# Cluster of 3 primaries.
seeds=()
for i in 1 2 3; do
    p=$(free_port)
    start "c$i" --port "$p" --cluster-enabled yes --cluster-config-file "$dir/c$i.conf" \
        --cluster-node-timeout 2000
    wait_ping -p "$p"
    seeds+=("127.0.0.1:$p")
done
redis-cli --cluster create "${seeds[@]}" --cluster-yes >/dev/null
for _ in $(seq 100); do
    redis-cli -p "${seeds[0]#*:}" CLUSTER INFO | grep -q cluster_state:ok && break
    sleep 0.1
done

cat >"$dir/plain.toml" <<EOF
[store]
url = "redis://127.0.0.1:$plain"
EOF
cat >"$dir/tls.toml" <<EOF
[store]
url = "rediss://127.0.0.1:$tls"
tls_ca_file = "$dir/ca.pem"
EOF
urls=$(printf 'redis://%s,' "${seeds[@]}")
cat >"$dir/cluster.toml" <<EOF
[store]
url = "${urls%,}"
cluster = true
EOF

flush() {
    redis-cli -p "$plain" FLUSHALL >/dev/null
    redis-cli --tls --cacert "$dir/ca.pem" -p "$tls" FLUSHALL >/dev/null
    for s in "${seeds[@]}"; do redis-cli -p "${s#*:}" FLUSHALL >/dev/null; done
}

echo "topologies: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start" >&2
results="$dir/results.tsv"
for size in $sizes; do
    requests=$([[ $size == 32MiB ]] && echo 15 || echo 150)
    for round in $(seq "$rounds"); do
        topos=(plain tls cluster)
        k=$(((round - 1) % 3))
        for topo in "${topos[@]:k}" "${topos[@]:0:k}"; do
            echo "topologies: $size round $round/$rounds $topo" >&2
            "$bin" bench --config "$dir/$topo.toml" --size "$size" --batch 8 --concurrency 1 \
                --requests "$requests" --rounds 1 --paths library,library-into,put --json |
                python3 -c '
import json, sys
for p in json.load(sys.stdin)["paths"]:
    print(sys.argv[1], sys.argv[2], p["path"], p["gbps"], sep="\t")' "$size" "$topo" >>"$results"
            flush
        done
    done
done
echo "topologies: load average $(cut -d' ' -f1-3 /proc/loadavg) at the end" >&2

python3 - "$results" <<'EOF'
import collections, statistics, sys
cells = collections.defaultdict(list)
for line in open(sys.argv[1]):
    size, topo, path, gbps = line.split("\t")
    cells[(size, path, topo)].append(float(gbps))
print("| size | path | plain GB/s | TLS GB/s (× plain) | Cluster ×3 GB/s (× plain) |")
print("|---|---|---:|---:|---:|")
for size in dict.fromkeys(k[0] for k in cells):
    for path in ("library", "library-into", "put"):
        med = {t: statistics.median(cells[(size, path, t)]) for t in ("plain", "tls", "cluster")}
        print(f"| {size} | {path} | {med['plain']:.2f} | {med['tls']:.2f} "
              f"({med['tls'] / med['plain']:.2f}×) | {med['cluster']:.2f} "
              f"({med['cluster'] / med['plain']:.2f}×) |")
EOF
echo
echo "Lookups of 256 blocks on the plain Redis (one pipeline):"
"$bin" bench --lookup --redis "redis://127.0.0.1:$plain" --requests 2000
