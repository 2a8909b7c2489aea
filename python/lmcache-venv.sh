#!/usr/bin/env bash
# The LMCache 0.5.6 environment, created once and kept (lmcache==0.5.6 pulls a CUDA torch
# wheel, ~5 GB; its CPU paths run without a GPU). python/ci.sh and benches/lmcache_compare.sh
# share it. Prints its path on stdout; everything else goes to stderr.
#
#   venv=$(bash python/lmcache-venv.sh)     # env: KVSHELF_LMCACHE_VENV
set -euo pipefail
venv="${KVSHELF_LMCACHE_VENV:-$HOME/.cache/kvshelf/lmcache-venv}"
if ! "$venv/bin/python" -c 'import lmcache, pytest, numpy, maturin' 2>/dev/null; then
  echo "lmcache-venv: creating $venv (lmcache==0.5.6, pytest, maturin, numpy)" >&2
  python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "lmcache-venv: python3 >= 3.11 needed" >&2; exit 1; }
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet lmcache==0.5.6 pytest maturin numpy >&2
fi
echo "$venv"
