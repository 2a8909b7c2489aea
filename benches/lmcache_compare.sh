#!/usr/bin/env bash
# Issue 11's targets in one command: kvshelf's library (`kvshelf bench` library fetch and put)
# and sidecar (HTTP and gRPC, L1 off, 1 and 4 callers) against LMCache 0.5.6's own `resp://`
# connector (RESPConnector, batched get and batched put of new keys) and redis-benchmark GET,
# 2 MiB and 32 MiB chunks, 8 per call, on one Redis, in interleaved rounds. Prints one table
# of medians (GB/s), each target's ratio and whether it is met, and the load average.
#
#   benches/lmcache_compare.sh                       # 5 rounds, 1 GiB per path and round
#   benches/lmcache_compare.sh --rounds 9 --json target/bench/lmcache-compare.json
#   benches/lmcache_compare.sh --redis redis://127.0.0.1:6390   # FLUSHALLed between steps!
#   benches/lmcache_compare.sh --before-bin /tmp/old/target/release/kvshelf   # and an older
#                                                    # build's, same rounds, side by side
#   benches/lmcache_compare.sh --help                # the options and the method in full
#
# Creates the LMCache venv once (python/lmcache-venv.sh, shared with python/ci.sh) and builds
# the release binary (cargo, incremental) unless KVSHELF_BIN names one. Without --redis it
# starts its own redis-server on a free port. Needs redis-server, redis-cli, redis-benchmark.
#
# Environment: KVSHELF_LMCACHE_VENV (default ~/.cache/kvshelf/lmcache-venv), KVSHELF_BIN,
# CARGO_TARGET_DIR, LMCACHE_LOG_LEVEL (default WARNING).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=$(bash python/lmcache-venv.sh)
bin=${KVSHELF_BIN:-}
if [[ -z $bin ]]; then
    echo "lmcache_compare: cargo build --release --bin kvshelf" >&2
    cargo build --release --quiet --bin kvshelf
    bin=${CARGO_TARGET_DIR:-target}/release/kvshelf
fi
export LMCACHE_LOG_LEVEL=${LMCACHE_LOG_LEVEL:-WARNING}
exec "$venv/bin/python" benches/lmcache_compare.py --bin "$bin" "$@"
