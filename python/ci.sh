#!/usr/bin/env bash
# CI for the Python package, the LMCache plugin and the SGLang HiCache backend, on CPU, with
# the real LMCache and SGLang classes.
#
# Creates the LMCache environment once and keeps it (python/lmcache-venv.sh: lmcache==0.5.6
# pulls a CUDA torch wheel, ~5 GB; its CPU paths run without a GPU), checks the bindings'
# Rust code, builds the wheel with maturin, installs it into that environment and runs
# pytest against real redis-server processes and a real sidecar (the kvshelf binary, built
# here). Needs python3 >= 3.11, redis-server and redis-cli.
#
#   bash python/ci.sh                 # env: KVSHELF_LMCACHE_VENV, KVSHELF_SGLANG_VENV, CARGO_TARGET_DIR
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
# From tests/, so `import kvshelf` is the installed wheel, not the source tree. The engine
# suites (tests/vllm, tests/sglang) run below, each in its own engine's environment.
cd "$here/tests"
failed=0
set +e
"$venv/bin/pytest" -q -p no:cacheprovider -W ignore::DeprecationWarning --ignore=vllm --ignore=sglang .
rc=$?
set -e
if ((rc == 5)); then
  echo "python/ci: pytest collected no tests" >&2
  failed=1
elif ((rc != 0)); then
  failed=1
fi
echo "python/ci: pytest (LMCache venv) exit $rc after $((SECONDS - start))s"

# SGLang's HiCache backend (tests/sglang) with SGLang's real classes, in its own cached
# environment (python/sglang-venv.sh), with the same wheel. Its venv's bin/ goes first on
# PATH: SGLang builds its page-hash extension at first use with the ninja installed there
# (and g++ and libssl's headers, which sglang-venv.sh checks for).
sglang_venv="$(bash "$here/sglang-venv.sh")"
"$sglang_venv/bin/pip" install --quiet --force-reinstall --no-deps "$CARGO_TARGET_DIR"/wheels/kvshelf-*.whl
set +e
PATH="$sglang_venv/bin:$PATH" "$sglang_venv/bin/pytest" -q -p no:cacheprovider \
  -W ignore::DeprecationWarning sglang
rc=$?
set -e
if ((rc == 5)); then
  echo "python/ci: pytest (SGLang) collected no tests" >&2
  failed=1
elif ((rc != 0)); then
  failed=1
fi
echo "python/ci: pytest (SGLang venv) exit $rc after $((SECONDS - start))s"
exit "$failed"
