#!/usr/bin/env bash
# Issue 19's benchmark in one command: LMCache's own `lmcache bench l2` driving kvshelf's
# `native_plugin` and LMCache's `resp` adapter on one private redis-server, 2 MiB and 32 MiB
# chunks, in-flight 1 and 4, interleaved runs, with the ceiling of a minimal blocking client
# (benches/redis_get_ceiling.py) in the same runs; prints a markdown table
# (benches/lmcache_bench_l2.py says how it is measured).
#
#   benches/lmcache_bench_l2.sh                          # 3 runs of 5 rounds, ~10 minutes
#   benches/lmcache_bench_l2.sh --runs 5 --json target/bench/l2.json
#   benches/lmcache_bench_l2.sh --chunks-kb 2048 --in-flight 1 --runs 1   # one cell
#   benches/lmcache_bench_l2.sh --also-env OMP_WAIT_POLICY=PASSIVE   # both adapters again
#   benches/lmcache_bench_l2.sh --before /tmp/kv-before   # and an older build, interleaved:
#     (git worktree add /tmp/wt <commit>; cd /tmp/wt/python; maturin build --release;
#      pip install --no-deps --target /tmp/kv-before target/wheels/kvshelf-*.whl)
#
# Creates the LMCache venv once (python/lmcache-venv.sh, shared with python/ci.sh) and builds
# and installs this checkout's kvshelf wheel into it (maturin, release, incremental; skip
# with KVSHELF_BENCH_NO_BUILD=1 to measure what is installed). Needs redis-server,
# redis-cli and redis-benchmark (./test.sh --install-only installs them).
#
# Environment: KVSHELF_LMCACHE_VENV, CARGO_TARGET_DIR, KVSHELF_BENCH_NO_BUILD.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=$(bash python/lmcache-venv.sh)
if [[ ${KVSHELF_BENCH_NO_BUILD:-0} != 1 ]]; then
    target="${CARGO_TARGET_DIR:-$PWD/target}/py"
    echo "lmcache_bench_l2: maturin build --release (python/) and install into $venv" >&2
    rm -rf "$target/wheels"
    (cd python && CARGO_TARGET_DIR="$target" "$venv/bin/maturin" build --locked --release \
        --quiet --interpreter "$venv/bin/python" --out "$target/wheels" >&2)
    "$venv/bin/pip" install --quiet --force-reinstall --no-deps "$target"/wheels/kvshelf-*.whl >&2
fi
export LMCACHE_LOG_LEVEL=${LMCACHE_LOG_LEVEL:-WARNING} LMCACHE_DISABLE_BANNER=1
exec "$venv/bin/python" benches/lmcache_bench_l2.py "$@"
