#!/usr/bin/env bash
# CI for the Python package, the LMCache plugin, the vLLM tier and the SGLang HiCache
# backend, on CPU, with the real LMCache, vLLM and SGLang classes.
#
# Creates the LMCache environment once and keeps it (python/lmcache-venv.sh: lmcache==0.5.6
# pulls a CUDA torch wheel, ~5 GB; its CPU paths run without a GPU), checks the bindings'
# Rust code, builds the wheel with maturin, installs it into that environment and runs
# pytest against real redis-server processes and a real sidecar (the kvshelf binary, built
# here); then the same wheel into the vLLM environment (python/vllm-venv.sh, vllm==0.33.0)
# for tests/vllm and the SGLang one (python/sglang-venv.sh, sglang==0.5.23) for
# tests/sglang. Needs python3 >= 3.11, redis-server and redis-cli.
#
#   bash python/ci.sh   # env: KVSHELF_LMCACHE_VENV, KVSHELF_VLLM_VENV, KVSHELF_SGLANG_VENV, CARGO_TARGET_DIR
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
# tests run in that engine's environment (tests/vllm, tests/sglang), with the same wheel;
# the exit codes are collected and checked at the end (5, no tests collected, is a failure
# too).
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
  echo "python/ci: $1: pytest exit $2 after $((SECONDS - start))s"
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

# SGLang's HiCache backend (tests/sglang) in its own cached environment
# (python/sglang-venv.sh). Its venv's bin/ goes first on PATH: SGLang builds its page-hash
# extension at first use with the ninja installed there (and g++ and libssl's headers,
# which sglang-venv.sh checks for).
echo "python/ci: SGLang backend (python/sglang-venv.sh, tests/sglang)"
sglang_venv="$(bash "$here/sglang-venv.sh")"
"$sglang_venv/bin/pip" install --quiet --force-reinstall --no-deps "$CARGO_TARGET_DIR"/wheels/kvshelf-*.whl
set +e
PATH="$sglang_venv/bin:$PATH" "$sglang_venv/bin/pytest" -q -p no:cacheprovider \
  -W ignore::DeprecationWarning sglang
check sglang $?
set -e

echo "python/ci: pytest done after $((SECONDS - start))s"
exit "$failed"
