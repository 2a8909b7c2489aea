#!/usr/bin/env bash
# A stand-in for two inference workers on two hosts: "worker A" puts one KV block through its
# sidecar, "worker B" fetches it through another sidecar, and the bytes must be the same.
# The blocks travel through the shared Redis only: the sidecars do not talk to each other.
#
# Runs as the `demo-worker` service of docker-compose.yml, and from the host in
# docker/smoke.sh (against the published ports). Needs bash, curl, cmp, head, grep.
#
# Environment:
#   KVSHELF_A_URL       sidecar A   [http://kvshelf-a:7070]
#   KVSHELF_B_URL       sidecar B   [http://kvshelf-b:7070]
#   KVSHELF_NAMESPACE   namespace   [demo]  (the built-in one when no namespaces are configured)
#   KVSHELF_TOKEN       bearer token, when the sidecars have tenants configured
#   KVSHELF_DEMO_WAIT   seconds to wait for both sidecars to be ready [60]
#
# Prints "demo-worker: PASS …" and "demo-worker: key=<redis key>" and exits 0, or prints
# "demo-worker: FAIL …" and exits 1.
set -euo pipefail

a=${KVSHELF_A_URL:-http://kvshelf-a:7070}
b=${KVSHELF_B_URL:-http://kvshelf-b:7070}
ns=${KVSHELF_NAMESPACE:-demo}
wait_s=${KVSHELF_DEMO_WAIT:-60}

say() { printf 'demo-worker: %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

auth=()
[[ -n "${KVSHELF_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $KVSHELF_TOKEN")
# -sS: quiet but show errors; --fail-with-body is newer than some curls, so check codes.
http() { curl -sS --max-time 10 "${auth[@]}" "$@"; }

# Both sidecars ready (Redis reachable), bounded.
for url in "$a" "$b"; do
  deadline=$((SECONDS + wait_s))
  until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url/readyz" || true) == 200 ]]; do
    ((SECONDS < deadline)) || fail "$url/readyz is not 200 after ${wait_s}s"
    sleep 1
  done
done
say "sidecars ready: A=$a B=$b"

# Block size of the namespace, from sidecar A (GET /v1/namespaces).
http -o "$tmp/namespaces.json" "$a/v1/namespaces" || fail "GET $a/v1/namespaces"
block_bytes=$(tr -d ' \n' <"$tmp/namespaces.json" |
  grep -o "\"label\":\"$ns\"[^}]*" | grep -o '"block_bytes":[0-9]*' | head -n 1 | cut -d: -f2 || true)
if [[ -z "$block_bytes" ]]; then
  # Field order is not part of the contract: fall back to the first block_bytes listed.
  block_bytes=$(tr -d ' \n' <"$tmp/namespaces.json" | grep -o '"block_bytes":[0-9]*' |
    head -n 1 | cut -d: -f2 || true)
fi
[[ -n "$block_bytes" ]] || fail "no block_bytes for namespace $ns in $(head -c 300 "$tmp/namespaces.json")"
block_size=$(tr -d ' \n' <"$tmp/namespaces.json" | grep -o '"block_size":[0-9]*' | head -n 1 | cut -d: -f2 || true)
block_size=${block_size:-16}

# A prompt no earlier run used (puts are write-once: an old block would come back instead).
tokens=$(for ((i = 0; i < block_size; i++)); do printf '%d,' $(((RANDOM << 15 | RANDOM) % 150000)); done)
tokens=${tokens%,}

hash_of() {
  http -X POST -H 'Content-Type: application/json' \
    --data "{\"namespace\":\"$ns\",\"tokens\":[$tokens]}" "$1/v1/hash" |
    grep -o '"block_hashes":\["[0-9a-f]*"' | grep -o '[0-9a-f]\{16,\}' || true
}
hash=$(hash_of "$a")
[[ -n "$hash" ]] || fail "POST $a/v1/hash gave no block hash"
hash_b=$(hash_of "$b")
[[ "$hash" == "$hash_b" ]] || fail "sidecars disagree on the block hash: A=$hash B=$hash_b"

head -c "$block_bytes" /dev/urandom >"$tmp/put.bin"

# Worker A puts the block through sidecar A.
code=$(http -o "$tmp/put.json" -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
  --data-binary "@$tmp/put.bin" "$a/v1/blocks/$ns/$hash") || fail "PUT through A: curl failed"
[[ "$code" == 201 ]] || fail "PUT through A: HTTP $code $(cat "$tmp/put.json")"

# Worker B fetches it through sidecar B.
code=$(http -o "$tmp/got.bin" -w '%{http_code}' "$b/v1/blocks/$ns/$hash") || fail "GET through B: curl failed"
[[ "$code" == 200 ]] || fail "GET through B: HTTP $code $(head -c 300 "$tmp/got.bin")"
cmp -s "$tmp/put.bin" "$tmp/got.bin" || fail "bytes fetched through B differ from those put through A"

say "PASS: put $block_bytes bytes through A, fetched the same bytes through B (block $hash)"
say "key=kvshelf:v1:$ns:$hash"
