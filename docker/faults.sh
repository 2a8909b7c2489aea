#!/usr/bin/env bash
# Fault-injection tests of the compose topology (docker-compose.yml + docker/faults.compose.yml)
# with the locally built images of docker/build-images.sh. Each test says what it injects,
# asserts that the sidecars fail open (answers within bounds, misses instead of errors, never a
# 5xx or a dropped connection, never wrong bytes), and states what was lost. The rule checked
# throughout: a block a worker was told is `stored` (201) comes back byte for byte or is a miss
# for a stated reason; nothing else is ever returned for it.
#
#   a. redis-stop     `docker stop` the Redis container for ~3.5 s during 200 requests (~14 s:
#                     lookups and GETs through both sidecars), then `docker start` it. Redis
#                     runs with appendonly here, so every block stored before the stop must
#                     still be there afterwards; hits resume without restarting the sidecars.
#   b. cluster-node   `docker stop` one of the three cluster masters: its blocks are misses,
#                     the other masters' blocks still hit (identical bytes), nothing is a 5xx;
#                     then `docker start` it: its slots take writes again (its old blocks are
#                     gone: no replicas, no persistence in the cluster profile).
#   c. net-cut        `docker network disconnect` sidecar A from the back network (the one it
#                     shares with Redis; it keeps the front one, so the host still reaches it):
#                     A fails open and /readyz is 503; reconnect: /readyz 200, round trip works.
#   d. maxmemory      Redis with maxmemory 16mb (volatile-lfu); 64 MiB of puts through A:
#                     evicted_keys grows, puts and fetches keep answering 2xx/404, and every
#                     kvshelf key in Redis has a TTL.
#
# Prints "faults: PASS …" / "faults: FAIL …" lines (and NOTE lines: measurements, not
# assertions), ends with exactly "faults: N passed, M failed", exits non-zero on any failure,
# and always tears the project down (`down -v`), also on failure or Ctrl-C. It talks only to
# 127.0.0.1 (published ports) and, through `docker exec`, to the containers of its project.
#
# Usage: docker/faults.sh            (after docker/build-images.sh)
#
# Environment (all optional):
#   COMPOSE                 compose command   [`docker compose` if present, else docker-compose]
#   KVSHELF_REDIS_IMAGE     [kvshelf-ci/redis:bookworm]
#   KVSHELF_IMAGE           [kvshelf-ci/kvshelf:local]
#   KVSHELF_FAULTS_PROJECT  compose project name                 [kvshelf-faults]
#   KVSHELF_FAULTS_PORT     first of five host ports: Redis, then sidecars A, B, cluster-a,
#                           cluster-b on the next four            [27070 → 27070…27074]
#   KVSHELF_FAULTS_MAXMEMORY  Redis maxmemory (test d)           [16mb]
#   KVSHELF_FAULTS_TESTS    which tests, in this order           ["a b c d"]
#   KVSHELF_FAULTS_TIMEOUT  seconds to wait for health            [90]
#   KVSHELF_FAULTS_KEEP=1   leave the project running at the end (no `down -v`)
# Needs: docker, compose (1.28+ or v2), curl, python3 (test d builds framed put bodies), GNU date.
set -uo pipefail

cd "$(dirname "$0")/.."

export KVSHELF_REDIS_IMAGE=${KVSHELF_REDIS_IMAGE:-kvshelf-ci/redis:bookworm}
export KVSHELF_IMAGE=${KVSHELF_IMAGE:-kvshelf-ci/kvshelf:local}
port0=${KVSHELF_FAULTS_PORT:-27070}
export KVSHELF_REDIS_PORT=$port0
export KVSHELF_A_PORT=$((port0 + 1))
export KVSHELF_B_PORT=$((port0 + 2))
export KVSHELF_CLUSTER_A_PORT=$((port0 + 3))
export KVSHELF_CLUSTER_B_PORT=$((port0 + 4))
export KVSHELF_PUBLISH_ADDR=127.0.0.1
export KVSHELF_REDIS_MAXMEMORY=${KVSHELF_FAULTS_MAXMEMORY:-16mb}
export COMPOSE_PROJECT_NAME=${KVSHELF_FAULTS_PROJECT:-kvshelf-faults}
tests=${KVSHELF_FAULTS_TESTS:-a b c d}
timeout_s=${KVSHELF_FAULTS_TIMEOUT:-90}

A=http://127.0.0.1:$KVSHELF_A_PORT
B=http://127.0.0.1:$KVSHELF_B_PORT
CA=http://127.0.0.1:$KVSHELF_CLUSTER_A_PORT
CB=http://127.0.0.1:$KVSHELF_CLUSTER_B_PORT

passed=0
failed=0
cur=setup
say() { printf 'faults: %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf 'faults: PASS [%s] %s\n' "$cur" "$*"; }
fail() { failed=$((failed + 1)); printf 'faults: FAIL [%s] %s\n' "$cur" "$*"; }
note() { printf 'faults: NOTE [%s] %s\n' "$cur" "$*"; }
# check "description" test-command...: PASS or FAIL by the command's status.
check() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }

# `docker compose` (v2 plugin) or `docker-compose` (v1, Debian's), whichever is here.
# shellcheck source=docker/compose.sh
if ! source docker/compose.sh; then # (the working directory is the repository root)
  echo "faults: FAIL neither \`docker compose\` nor docker-compose is installed"
  echo "faults: 0 passed, 1 failed"
  exit 1
fi
dc() { "${compose[@]}" -f docker-compose.yml -f docker/faults.compose.yml --profile cluster "$@"; }

tmp=$(mktemp -d)
blk=$tmp/blocks # one file per block hash: the bytes that were put
mkdir -p "$blk"
bg_pid=""
t_script=$SECONDS

finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$bg_pid" ]] && kill -0 "$bg_pid" 2>/dev/null; then kill "$bg_pid" 2>/dev/null; wait "$bg_pid" 2>/dev/null; fi
  if ((failed > 0 || rc != 0)); then
    say "--- service status and logs (for the failure above) ---"
    dc ps -a 2>&1 | sed 's/^/  /'
    dc logs --no-color --tail=25 2>&1 | sed 's/^/  /'
  fi
  if [[ "${KVSHELF_FAULTS_KEEP:-0}" == 1 ]]; then
    say "KVSHELF_FAULTS_KEEP=1: leaving project $COMPOSE_PROJECT_NAME running"
  else
    local t0=$SECONDS
    if dc down -v --remove-orphans >"$tmp/down.log" 2>&1; then
      say "down -v in $((SECONDS - t0))s"
    else
      say "down -v failed:"; sed 's/^/  /' "$tmp/down.log"
    fi
  fi
  rm -rf "$tmp"
  ((failed == 0 && rc != 0)) && failed=1
  say "total $((SECONDS - t_script))s"
  printf 'faults: %d passed, %d failed\n' "$passed" "$failed"
  ((failed == 0)) && exit 0
  exit 1
}
trap finish EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ---- helpers ----------------------------------------------------------------------------

# A service's container (running or stopped), by compose's labels (v1 and v2 set them).
cid() {
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1" 2>/dev/null | head -n 1
}
# This project's network whose compose name is $1 (front, back).
net_id() {
  docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.network=$1" | head -n 1
}
# redis-cli inside a container: rcli <container> args…  /  rpipe <container> < commands
rcli() { docker exec -i "$1" redis-cli "${@:2}" </dev/null 2>&1 | tr -d '\r'; }
rpipe() { docker exec -i "$1" redis-cli 2>&1 | tr -d '\r'; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | awk '{print $1}'; }
restarts_of() { docker inspect -f '{{.RestartCount}} {{.State.StartedAt}}' "$1"; }
ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; } # milliseconds -> "1.2"

wait_healthy() {
  local svc=$1 id state deadline=$((SECONDS + timeout_s))
  while :; do
    id=$(cid "$svc")
    state=$([[ -n "$id" ]] && docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null)
    [[ "$state" == healthy ]] && return 0
    if ((SECONDS >= deadline)); then
      fail "$svc is not healthy after ${timeout_s}s (state: ${state:-no container})"
      return 1
    fi
    sleep 1
  done
}

# Polls `cmd…` every 0.2 s for up to $1 seconds; true once it succeeds. Sets waited_ms.
waited_ms=0
wait_for() {
  local limit=$1 t0; shift
  t0=$(ms)
  while :; do
    if "$@"; then waited_ms=$(($(ms) - t0)); return 0; fi
    if (($(ms) - t0 >= limit * 1000)); then waited_ms=$(($(ms) - t0)); return 1; fi
    sleep 0.2
  done
}

code_of() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true; }
readyz_is() { [[ $(code_of "$1/readyz") == "$2" ]]; }

# new_prompt <name> <blocks> <sidecar>: random tokens for <blocks> full blocks of `demo`;
# writes $tmp/<name>.json (a lookup body) and $tmp/<name>.hashes (one block hash a line).
new_prompt() {
  local name=$1 n=$2 url=$3 toks i
  toks=$(for ((i = 0; i < n * 16; i++)); do printf '%d,' $(((RANDOM << 15 | RANDOM) % 150000)); done)
  printf '{"namespace":"demo","tokens":[%s]}' "${toks%,}" >"$tmp/$name.json"
  curl -s --max-time 10 "$url/v1/hash" -d "@$tmp/$name.json" | grep -o '[0-9a-f]\{64\}' >"$tmp/$name.hashes"
  [[ $(wc -l <"$tmp/$name.hashes") -eq $n ]]
}

# put_block <sidecar> <hash> -> "<http code>:<outcome>" (new random bytes unless known)
put_block() {
  local url=$1 h=$2 code out=$tmp/put.$BASHPID
  [[ -f "$blk/$h" ]] || head -c 2048 /dev/urandom >"$blk/$h"
  code=$(curl -s -o "$out" -w '%{http_code}' --max-time 10 -X PUT \
    -H 'Content-Type: application/octet-stream' --data-binary "@$blk/$h" \
    "$url/v1/blocks/demo/$h" 2>/dev/null) || true
  printf '%s:%s\n' "${code:-000}" "$(grep -o '"outcome":"[a-z_]*"' "$out" 2>/dev/null | cut -d'"' -f4)"
  rm -f "$out"
}

# get_block <sidecar> <hash> -> 200 (the bytes that were put), 200-WRONG-BYTES, 404, or another code
get_block() {
  local url=$1 h=$2 code out=$tmp/get.$BASHPID
  code=$(curl -s -o "$out" -w '%{http_code}' --max-time 5 "$url/v1/blocks/demo/$h" 2>/dev/null) || true
  if [[ "$code" == 200 ]] && ! cmp -s "$out" "$blk/$h"; then code=200-WRONG-BYTES; fi
  rm -f "$out"
  echo "${code:-000}"
}

# lookup <sidecar> <json body file> -> "<http code> <hit_blocks> <backend_ok>"
lookup() {
  local url=$1 body=$2 code out=$tmp/lookup.$BASHPID
  code=$(curl -s -o "$out" -w '%{http_code}' --max-time 5 "$url/v1/lookup" -d "@$body" 2>/dev/null) || true
  printf '%s %s %s\n' "${code:-000}" \
    "$(grep -o '"hit_blocks":[0-9]*' "$out" 2>/dev/null | cut -d: -f2)" \
    "$(grep -o '"backend_ok":[a-z]*' "$out" 2>/dev/null | cut -d: -f2)"
  rm -f "$out"
}
# lookup_hash <sidecar> <hash>: lookup of one block by hash (no side effect on L1 or TTLs).
lookup_hash() {
  printf '{"namespace":"demo","block_hashes":["%s"]}' "$2" >"$tmp/lh.$BASHPID.json"
  lookup "$1" "$tmp/lh.$BASHPID.json"
  rm -f "$tmp/lh.$BASHPID.json"
}

# put_all <sidecar> <hashes file>: puts every block; true if all answered 201 stored.
put_all() {
  local h r ok=0
  while read -r h; do
    r=$(put_block "$1" "$h")
    [[ "$r" == "201:stored" ]] || { ok=1; say "  PUT $h through $1: $r"; }
  done <"$2"
  return $ok
}

# keys_exist <redis container> <hashes file>: how many of those blocks' keys exist.
keys_exist() {
  sed 's/^/EXISTS kvshelf:v1:demo:/' "$2" | rpipe "$1" | awk '$1 == 1 { n++ } END { print n + 0 }'
}

# ---- setup ------------------------------------------------------------------------------
for image in "$KVSHELF_REDIS_IMAGE" "$KVSHELF_IMAGE"; do
  docker image inspect "$image" >/dev/null 2>&1 ||
    { fail "image $image is missing: run docker/build-images.sh first"; exit 1; }
done
command -v curl >/dev/null || { fail "curl is not installed on the host"; exit 1; }
say "compose: ${compose[*]} ($("${compose[@]}" version --short 2>/dev/null || echo '?')); project $COMPOSE_PROJECT_NAME; tests: $tests"
say "host ports (127.0.0.1): redis $KVSHELF_REDIS_PORT, A $KVSHELF_A_PORT, B $KVSHELF_B_PORT, cluster-a $KVSHELF_CLUSTER_A_PORT, cluster-b $KVSHELF_CLUSTER_B_PORT"

dc down -v --remove-orphans >/dev/null 2>&1 # a leftover of an interrupted run
t0=$SECONDS
services=(redis kvshelf-a kvshelf-b)
[[ " $tests " == *" b "* ]] &&
  services+=(redis-cluster-1 redis-cluster-2 redis-cluster-3 redis-cluster-init kvshelf-cluster-a kvshelf-cluster-b)
if ! dc up -d --no-build "${services[@]}" >"$tmp/up.log" 2>&1; then
  fail "compose up:"; sed 's/^/  /' "$tmp/up.log"; exit 1
fi
for s in "${services[@]}"; do
  [[ "$s" == redis-cluster-init ]] && continue
  wait_healthy "$s" || exit 1
done
pass "up: ${services[*]} healthy in $((SECONDS - t0))s (networks ${COMPOSE_PROJECT_NAME}_front, ${COMPOSE_PROJECT_NAME}_back)"

REDIS=$(cid redis) SA=$(cid kvshelf-a) SB=$(cid kvshelf-b)

# ---- a. stop Redis under load -----------------------------------------------------------
# The load of test a: 200 requests paced 60 ms apart (~12 s; a request can take up to the
# sidecar's 100 ms timeouts while Redis is away, then the loop catches up). One line per
# request: "<ms since t0> lookup <A|B> <code> <hit_blocks> <backend_ok>" or
# "<ms since t0> get <A|B> <200|404|…>".
a_load() {
  local i j due now t0=$1
  local -a via_a via_b
  mapfile -t via_a <"$tmp/a_viaA.hashes"
  mapfile -t via_b <"$tmp/a_viaB.hashes"
  for ((i = 0; i < 200; i++)); do
    due=$((t0 + i * 60)) now=$(ms)
    ((due > now)) && sleep "$(awk -v d=$((due - now)) 'BEGIN { printf "%.3f", d / 1000 }')"
    if ((i % 2 == 0)); then
      # Each sidecar looks up the prompt the OTHER one put: a prompt entirely in the asking
      # sidecar's L1 is answered from there (backend_ok:true) without asking Redis.
      if (((i / 2) % 2)); then
        echo "$(($(ms) - t0)) lookup B $(lookup "$B" "$tmp/a_pA.json")"
      else
        echo "$(($(ms) - t0)) lookup A $(lookup "$A" "$tmp/a_pB.json")"
      fi
    else
      # Each GET asks for a block that sidecar has never seen (not in its L1): one put through
      # the other sidecar, so before and after the outage it can only come from Redis.
      j=$((i / 4))
      if (((i / 2) % 2)); then
        echo "$(($(ms) - t0)) get B $(get_block "$B" "${via_a[j]}")"
      else
        echo "$(($(ms) - t0)) get A $(get_block "$A" "${via_b[j]}")"
      fi
    fi
  done
}

test_a() {
  cur=a
  local t_start=$SECONDS
  say "[a] inject: docker stop the Redis container for ~3.5 s in the middle of 200 requests over ~14 s (100 lookups alternating A/B and 100 GETs, all of blocks the asking sidecar never had in its L1), then docker start it. Sidecars are not restarted; Redis runs with appendonly yes (docker/faults.compose.yml)."
  if ! { new_prompt a_pA 4 "$A" && new_prompt a_pB 4 "$B" && new_prompt a_viaA 50 "$A" && new_prompt a_viaB 50 "$B"; }; then
    fail "POST /v1/hash did not give the block hashes"; return
  fi
  if put_all "$A" "$tmp/a_pA.hashes" && put_all "$B" "$tmp/a_pB.hashes" &&
    put_all "$A" "$tmp/a_viaA.hashes" && put_all "$B" "$tmp/a_viaB.hashes"; then
    pass "before: 108 blocks put, all 201 stored (a 4-block prompt and 50 blocks through each sidecar)"
  else
    fail "before: not every put answered 201 stored"; return
  fi
  local before_a before_b
  before_a=$(restarts_of "$SA") before_b=$(restarts_of "$SB")

  local t0 t_stop t_started
  t0=$(ms)
  a_load "$t0" >"$tmp/a.load" 2>&1 &
  bg_pid=$!
  sleep 2
  t_stop=$(($(ms) - t0))
  docker stop -t 10 "$REDIS" >/dev/null
  sleep 3
  docker start "$REDIS" >/dev/null
  t_started=$(($(ms) - t0))
  wait "$bg_pid"; bg_pid=""
  local t_end
  t_end=$(awk 'END { print $1 }' "$tmp/a.load")
  note "timeline: docker stop at $(secs "$t_stop")s, docker start returned at $(secs "$t_started")s, load ended at $(secs "${t_end:-0}")s"

  # Every answer is a 200 (lookup, or GET with the right bytes) or a 404 miss.
  local n bad
  n=$(grep -c . "$tmp/a.load")
  bad=$(awk '($2 == "lookup" && $4 != 200) || ($2 == "get" && $4 != 200 && $4 != 404)' "$tmp/a.load")
  if [[ "$n" == 200 && -z "$bad" ]]; then
    pass "200/200 requests answered: lookups all 200, GETs 200 with the bytes that were put or 404; no 5xx, no connection error, no wrong bytes"
  else
    fail "$n/200 requests logged; bad answers: $(head -c 600 <<<"$bad" | tr '\n' ';')"
  fi
  local l_down g404 g200 first404 last404
  l_down=$(awk '$2 == "lookup" && $6 == "false"' "$tmp/a.load" | wc -l)
  g404=$(awk '$2 == "get" && $4 == 404' "$tmp/a.load" | wc -l)
  g200=$(awk '$2 == "get" && $4 == 200' "$tmp/a.load" | wc -l)
  first404=$(awk '$2 == "get" && $4 == 404 { print $1; exit }' "$tmp/a.load")
  last404=$(awk '$2 == "get" && $4 == 404 { t = $1 } END { print t }' "$tmp/a.load")
  if ((l_down > 0 && g404 > 0)); then
    pass "the outage was seen: $l_down lookups said backend_ok:false, $g404 GETs were misses (404, from $(secs "${first404:-0}")s to $(secs "${last404:-0}")s); $g200 GETs hit"
  else
    fail "the outage was not seen by the sidecars ($l_down lookups with backend_ok:false, $g404 GET misses)"
  fi
  # Misses only while Redis was away: none before the stop, none once it had recovered.
  local early
  early=$(awk -v t="$t_stop" '$2 == "get" && $4 == 404 && $1 < t' "$tmp/a.load" | wc -l)
  check "no miss before the stop ($early GET misses before $(secs "$t_stop")s)" test "$early" -eq 0

  # Recovery without restarts: per sidecar, from its first lookup with backend_ok:true after
  # the start on, every request to it hits (GET 200, lookups backend_ok:true).
  local side rec after relapse
  for side in A B; do
    rec=$(awk -v t="$t_started" -v s="$side" '$2 == "lookup" && $3 == s && $1 > t && $6 == "true" { print $1; exit }' "$tmp/a.load")
    if [[ -z "$rec" ]]; then
      fail "sidecar $side: no lookup with backend_ok:true in the load after Redis was started"
      continue
    fi
    after=$(awk -v t="$rec" -v s="$side" '$3 == s && $1 >= t' "$tmp/a.load" | wc -l)
    awk -v t="$rec" -v s="$side" '$3 == s && $1 >= t && (($2 == "get" && $4 != 200) || ($2 == "lookup" && $6 != "true"))' \
      "$tmp/a.load" >"$tmp/a.relapse"
    relapse=$(grep -c . "$tmp/a.relapse")
    check "sidecar $side recovered by itself $(secs $((rec - t_started)))s after docker start returned; all $after requests to it from then on hit ($relapse did not$( ((relapse)) && printf ': %s' "$(head -n 3 "$tmp/a.relapse" | tr '\n' ';')"))" \
      test "$relapse" -eq 0 -a "$after" -ge 10
  done
  check "both sidecars /readyz 200 (checked after the load)" test "$(code_of "$A/readyz")|$(code_of "$B/readyz")" == "200|200"
  check "sidecars not restarted (restart count and start time unchanged)" \
    test "$(restarts_of "$SA")|$(restarts_of "$SB")" == "$before_a|$before_b"

  # What was lost: with appendonly, nothing that was stored.
  local kept r ok
  cat "$tmp/a_pA.hashes" "$tmp/a_pB.hashes" "$tmp/a_viaA.hashes" "$tmp/a_viaB.hashes" >"$tmp/a_all.hashes"
  kept=$(keys_exist "$REDIS" "$tmp/a_all.hashes")
  check "all 108 blocks stored before the stop are in Redis after the restart ($kept/108 keys exist; appendonly)" test "$kept" -eq 108
  r=$(lookup "$B" "$tmp/a_pA.json")
  check "lookup through B of the prompt put through A (never in B's L1): '$r' (want 200 4 true)" test "$r" == "200 4 true"
  ok=1
  while read -r h; do [[ $(get_block "$B" "$h") == 200 ]] || ok=0; done <"$tmp/a_pA.hashes"
  check "its 4 blocks fetched through B after the restart: identical bytes (from Redis)" test "$ok" -eq 1
  ok=1
  new_prompt a_new 2 "$B" || ok=0
  while read -r h; do
    [[ $(put_block "$B" "$h") == 201:stored ]] || ok=0
    [[ $(get_block "$A" "$h") == 200 ]] || ok=0
  done <"$tmp/a_new.hashes"
  check "blocks put after the restart: 201 through B, identical bytes through A" test "$ok" -eq 1
  say "[a] lost: nothing a worker was told it had: $kept/108 stored blocks are still in Redis (appendonly; without it, a restarted Redis is empty and all 108 would be misses, not errors). During the outage workers got misses ($g404 GETs) and backend_ok:false lookups ($l_down), never an error. ($((SECONDS - t_start))s)"
}

# ---- b. stop one master of the Redis Cluster --------------------------------------------
test_b() {
  cur=b
  local t_start=$SECONDS
  local n1 n2 n3 svc c
  n1=$(cid redis-cluster-1) n2=$(cid redis-cluster-2) n3=$(cid redis-cluster-3)
  say "[b] inject: docker stop one master of the 3-master cluster (no replicas; cluster-require-full-coverage no) under the two cluster sidecars; later docker start it."
  # Slot ranges of each node, by container IP: "ip service lo hi".
  : >"$tmp/b.ranges"
  for svc in redis-cluster-1 redis-cluster-2 redis-cluster-3; do
    c=$(cid "$svc")
    rcli "$c" CLUSTER NODES | awk -v ip="$(ip_of "$c")" -v svc="$svc" '
      index($3, "myself") { for (i = 9; i <= NF; i++) { n = split($i, r, "-"); print ip, svc, r[1], (n > 1 ? r[2] : r[1]) } }' >>"$tmp/b.ranges"
  done
  # owners <hashes file>: the service owning each block's slot, one a line ("?" if none).
  # KEYSLOT is computed by whichever node is asked: $ask_c, a node that is up.
  local ask_c=$n1
  owners() {
    sed 's/^/CLUSTER KEYSLOT kvshelf:v1:demo:/' "$1" | rpipe "$ask_c" |
      awk 'NR == FNR { ip[NR] = $1; svc[NR] = $2; lo[NR] = $3; hi[NR] = $4; n = NR; next }
           { o = "?"; for (i = 1; i <= n; i++) if ($1 >= lo[i] && $1 <= hi[i]) o = svc[i]; print o }' "$tmp/b.ranges" -
  }
  if ! new_prompt b_p 24 "$CA"; then fail "POST /v1/hash (cluster-a) did not give 24 hashes"; return; fi
  if put_all "$CA" "$tmp/b_p.hashes"; then pass "before: 24 blocks put through cluster-a, all 201 stored"
  else fail "before: not every put through cluster-a answered 201"; return; fi
  owners "$tmp/b_p.hashes" >"$tmp/b_p.owners"
  local dist
  dist=$(sort "$tmp/b_p.owners" | uniq -c | awk '{ printf "%s%s=%s", sep, $2, $1; sep = ", " }')
  # Stop the owner of block 12 (mid-prompt, so a whole-prompt lookup has a prefix to find).
  local dead dead_c
  dead=$(sed -n 13p "$tmp/b_p.owners")
  dead_c=$(cid "$dead")
  local n_dead n_live
  n_dead=$(grep -cx "$dead" "$tmp/b_p.owners")
  n_live=$((24 - n_dead))
  # Each block's key must be on its owner (EXISTS without -c: the owner answers 1).
  local misplaced=0 i=0 h o
  paste -d' ' "$tmp/b_p.hashes" "$tmp/b_p.owners" >"$tmp/b_p.map"
  while read -r h o; do
    [[ $(rcli "$(cid "$o")" EXISTS "kvshelf:v1:demo:$h") == 1 ]] || misplaced=$((misplaced + 1))
  done <"$tmp/b_p.map"
  check "the 24 blocks are on all three masters ($dist), each found by EXISTS on its owner" \
    test "$misplaced" -eq 0 -a "$(sort -u "$tmp/b_p.owners" | grep -vc '?')" -eq 3 -a "$(grep -c '?' "$tmp/b_p.owners")" -eq 0
  awk -v d="$dead" '$2 != d { print $1 }' "$tmp/b_p.map" >"$tmp/b_live.hashes"
  awk -v d="$dead" '$2 == d { print $1 }' "$tmp/b_p.map" >"$tmp/b_dead.hashes"
  local first_dead
  first_dead=$(awk -v d="$dead" '$2 == d { print NR - 1; exit }' "$tmp/b_p.map")

  docker stop -t 10 "$dead_c" >/dev/null
  ask_c=$(cid "$(awk -v d="$dead" '$2 != d { print $2; exit }' "$tmp/b.ranges")")
  say "[b] stopped $dead: $n_dead of the 24 blocks are on it (first at index $first_dead), $n_live on the other two"

  # Phase 1, at once: lookups of each block (no side effect on L1), in prompt order, so
  # requests for the dead master come mixed with the others, as from real workers.
  # lookup_all: one single-block lookup per block through cluster-b, in prompt order; counts
  # the answers that are wrong (not 200, or a hit on $dead) and the hits on live masters.
  local lk_bad lk_live_hits
  lookup_all() {
    local h o r
    lk_bad=0 lk_live_hits=0
    while read -r h o; do
      r=$(lookup_hash "$CB" "$h")
      if [[ "$o" == "$dead" ]]; then [[ "$r" == "200 0 "* ]] || lk_bad=$((lk_bad + 1))
      else
        case "$r" in "200 1 true") lk_live_hits=$((lk_live_hits + 1)) ;; "200 0 "*) ;; *) lk_bad=$((lk_bad + 1)) ;; esac
      fi
    done <"$tmp/b_p.map"
  }
  lookup_all
  check "right after the stop: 24 single-block lookups through cluster-b all 200, the $n_dead blocks on $dead all misses" test "$lk_bad" -eq 0
  note "right after the stop, mixed order: $lk_live_hits/$n_live blocks of the live masters were hits (the others are misses while the cluster client reconnects, see docker/cluster.toml)"

  # Phase 2, once the others have marked it failed (the state in which the default
  # cluster-require-full-coverage yes would make them refuse every key).
  # flagged_failed: a live master's CLUSTER NODES flags a master as failed ("fail", not "fail?").
  flagged_failed() {
    local c
    for c in "$n1" "$n2" "$n3"; do
      [[ "$c" == "$dead_c" ]] && continue
      rcli "$c" CLUSTER NODES | grep -q 'master,fail ' && return 0
    done
    return 1
  }
  if wait_for 30 flagged_failed; then
    note "the live masters flagged $dead as failed $(secs "$waited_ms")s after that"
  else
    note "$dead was not flagged failed within 30s"
  fi
  local live_c state
  live_c=$(awk -v d="$dead" '$2 != d { print $2; exit }' "$tmp/b.ranges")
  state=$(rcli "$(cid "$live_c")" CLUSTER INFO | grep '^cluster_state')
  note "$live_c says $state"
  lookup_all
  check "after the failure is detected: lookups all 200, blocks on $dead all misses" test "$lk_bad" -eq 0
  note "after detection, mixed order: $lk_live_hits/$n_live blocks of the live masters were hits"

  # The data path: GETs through cluster-b, which never had these blocks in its L1. First the
  # live masters' blocks (after the client has settled: a live-block lookup hits again), then
  # the dead master's.
  live_hits() { [[ $(lookup_hash "$CB" "$(head -n 1 "$tmp/b_live.hashes")") == "200 1 true" ]]; }
  wait_for 5 live_hits || note "a live block's lookup did not hit within 5s"
  local g_ok=0 g_bad=""
  while read -r h; do
    r=$(get_block "$CB" "$h")
    if [[ "$r" == 200 ]]; then g_ok=$((g_ok + 1)); else g_bad+="$r "; fi
  done <"$tmp/b_live.hashes"
  check "GET through cluster-b of the $n_live blocks on the live masters: $g_ok/$n_live hit with identical bytes ${g_bad:+(others: $g_bad)}" test "$g_ok" -eq "$n_live"
  g_ok=0 g_bad=""
  while read -r h; do
    r=$(get_block "$CB" "$h")
    if [[ "$r" == 404 ]]; then g_ok=$((g_ok + 1)); else g_bad+="$r "; fi
  done <"$tmp/b_dead.hashes"
  check "GET through cluster-b of the $n_dead blocks on $dead: $g_ok/$n_dead are 404 misses ${g_bad:+(others: $g_bad)}" test "$g_ok" -eq "$n_dead"
  # Through cluster-a, which put them (all in its L1): hits from L1 or misses, never an error.
  local ga200=0 ga404=0 ga_bad=""
  while read -r h; do
    r=$(get_block "$CA" "$h")
    case "$r" in 200) ga200=$((ga200 + 1)) ;; 404) ga404=$((ga404 + 1)) ;; *) ga_bad+="$r " ;; esac
  done <"$tmp/b_p.hashes"
  check "GET through cluster-a (which put them, L1): $ga200 hits with identical bytes, $ga404 misses, no error ${ga_bad:+(bad: $ga_bad)}" test -z "$ga_bad"
  r=$(lookup "$CB" "$tmp/b_p.json")
  local hit=${r#200 }; hit=${hit%% *}
  check "whole-prompt lookup through cluster-b: '$r' (200, and no more than the $first_dead blocks before the first one on $dead)" \
    test "${r%% *}" == 200 -a "${hit:-99}" -le "$first_dead"

  # New puts while it is down: stored only where the owner is alive, never a false 201.
  new_prompt b_new 12 "$CA" || { fail "POST /v1/hash (cluster-a)"; return; }
  owners "$tmp/b_new.hashes" >"$tmp/b_new.owners"
  if grep -q '?' "$tmp/b_new.owners" || [[ $(grep -c . "$tmp/b_new.owners") -ne 12 ]]; then
    fail "could not map the new blocks to their masters"; return
  fi
  local p_live=0 p_live_ok=0 p_dead=0 p_dead_ok=0 p_bad="" stored_live=()
  while read -r h o; do
    r=$(put_block "$CA" "$h")
    if [[ "$o" == "$dead" ]]; then
      p_dead=$((p_dead + 1)); [[ "$r" == "200:dropped" ]] && p_dead_ok=$((p_dead_ok + 1)) || p_bad+="$dead:$r "
    else
      p_live=$((p_live + 1))
      case "$r" in 201:stored) p_live_ok=$((p_live_ok + 1)); stored_live+=("$h") ;; 200:dropped) ;; *) p_bad+="live:$r " ;; esac
    fi
  done < <(paste -d' ' "$tmp/b_new.hashes" "$tmp/b_new.owners")
  check "12 new puts through cluster-a while $dead is down: $p_dead_ok/$p_dead for $dead answered 200 dropped, $p_live_ok/$p_live for live masters 201 stored; no error, no false 201 ${p_bad:+(bad: $p_bad)}" test -z "$p_bad"
  ((p_live_ok == p_live)) || note "$((p_live - p_live_ok)) puts for live masters were dropped (fail open during a reconnect stall)"
  local f_ok=0
  for h in "${stored_live[@]}"; do [[ $(get_block "$CB" "$h") == 200 ]] && f_ok=$((f_ok + 1)); done
  check "the $p_live_ok new blocks stored: fetched through cluster-b, identical bytes ($f_ok/$p_live_ok)" test "$f_ok" -eq "$p_live_ok"

  # Back up: the node rejoins (its nodes.conf is in the container), empty (no persistence).
  docker start "$dead_c" >/dev/null
  rejoined() {
    [[ $(rcli "$dead_c" CLUSTER INFO | grep '^cluster_state') == cluster_state:ok ]] &&
      ! rcli "$(cid "$live_c")" CLUSTER NODES | grep -q fail
  }
  if wait_for 30 rejoined; then
    pass "$dead restarted and rejoined the cluster (cluster_state:ok, no node flagged failed) in $(secs "$waited_ms")s"
  else
    fail "$dead did not rejoin within 30s"
  fi
  # A fresh block on its slots is stored and fetched again (the sidecars reconnect by themselves).
  local t_rec got="" k
  t_rec=$(ms)
  for k in $(seq 1 40); do
    new_prompt b_back 4 "$CA" || break
    owners "$tmp/b_back.hashes" >"$tmp/b_back.owners"
    h=$(paste -d' ' "$tmp/b_back.hashes" "$tmp/b_back.owners" | awk -v d="$dead" '$2 == d { print $1; exit }')
    [[ -n "$h" ]] || continue
    if [[ $(put_block "$CA" "$h") == 201:stored && $(get_block "$CB" "$h") == 200 ]]; then got=$h; break; fi
    (($(ms) - t_rec > 20000)) && break
    sleep 0.5
  done
  check "after the restart, a new block on $dead's slots: 201 through cluster-a, identical bytes through cluster-b (after $(secs $(($(ms) - t_rec)))s)" test -n "$got"
  local left
  left=$(rcli "$dead_c" DBSIZE)
  say "[b] lost: the $n_dead blocks that were on $dead (no replicas, no persistence in this profile): misses while it was down, and gone after its restart (DBSIZE $left, the new block included); workers recompute them. Blocks on the live masters: none lost. ($((SECONDS - t_start))s)"
}

# ---- c. cut one sidecar off Redis -------------------------------------------------------
test_c() {
  cur=c
  local t_start=$SECONDS back
  back=$(net_id back)
  say "[c] inject: docker network disconnect ${COMPOSE_PROJECT_NAME}_back kvshelf-a (A keeps the front network and its published port; Redis and B are untouched), then reconnect."
  if ! new_prompt c_q 2 "$B" || ! put_all "$B" "$tmp/c_q.hashes"; then fail "before: 2 blocks put through B"; return; fi
  local before_a
  before_a=$(restarts_of "$SA")
  docker network disconnect "$back" "$SA" || { fail "docker network disconnect failed"; return; }
  local t_cut
  t_cut=$(ms)
  check "A still reachable on 127.0.0.1:$KVSHELF_A_PORT (GET /healthz 200) with only its front network" test "$(code_of "$A/healthz")" == 200
  if wait_for 15 readyz_is "$A" 503; then pass "A /readyz 503 after $(secs $(($(ms) - t_cut)))s"
  else fail "A /readyz is $(code_of "$A/readyz"), not 503, 15s after the cut"; fi
  local r
  r=$(lookup "$A" "$tmp/c_q.json")
  check "A lookup of a 2-block prompt stored through B: '$r' (want 200 0 false)" test "$r" == "200 0 false"
  local ok=1
  while read -r h; do [[ $(get_block "$A" "$h") == 404 ]] || ok=0; done <"$tmp/c_q.hashes"
  check "A GET of those 2 blocks: 404 (misses)" test "$ok" -eq 1
  new_prompt c_drop 12 "$A" || true
  h=$(head -n 1 "$tmp/c_drop.hashes")
  local t_put=$(ms)
  r=$(put_block "$A" "$h")
  check "A PUT of a new block: '$r' in $(secs $(($(ms) - t_put)))s (want 200:dropped)" test "$r" == "200:dropped"
  # A burst of mixed requests: all within the fail-open contract.
  local i bad="" n=0
  for ((i = 0; i < 30; i++)); do
    case $((i % 3)) in
      0) r=$(lookup "$A" "$tmp/c_q.json"); [[ "$r" == "200 0 false" ]] || bad+="lookup:$r " ;;
      1) r=$(get_block "$A" "$(sed -n "$((i % 2 + 1))p" "$tmp/c_q.hashes")"); [[ "$r" == 404 ]] || bad+="get:$r " ;;
      2) r=$(put_block "$A" "$(sed -n "$((i / 3 + 2))p" "$tmp/c_drop.hashes")"); [[ "$r" == 200:dropped ]] || bad+="put:$r " ;;
    esac
    n=$((n + 1))
  done
  check "30 more requests to A while cut off (lookups, GETs, PUTs): all 200 backend_ok:false / 404 / 200 dropped ${bad:+(bad: $bad)}" test -z "$bad"
  r=$(lookup "$B" "$tmp/c_q.json")
  check "B unaffected: /readyz 200, lookup '$r' (want 200 2 true)" test "$(code_of "$B/readyz")|$r" == "200|200 2 true"
  local dropped_there
  dropped_there=$(head -n 11 "$tmp/c_drop.hashes" | keys_exist "$REDIS" /dev/stdin)
  note "of the 11 blocks A answered 'dropped', $dropped_there are in Redis (a dropped put is 'maybe not stored'; here A could not reach Redis at all)"

  docker network connect --alias kvshelf-a "$back" "$SA" || { fail "docker network connect failed"; return; }
  local t_back
  t_back=$(ms)
  if wait_for 20 readyz_is "$A" 200; then pass "reconnected: A /readyz 200 after $(secs $(($(ms) - t_back)))s, without a restart"
  else fail "A /readyz is not 200 20s after reconnecting"; fi
  ok=1
  while read -r h; do [[ $(get_block "$A" "$h") == 200 ]] || ok=0; done <"$tmp/c_q.hashes"
  check "A GET of the 2 blocks stored through B during the cut: identical bytes (from Redis)" test "$ok" -eq 1
  h=$(tail -n 1 "$tmp/c_drop.hashes")
  r=$(put_block "$A" "$h")
  check "round trip: PUT through A '$r' (want 201:stored), GET through B identical bytes" \
    test "$r|$(get_block "$B" "$h")" == "201:stored|200"
  check "A not restarted" test "$(restarts_of "$SA")" == "$before_a"
  say "[c] lost: nothing stored: blocks put through B stayed fetchable; A's 11 puts during the cut were answered 'dropped' (not stored, and A never claimed otherwise). ($((SECONDS - t_start))s)"
}

# ---- d. maxmemory under sustained puts --------------------------------------------------
# d_body <blocks> <body file> <probes>: a framed put body of random blocks; prints the hashes
# of <probes> of them, whose bytes it also writes to $blk for later GETs.
d_body() {
  python3 - "$1" "$2" "$blk" "$3" <<'EOF'
import os, struct, sys
n, body, blkdir, probes = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
step = max(1, n // probes)
out = bytearray(b"KVFRAME1")
for i in range(n):
    h, p = os.urandom(32), os.urandom(2048)
    out += struct.pack("<BI", 1, i) + h + struct.pack("<Q", len(p)) + p
    if i % step == step - 1:
        with open(os.path.join(blkdir, h.hex()), "wb") as f:
            f.write(p)
        print(h.hex())
out += struct.pack("<BIB", 2, n, 1)
with open(body, "wb") as f:
    f.write(out)
EOF
}

test_d() {
  cur=d
  local t_start=$SECONDS batches=32 per=1024
  command -v python3 >/dev/null || { fail "python3 is needed to build framed put bodies"; return; }
  local maxmem policy
  maxmem=$(rcli "$REDIS" CONFIG GET maxmemory | tail -n 1)
  policy=$(rcli "$REDIS" CONFIG GET maxmemory-policy | tail -n 1)
  local total_mib=$((batches * per * 2048 / 1048576))
  say "[d] inject: Redis maxmemory $maxmem bytes ($KVSHELF_REDIS_MAXMEMORY), $policy; $total_mib MiB of new blocks ($batches framed puts of $per blocks of 2048 bytes) through A, each followed by GETs of 4 of its blocks through B."
  local ev0 ev1
  ev0=$(rcli "$REDIS" INFO stats | awk -F: '$1 == "evicted_keys" { print $2 + 0 }')
  local b code out stored=0 dropped=0 present=0 put_bad="" g200=0 g404=0 g_bad="" h r
  for ((b = 0; b < batches; b++)); do
    d_body "$per" "$tmp/d.body" 4 >"$tmp/d.probes" || { fail "python3 failed to build a put body"; return; }
    code=$(curl -s -o "$tmp/d.out" -w '%{http_code}' --max-time 30 -X POST \
      -H 'Content-Type: application/x-kvshelf-frames' --data-binary "@$tmp/d.body" \
      "$A/v1/put?namespace=demo" 2>/dev/null) || true
    if [[ "$code" == 200 ]]; then
      stored=$((stored + $(grep -o '"stored"' "$tmp/d.out" | wc -l)))
      dropped=$((dropped + $(grep -o '"dropped"' "$tmp/d.out" | wc -l)))
      present=$((present + $(grep -o '"already_present"' "$tmp/d.out" | wc -l)))
    else
      put_bad+="batch$b:${code:-000} "
    fi
    while read -r h; do
      r=$(get_block "$B" "$h")
      case "$r" in 200) g200=$((g200 + 1)) ;; 404) g404=$((g404 + 1)) ;; *) g_bad+="$r " ;; esac
    done <"$tmp/d.probes"
  done
  check "$batches/$batches framed puts answered 200 ($stored blocks stored, $dropped dropped, $present already present) ${put_bad:+(bad: $put_bad)}" \
    test -z "$put_bad" -a $((stored + dropped + present)) -eq $((batches * per))
  check "$((batches * 4)) GETs through B: $g200 hits with identical bytes, $g404 misses (evicted), no error ${g_bad:+(bad: $g_bad)}" test -z "$g_bad"
  ev1=$(rcli "$REDIS" INFO stats | awk -F: '$1 == "evicted_keys" { print $2 + 0 }')
  check "Redis evicted: evicted_keys $ev0 -> $ev1" test "${ev1:-0}" -gt "${ev0:-0}"
  local used
  used=$(rcli "$REDIS" INFO memory | awk -F: '$1 == "used_memory" { print $2 + 0 }')
  note "used_memory $used bytes (maxmemory $maxmem)"
  # No key without a TTL: PTTL of every kvshelf key (-1 = no TTL, -2 = gone since the scan).
  rcli "$REDIS" --scan --pattern 'kvshelf:v1:*' >"$tmp/d.keys"
  local nkeys no_ttl minttl
  nkeys=$(grep -c . "$tmp/d.keys")
  sed 's/^/PTTL /' "$tmp/d.keys" | rpipe "$REDIS" >"$tmp/d.pttl"
  no_ttl=$(awk '$1 == -1' "$tmp/d.pttl" | wc -l)
  minttl=$(awk '$1 > 0 && (m == "" || $1 < m) { m = $1 } END { print m }' "$tmp/d.pttl")
  # Anything but a positive PTTL or -2 (evicted or expired between SCAN and PTTL) is a failure.
  local odd gone
  odd=$(awk '!($1 ~ /^[0-9]+$/ && $1 > 0) && $1 != -2' "$tmp/d.pttl" | wc -l)
  gone=$(awk '$1 == -2' "$tmp/d.pttl" | wc -l)
  check "every one of the $nkeys kvshelf keys has a TTL (PTTL > 0; $no_ttl with none, $gone gone since the scan, min ${minttl:-?} ms)" \
    test "$nkeys" -gt 0 -a "$odd" -eq 0 -a "$(wc -l <"$tmp/d.pttl")" -eq "$nkeys"
  local ks
  ks=$(rcli "$REDIS" INFO keyspace | grep '^db0:')
  note "INFO keyspace: ${ks:-empty} (keys = expires: every key is volatile)"
  check "both sidecars /readyz 200 after the flood" test "$(code_of "$A/readyz")|$(code_of "$B/readyz")" == "200|200"
  say "[d] lost: by design, the blocks Redis evicted to stay under maxmemory ($ev1 evictions): later GETs of them are misses ($g404 of the probes), never errors or wrong bytes; the sidecars kept answering. ($((SECONDS - t_start))s)"
}

for t in $tests; do
  case "$t" in
    a) test_a ;;
    b) test_b ;;
    c) test_c ;;
    d) test_d ;;
    *) cur=setup; fail "unknown test '$t' in KVSHELF_FAULTS_TESTS" ;;
  esac
done
cur=end
((failed == 0))
