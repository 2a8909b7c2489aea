#!/usr/bin/env bash
# The vLLM 0.33.0 environment, created once and kept (vllm==0.33.0 pulls a CUDA torch wheel,
# ~5 GB; the parts of vLLM kvshelf's tier tests drive — the scheduler, the OffloadingConnector,
# the CPU tier — run on CPU without a GPU). python/ci.sh and benches/vllm_tier.py use it.
# Prints its path on stdout; everything else goes to stderr.
#
#   venv=$(bash python/vllm-venv.sh)     # env: KVSHELF_VLLM_VENV
set -euo pipefail
venv="${KVSHELF_VLLM_VENV:-$HOME/.cache/kvshelf/vllm-venv}"
if ! "$venv/bin/python" -c 'import vllm, pytest, numpy, maturin' 2>/dev/null; then
  echo "vllm-venv: creating $venv (vllm==0.33.0, pytest, maturin, numpy)" >&2
  python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "vllm-venv: python3 >= 3.11 needed" >&2; exit 1; }
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet vllm==0.33.0 pytest maturin numpy >&2
fi
echo "$venv"
