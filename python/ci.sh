#!/usr/bin/env bash
# CI for the Python package, the LMCache plugin and the vLLM tier, on CPU, with the real
# LMCache and vLLM classes.
#
# Creates the LMCache environment once and keeps it (python/lmcache-venv.sh: lmcache==0.5.6
# pulls a CUDA torch wheel, ~5 GB; its CPU paths run without a GPU), checks the bindings'
# Rust code, builds the wheel with maturin, installs it into that environment and runs
# pytest against real redis-server processes and a real sidecar (the kvshelf binary, built
# here); then the same wheel into the vLLM environment (python/vllm-venv.sh, vllm==0.33.0)
# for tests/vllm. Needs python3 >= 3.11, redis-server and redis-cli.
#
#   bash python/ci.sh                 # env: KVSHELF_LMCACHE_VENV, KVSHELF_VLLM_VENV, CARGO_TARGET_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
main_target="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TARGET_DIR="$main_target/py"
start=$SECONDS

venv="$(bash "$here/lmcache-venv.sh")"
export PYO3_PYTHON="$venv/bin/python"

cd "$here"
echo "python/ci: cargo fmt --check, clippy (bindings)"
cargo fmt --check
cargo clippy --locked --release -- -D warnings

echo "python/ci: maturin build (abi3 wheel) and install"
rm -rf "$CARGO_TARGET_DIR/wheels"
"$venv/bin/maturin" build --locked --release --quiet --interpreter "$venv/bin/python" \
  --out "$CARGO_TARGET_DIR/wheels"
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$CARGO_TARGET_DIR"/wheels/kvshelf-*.whl

echo "python/ci: the kvshelf binary (tests/test_client.py runs a real sidecar)"
(cd "$repo" && CARGO_TARGET_DIR="$main_target" cargo build --locked --quiet --bin kvshelf)
export KVSHELF_BIN="$main_target/debug/kvshelf"

echo "python/ci: pytest"
# From tests/, so `import kvshelf` is the installed wheel, not the source tree. Each engine's
# tests run in that engine's environment; the exit codes are collected and checked at the
# end (5, no tests collected, is a failure too).
cd "$here/tests"
failed=0
check() { # check <name> <exit code>
  if (($2 == 5)); then
    echo "python/ci: $1: pytest collected no tests" >&2
    failed=1
  elif (($2 != 0)); then
    echo "python/ci: $1: pytest exit $2" >&2
    failed=1
  fi
}
set +e
"$venv/bin/pytest" -q -p no:cacheprovider -W ignore::DeprecationWarning --ignore=vllm --ignore=sglang .
check lmcache $?
set -e

echo "python/ci: vLLM tier (python/vllm-venv.sh, tests/vllm)"
vllm_venv="$(bash "$here/vllm-venv.sh")"
"$vllm_venv/bin/pip" install --quiet --force-reinstall --no-deps "$CARGO_TARGET_DIR"/wheels/kvshelf-*.whl
set +e
"$vllm_venv/bin/pytest" -q -p no:cacheprovider -W ignore::DeprecationWarning vllm
check vllm $?
set -e

echo "python/ci: pytest done after $((SECONDS - start))s"
exit "$failed"
