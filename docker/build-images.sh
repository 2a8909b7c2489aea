#!/usr/bin/env bash
# Builds the images docker-compose.yml needs without any container registry:
#
#   kvshelf-ci/redis:bookworm   a Debian bookworm root filesystem made with debootstrap from
#                               the mirror apt already uses, with redis-server, redis-tools,
#                               curl and ca-certificates, turned into an image by `docker import`
#   kvshelf-ci/kvshelf:local    that base plus the host-built target/release/kvshelf
#                               (docker/Dockerfile.local; its base is local, so nothing is pulled)
#
# Then:  docker/smoke.sh   (runs docker-compose.yml with KVSHELF_REDIS_IMAGE/KVSHELF_IMAGE
# pointing at these images).
#
# Usage: docker/build-images.sh [--rebuild-base]
#
# The base image is cached: debootstrap runs only when it does not exist yet (or with
# --rebuild-base / KVSHELF_CI_REBUILD_BASE=1). The kvshelf image is rebuilt every run, after
# `cargo build --release --locked --bin kvshelf` (a no-op when the binary is up to date) so
# the image never carries a stale binary.
#
# Environment (all optional):
#   KVSHELF_CI_REDIS_IMAGE   name of the base image      [kvshelf-ci/redis:bookworm]
#   KVSHELF_CI_IMAGE         name of the kvshelf image   [kvshelf-ci/kvshelf:local]
#   KVSHELF_CI_SUITE         Debian suite                [bookworm]
#   KVSHELF_DEBIAN_MIRROR    Debian mirror               [the one apt uses for the suite]
#   KVSHELF_DEBIAN_SECURITY_MIRROR                       [the one apt uses for <suite>-security]
#   KVSHELF_BIN              use this binary, do not run cargo
#   CARGO_BUILD_JOBS         passed to cargo as usual
#
# Needs root (debootstrap, chroot), docker, and on first run network access to the Debian
# mirror (debootstrap itself is installed with apt-get when missing).
set -euo pipefail

# A relative KVSHELF_BIN is relative to where the script was started.
if [[ -n "${KVSHELF_BIN:-}" && "$KVSHELF_BIN" != /* ]]; then KVSHELF_BIN=$PWD/$KVSHELF_BIN; fi
cd "$(dirname "$0")/.."
repo=$(pwd)

redis_image=${KVSHELF_CI_REDIS_IMAGE:-kvshelf-ci/redis:bookworm}
kvshelf_image=${KVSHELF_CI_IMAGE:-kvshelf-ci/kvshelf:local}
suite=${KVSHELF_CI_SUITE:-bookworm}
rebuild_base=${KVSHELF_CI_REBUILD_BASE:-0}

for arg in "$@"; do
  case "$arg" in
    --rebuild-base) rebuild_base=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker daemon"

t_start=$(now)
work=""
old_base_id=""
cleanup() {
  if [[ -n "$work" && -d "$work" ]]; then
    # Never leave a mount behind in a directory we are about to delete.
    for m in proc sys dev/pts dev; do
      mountpoint -q "$work/rootfs/$m" 2>/dev/null && umount -l "$work/rootfs/$m" || true
    done
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT

# The mirror apt uses for a suite (main component), from apt's own view of its sources, so
# that deb822 .sources files, sources.list and any mirror rewriting are all honoured.
apt_mirror_for() {
  apt-get indextargets --format '$(RELEASE) $(COMPONENT) $(REPO_URI)' 'Identifier: Packages' \
    2>/dev/null | awk -v s="$1" '$1 == s && $2 == "main" { print $3; exit }'
}

build_base() {
  [[ $(id -u) -eq 0 ]] || die "building the base image needs root (debootstrap, chroot)"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  local mirror security
  mirror=${KVSHELF_DEBIAN_MIRROR:-$(apt_mirror_for "$suite")}
  security=${KVSHELF_DEBIAN_SECURITY_MIRROR:-$(apt_mirror_for "$suite-security")}
  if [[ -z "$mirror" ]]; then
    # apt has no list for the suite yet (fresh machine before `apt-get update`).
    apt-get update -qq || true
    mirror=$(apt_mirror_for "$suite")
    security=${KVSHELF_DEBIAN_SECURITY_MIRROR:-$(apt_mirror_for "$suite-security")}
  fi
  mirror=${mirror:-http://deb.debian.org/debian/}
  security=${security:-http://deb.debian.org/debian-security/}
  # An apt proxy, if one is configured, applies to debootstrap's downloads too.
  local http_proxy="" https_proxy=""
  eval "$(apt-config shell http_proxy Acquire::http::Proxy https_proxy Acquire::https::Proxy)"
  [[ -n "$http_proxy" ]] && export http_proxy
  [[ -n "$https_proxy" ]] && export https_proxy
  log "base image $redis_image: debootstrap $suite from $mirror (security: $security)"

  old_base_id=$(docker image inspect -f '{{.Id}}' "$redis_image" 2>/dev/null || true)
  work=$(mktemp -d /var/tmp/kvshelf-rootfs.XXXXXX)
  local root="$work/rootfs" t0
  t0=$(now)
  debootstrap --variant=minbase --components=main \
    --include=ca-certificates,curl,redis-server,redis-tools \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
      tail -n 30 "$work/debootstrap.log" >&2
      die "debootstrap failed (full log above)"
    }
  log "debootstrap done in $(($(now) - t0))s"

  # Security and point-release updates, from the same mirrors, then the same sources stay in
  # the image so that `apt-get update && apt-get install …` works in derived images.
  t0=$(now)
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$root/etc/apt/sources.list"
  # No service may start inside the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
    sh -ec 'apt-get update -qq
            apt-get -y -qq -o Dpkg::Use-Pty=0 upgrade >/dev/null
            apt-get clean' >"$work/upgrade.log" 2>&1 || {
      tail -n 30 "$work/upgrade.log" >&2
      die "apt-get upgrade in the new root filesystem failed"
    }
  umount "$root/proc"
  log "security updates applied in $(($(now) - t0))s"

  # Slim it down and leave nothing host-specific behind.
  rm -f "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/*
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  # Redis' working directory, as in the official image (cluster nodes write nodes.conf there).
  # No EXPOSE 6379: the kvshelf image is built on this one and would inherit it.
  install -d -m 0755 "$root/data"
  chroot "$root" chown redis:redis /data
  local version
  version=$(chroot "$root" redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
  log "redis-server $version installed"

  t0=$(now)
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /data' \
    --change 'USER redis' \
    --change "LABEL org.opencontainers.image.title=kvshelf-ci-redis org.opencontainers.image.description=\"Debian $suite + redis-server $version (debootstrap)\" org.opencontainers.image.version=$version" \
    --change 'CMD ["redis-server", "--protected-mode", "no"]' \
    --message "debootstrap $suite from $mirror" \
    - "$redis_image" >/dev/null
  log "imported $redis_image in $(($(now) - t0))s ($(docker image inspect -f '{{.Size}}' "$redis_image" | awk '{printf "%.0f MB", $1/1e6}'))"
  cleanup
  work=""
}

if [[ "$rebuild_base" != 1 ]] && docker image inspect "$redis_image" >/dev/null 2>&1; then
  log "base image $redis_image exists: skipping debootstrap (--rebuild-base to redo it)"
else
  build_base
fi

# ---- kvshelf image --------------------------------------------------------------------
if [[ -n "${KVSHELF_BIN:-}" ]]; then
  bin=$KVSHELF_BIN
else
  t0=$(now)
  log "cargo build --release --locked --bin kvshelf"
  cargo build --release --locked --bins
  log "cargo done in $(($(now) - t0))s"
  bin=$repo/target/release/kvshelf
fi
[[ -x "$bin" ]] || die "no kvshelf binary at $bin"
"$bin" serve --help >/dev/null 2>&1 || die "$bin has no \`serve\` subcommand: stale binary?"

ctx=$(mktemp -d /var/tmp/kvshelf-ctx.XXXXXX)
trap 'cleanup; rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/kvshelf"
# The end-to-end worker (docker-compose.yml's worker-a/worker-b) sits beside the binary.
[[ -x "$(dirname "$bin")/kvshelf-worker" ]] || die "no kvshelf-worker beside $bin (cargo build --bins)"
cp "$(dirname "$bin")/kvshelf-worker" "$ctx/kvshelf-worker"
cp docker/Dockerfile.local "$ctx/Dockerfile"
old_id=$(docker image inspect -f '{{.Id}}' "$kvshelf_image" 2>/dev/null || true)
t0=$(now)
docker build --quiet --force-rm --build-arg "BASE_IMAGE=$redis_image" \
  --label "org.opencontainers.image.title=kvshelf" \
  --label "org.opencontainers.image.version=$("$bin" --version | awk '{print $2}')" \
  -t "$kvshelf_image" "$ctx" >/dev/null
log "built $kvshelf_image in $(($(now) - t0))s"
# The image this run replaced is now untagged: drop it rather than pile up one per run
# (kept if a container still uses it).
new_id=$(docker image inspect -f '{{.Id}}' "$kvshelf_image")
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true
fi
if [[ -n "$old_base_id" && "$old_base_id" != "$(docker image inspect -f '{{.Id}}' "$redis_image")" ]]; then
  docker rmi "$old_base_id" >/dev/null 2>&1 || true
fi

# The images must do what the compose file expects of them.
docker run --rm --entrypoint redis-server "$redis_image" --version >/dev/null \
  || die "$redis_image: redis-server does not run"
docker run --rm --entrypoint redis-cli "$redis_image" --version >/dev/null \
  || die "$redis_image: redis-cli does not run"
docker run --rm "$kvshelf_image" --version >/dev/null || die "$kvshelf_image: kvshelf does not run"
docker run --rm --entrypoint curl "$kvshelf_image" --version >/dev/null \
  || die "$kvshelf_image: curl does not run"

log "done in $(($(now) - t_start))s: $redis_image, $kvshelf_image"
