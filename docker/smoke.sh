#!/usr/bin/env bash
# End-to-end smoke test of docker-compose.yml (the file users run) with the locally built
# images of docker/build-images.sh, so it needs no registry:
#
#   1. Redis and two kvshelf sidecars come up healthy
#   2. Redis runs with the eviction settings kvshelf expects (volatile-lfu)
#   3. the demo-worker service (inside the compose network) exits 0
#   4. from the host, through the published ports: a block put through sidecar A comes back
#      byte for byte (cmp) through sidecar B
#   5. that block's key, read with `redis-cli GETRANGE` inside the Redis container, starts
#      with the KVSHELF/1 header and names the namespace
#   6. the `cluster` profile forms a 3-master Redis Cluster: `cluster info` says
#      cluster_state:ok, all 16384 slots assigned, 3 nodes
#   7. its two sidecars (kvshelf-cluster-a/-b, store from docker/cluster.toml) become healthy;
#      12 blocks put through cluster-a come back byte for byte through cluster-b, and their
#      keys are spread over more than one master (counted on each node; DBSIZE shown)
# and then `down -v`, also on failure or Ctrl-C. Prints PASS/FAIL lines and a closing
# "smoke: N passed, N failed"; exits non-zero on any failure.
#
# Environment (all optional):
#   COMPOSE                  compose command   [`docker compose` if present, else docker-compose]
#   KVSHELF_REDIS_IMAGE      [kvshelf-ci/redis:bookworm]
#   KVSHELF_IMAGE            [kvshelf-ci/kvshelf:local]
#   KVSHELF_SMOKE_PROJECT    compose project name               [kvshelf-smoke]
#   KVSHELF_REDIS_PORT, KVSHELF_A_PORT, KVSHELF_B_PORT  host ports [16379, 17070, 17071]
#   KVSHELF_CLUSTER_A_PORT, KVSHELF_CLUSTER_B_PORT      host ports [17072, 17073]
#                            (not the defaults, so a developer's own Redis or sidecar on
#                            6379/7070/7071 does not get in the way)
#   KVSHELF_SMOKE_TIMEOUT    seconds to wait for health / one-shot services [90]
#   KVSHELF_SMOKE_KEEP=1     leave the services running (no `down -v`) to poke at them
set -uo pipefail

cd "$(dirname "$0")/.."

export KVSHELF_REDIS_IMAGE=${KVSHELF_REDIS_IMAGE:-kvshelf-ci/redis:bookworm}
export KVSHELF_IMAGE=${KVSHELF_IMAGE:-kvshelf-ci/kvshelf:local}
export KVSHELF_REDIS_PORT=${KVSHELF_REDIS_PORT:-16379}
export KVSHELF_A_PORT=${KVSHELF_A_PORT:-17070}
export KVSHELF_B_PORT=${KVSHELF_B_PORT:-17071}
export KVSHELF_CLUSTER_A_PORT=${KVSHELF_CLUSTER_A_PORT:-17072}
export KVSHELF_CLUSTER_B_PORT=${KVSHELF_CLUSTER_B_PORT:-17073}
export KVSHELF_PUBLISH_ADDR=127.0.0.1
export COMPOSE_PROJECT_NAME=${KVSHELF_SMOKE_PROJECT:-kvshelf-smoke}
timeout_s=${KVSHELF_SMOKE_TIMEOUT:-90}

passed=0
failed=0
pass() { passed=$((passed + 1)); printf 'smoke: PASS %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'smoke: FAIL %s\n' "$*"; }
info() { printf 'smoke: %s\n' "$*"; }

# `docker compose` (v2 plugin) or `docker-compose` (v1, Debian's), whichever is here.
# shellcheck source=docker/compose.sh
if ! source docker/compose.sh; then # (the working directory is the repository root)
  echo "smoke: FAIL neither \`docker compose\` nor docker-compose is installed"
  exit 1
fi
dc() { "${compose[@]}" -f docker-compose.yml "$@"; }

tmp=$(mktemp -d)
finish() {
  local rc=$?
  if ((failed > 0 || rc != 0)); then
    info "--- service status and logs (for the failure above) ---"
    dc --profile cluster ps -a 2>&1 | sed 's/^/  /'
    dc --profile cluster logs --no-color --tail=40 2>&1 | sed 's/^/  /'
  fi
  if [[ "${KVSHELF_SMOKE_KEEP:-0}" == 1 ]]; then
    info "KVSHELF_SMOKE_KEEP=1: leaving project $COMPOSE_PROJECT_NAME running"
  else
    dc --profile cluster down -v --remove-orphans >"$tmp/down.log" 2>&1 ||
      { info "down -v failed:"; sed 's/^/  /' "$tmp/down.log"; }
  fi
  rm -rf "$tmp"
  if ((failed == 0 && rc == 0)); then
    printf 'smoke: %d passed, %d failed\n' "$passed" "$failed"
    exit 0
  fi
  ((failed > 0)) || failed=1
  printf 'smoke: %d passed, %d failed\n' "$passed" "$failed"
  exit 1
}
trap finish EXIT
trap 'info "interrupted"; exit 130' INT TERM

# Stops the run at the first failed step that later steps depend on.
need() { "$@" || exit 1; }

# A service's container, running or exited, by compose's labels: `compose ps -q` of compose
# v2 leaves out exited containers (the one-shot services), v1 does not.
cid() {
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1" 2>/dev/null | head -n 1
}

# Waits until a service's container is healthy (bounded).
wait_healthy() {
  local svc=$1 id state deadline=$((SECONDS + timeout_s))
  while :; do
    id=$(cid "$svc")
    state=$([[ -n "$id" ]] && docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null)
    [[ "$state" == healthy ]] && { pass "$svc is healthy"; return 0; }
    if ((SECONDS >= deadline)); then
      fail "$svc is not healthy after ${timeout_s}s (state: ${state:-no container})"
      return 1
    fi
    sleep 1
  done
}

# Waits for a one-shot service to exit; true when it exited 0. Its output goes to $tmp/<svc>.log.
wait_exit0() {
  local svc=$1 id code
  id=$(cid "$svc")
  if [[ -z "$id" ]]; then fail "$svc: no container"; return 1; fi
  code=$(timeout "$timeout_s" docker wait "$id" 2>/dev/null)
  docker logs "$id" >"$tmp/$svc.log" 2>&1
  if [[ "$code" == 0 ]]; then return 0; fi
  fail "$svc exited with ${code:-no status within ${timeout_s}s}:"
  sed 's/^/  /' "$tmp/$svc.log"
  return 1
}

# 12 blocks through the cluster sidecars: put through cluster-a, GET through cluster-b, cmp;
# then where their keys landed (a master counts when it holds any of them).
cluster_data_path() {
  local ca="http://127.0.0.1:$KVSHELF_CLUSTER_A_PORT" cb="http://127.0.0.1:$KVSHELF_CLUSTER_B_PORT"
  local toks i h code bad="" n=0
  toks=$(for ((i = 0; i < 12 * 16; i++)); do printf '%d,' $(((RANDOM << 15 | RANDOM) % 150000)); done)
  curl -sS --max-time 10 "$ca/v1/hash" -d "{\"namespace\":\"demo\",\"tokens\":[${toks%,}]}" |
    grep -o '[0-9a-f]\{64\}' >"$tmp/cluster.hashes"
  if [[ $(grep -c . "$tmp/cluster.hashes") -ne 12 ]]; then
    fail "cluster sidecars: POST /v1/hash through cluster-a did not give 12 block hashes"; return
  fi
  while read -r h; do
    head -c 2048 /dev/urandom >"$tmp/put.bin"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X PUT --data-binary "@$tmp/put.bin" \
      "$ca/v1/blocks/demo/$h") || true
    [[ "$code" == 201 ]] || { bad+="PUT:$code "; continue; }
    code=$(curl -s -o "$tmp/got.bin" -w '%{http_code}' --max-time 10 "$cb/v1/blocks/demo/$h") || true
    if [[ "$code" == 200 ]] && cmp -s "$tmp/put.bin" "$tmp/got.bin"; then n=$((n + 1)); else bad+="GET:$code "; fi
  done <"$tmp/cluster.hashes"
  if [[ $n -eq 12 ]]; then
    pass "cluster sidecars: 12 blocks put through cluster-a (127.0.0.1:$KVSHELF_CLUSTER_A_PORT), cmp-identical through cluster-b (127.0.0.1:$KVSHELF_CLUSTER_B_PORT)"
  else
    fail "cluster sidecars: $n/12 round trips (failures: $bad)"
  fi
  local node held masters=0 sizes=""
  for node in 1 2 3; do
    held=$(sed 's/^/EXISTS kvshelf:v1:demo:/' "$tmp/cluster.hashes" |
      dc exec -T "redis-cluster-$node" redis-cli 2>/dev/null | tr -d '\r' | grep -cx 1)
    sizes+="node $node: DBSIZE $(dc exec -T "redis-cluster-$node" redis-cli DBSIZE 2>/dev/null | tr -d '\r'), $held of the blocks; "
    ((held > 0)) && masters=$((masters + 1))
  done
  if ((masters > 1)); then pass "cluster sidecars: the blocks landed on $masters masters (${sizes%; })"
  else fail "cluster sidecars: the blocks are on $masters master(s) only (${sizes%; })"; fi
}

for image in "$KVSHELF_REDIS_IMAGE" "$KVSHELF_IMAGE"; do
  docker image inspect "$image" >/dev/null 2>&1 ||
    { fail "image $image is missing: run docker/build-images.sh first"; exit 1; }
done
info "compose: ${compose[*]} ($("${compose[@]}" version --short 2>/dev/null || echo '?')); project $COMPOSE_PROJECT_NAME"
info "images: redis=$KVSHELF_REDIS_IMAGE kvshelf=$KVSHELF_IMAGE"

# A leftover project from an interrupted run would make ports clash.
dc --profile cluster down -v --remove-orphans >/dev/null 2>&1

# ---- 1. default services --------------------------------------------------------------
t0=$SECONDS
if dc up -d --no-build >"$tmp/up.log" 2>&1; then
  pass "compose up (redis, kvshelf-a, kvshelf-b, demo-worker) in $((SECONDS - t0))s"
else
  fail "compose up:"; sed 's/^/  /' "$tmp/up.log"; exit 1
fi
need wait_healthy redis
need wait_healthy kvshelf-a
need wait_healthy kvshelf-b

# ---- 2. Redis configuration -------------------------------------------------------------
policy=$(dc exec -T redis redis-cli config get maxmemory-policy 2>&1 | tr -d '\r' | tail -n 1)
maxmem=$(dc exec -T redis redis-cli config get maxmemory 2>&1 | tr -d '\r' | tail -n 1)
if [[ "$policy" == volatile-lfu && "$maxmem" =~ ^[1-9][0-9]*$ ]]; then
  pass "redis: maxmemory-policy $policy, maxmemory $maxmem"
else
  fail "redis: maxmemory-policy '$policy', maxmemory '$maxmem' (want volatile-lfu and a bound)"
fi

# ---- 3. the demo worker, inside the compose network -------------------------------------
if wait_exit0 demo-worker; then
  pass "demo-worker (in-network): $(grep -m1 'PASS' "$tmp/demo-worker.log" | sed 's/^demo-worker: PASS: //')"
fi

# The end-to-end worker pair: B, in its own container, must take A's prompt blocks off the
# shelf (hit tokens > 0) and produce exactly A's output.
if wait_exit0 worker-a && wait_exit0 worker-b; then
  a_json=$(grep -m1 '^{' "$tmp/worker-a.log" || true)
  b_json=$(grep -m1 '^{' "$tmp/worker-b.log" || true)
  b_hits=$(jq -r '.hit_tokens // 0' <<<"$b_json" 2>/dev/null || echo 0)
  a_out=$(jq -c '[.tokens, .text]' <<<"$a_json" 2>/dev/null || true)
  b_out=$(jq -c '[.tokens, .text]' <<<"$b_json" 2>/dev/null || true)
  if [[ "$b_hits" =~ ^[0-9]+$ ]] && ((b_hits > 0)) && [[ -n "$a_out" && "$a_out" == "$b_out" ]]; then
    pass "worker pair: B reused $b_hits prompt tokens from the shelf (TTFT $(jq -r .ttft_ms <<<"$b_json") ms vs A's $(jq -r .ttft_ms <<<"$a_json") ms) and its output equals A's"
  else
    fail "worker pair: B hit tokens '$b_hits', outputs equal: $([[ "$a_out" == "$b_out" ]] && echo yes || echo no)"
    sed 's/^/  A: /' "$tmp/worker-a.log"; sed 's/^/  B: /' "$tmp/worker-b.log"
  fi
fi

# ---- 4. the same round trip from the host, through the published ports -----------------
if ! command -v curl >/dev/null; then
  fail "host round trip: curl is not installed on the host"
elif KVSHELF_A_URL="http://127.0.0.1:$KVSHELF_A_PORT" KVSHELF_B_URL="http://127.0.0.1:$KVSHELF_B_PORT" \
  bash docker/demo-worker.sh >"$tmp/host.log" 2>&1; then
  pass "host round trip: put via 127.0.0.1:$KVSHELF_A_PORT (A), cmp-identical via 127.0.0.1:$KVSHELF_B_PORT (B)"
else
  fail "host round trip:"; sed 's/^/  /' "$tmp/host.log"
fi

# ---- 5. the block's header, read in the Redis container --------------------------------
key=$(sed -n 's/^demo-worker: key=//p' "$tmp/host.log" 2>/dev/null | head -n 1)
[[ -n "$key" ]] || key=$(sed -n 's/^demo-worker: key=//p' "$tmp/demo-worker.log" 2>/dev/null | head -n 1)
if [[ -z "$key" ]]; then
  fail "header: no block key to read (both round trips failed)"
else
  dc exec -T redis redis-cli GETRANGE "$key" 0 511 >"$tmp/header" 2>&1
  ns=${key#kvshelf:v1:}; ns=${ns%%:*}
  if [[ $(head -c 9 "$tmp/header") == "KVSHELF/1" ]] && grep -q "\"namespace\":\"$ns\"" "$tmp/header"; then
    pass "header: redis-cli GETRANGE $key 0 511 -> $(head -n 1 "$tmp/header")"
  else
    fail "header: GETRANGE $key 0 511 does not start with KVSHELF/1 + namespace $ns: $(head -c 200 "$tmp/header" | tr '\n' ' ')"
  fi
fi

# ---- 6. the cluster profile ------------------------------------------------------------
t0=$SECONDS
if dc --profile cluster up -d --no-build redis-cluster-1 redis-cluster-2 redis-cluster-3 redis-cluster-init \
  kvshelf-cluster-a kvshelf-cluster-b >"$tmp/up-cluster.log" 2>&1; then
  pass "compose --profile cluster up in $((SECONDS - t0))s"
  for n in 1 2 3; do wait_healthy "redis-cluster-$n"; done
  if wait_exit0 redis-cluster-init; then
    dc exec -T redis-cluster-1 redis-cli cluster info 2>&1 | tr -d '\r' >"$tmp/cluster-info"
    if grep -qx 'cluster_state:ok' "$tmp/cluster-info" &&
      grep -qx 'cluster_slots_assigned:16384' "$tmp/cluster-info" &&
      grep -qx 'cluster_known_nodes:3' "$tmp/cluster-info"; then
      pass "cluster: cluster_state:ok, 16384 slots assigned, 3 nodes"
    else
      fail "cluster: redis-cli cluster info says:"; sed 's/^/  /' "$tmp/cluster-info"
    fi
    # A key round trip across the slots of different masters (-c follows MOVED).
    ok=1
    for k in kvshelf-smoke-a kvshelf-smoke-b kvshelf-smoke-c; do
      dc exec -T redis-cluster-1 redis-cli -c set "$k" "v-$k" >/dev/null 2>&1 || ok=0
      [[ $(dc exec -T redis-cluster-2 redis-cli -c get "$k" 2>/dev/null | tr -d '\r') == "v-$k" ]] || ok=0
    done
    if ((ok)); then pass "cluster: keys set through node 1 read back through node 2 (redis-cli -c)"
    else fail "cluster: SET/GET across nodes with redis-cli -c"; fi

    # ---- 7. the sidecars on the cluster: the data path ------------------------------------
    if wait_healthy kvshelf-cluster-a && wait_healthy kvshelf-cluster-b; then
      cluster_data_path
    fi
  fi
else
  fail "compose --profile cluster up:"; sed 's/^/  /' "$tmp/up-cluster.log"
fi

((failed == 0))
