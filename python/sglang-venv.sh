#!/usr/bin/env bash
# The SGLang environment for python/tests/sglang and benches/sglang_backend.py, created once
# and kept: sglang==0.5.23 pulls a CUDA torch wheel (several GB); the classes the tests use
# (HiCacheStorage, the storage backend factory, the host KV pools) run on CPU without a GPU.
# Prints its path on stdout; everything else goes to stderr.
#
# Prerequisites (Debian/Ubuntu): python3 >= 3.11 with venv; importing sglang needs no
# compiler, the tests use no JIT kernel.
#
#   venv=$(bash python/sglang-venv.sh)      # env: KVSHELF_SGLANG_VENV
set -euo pipefail
venv="${KVSHELF_SGLANG_VENV:-$HOME/.cache/kvshelf/sglang-venv}"
if ! "$venv/bin/python" -c 'import sglang, pytest, numpy, maturin' 2>/dev/null; then
  echo "sglang-venv: creating $venv (sglang==0.5.23, pytest, maturin, numpy)" >&2
  python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "sglang-venv: python3 >= 3.11 needed" >&2; exit 1; }
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet sglang==0.5.23 pytest maturin numpy >&2
fi
echo "$venv"
