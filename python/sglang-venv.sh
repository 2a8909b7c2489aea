#!/usr/bin/env bash
# The SGLang environment for python/tests/sglang and benches/sglang_backend.py, created once
# and kept: sglang==0.5.23 pulls a CUDA torch wheel (several GB); the classes the tests use
# (HiCacheStorage, the storage backend factory, the host KV pools) run on CPU without a GPU.
# Prints its path on stdout; everything else goes to stderr.
#
# Prerequisites: python3 >= 3.11 with venv; g++ and OpenSSL's headers and libcrypto
# (Debian/Ubuntu: g++ libssl-dev), with which SGLang compiles its page-hash extension
# (sglang.srt.mem_cache.cpp_utils, through torch's cpp_extension and this venv's ninja) the
# first time a page key is computed. Run as root on Debian/Ubuntu, this installs those two
# packages when they are missing.
#
#   venv=$(bash python/sglang-venv.sh)      # env: KVSHELF_SGLANG_VENV
set -euo pipefail
if ! command -v g++ >/dev/null || [[ ! -e /usr/include/openssl/sha.h ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "sglang-venv: installing g++ and libssl-dev (SGLang's page-hash extension)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      g++ libssl-dev >&2
  else
    echo "sglang-venv: SGLang's page-hash extension needs g++ and OpenSSL headers (libssl-dev)" >&2
    exit 1
  fi
fi
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
