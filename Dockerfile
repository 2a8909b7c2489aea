# kvshelf sidecar image.
#
#   docker build -t kvshelf:latest .
#   docker run --rm -p 7070:7070 -e KVSHELF_REDIS_URL=redis://redis.internal:6379 kvshelf:latest
#
# Needs a registry for the two base images. Machines without one build the CI images with
# docker/build-images.sh instead (docs/deploy.md, "Offline images").
#
# Plain Dockerfile syntax (no BuildKit-only features), so the legacy builder, BuildKit and
# docker-compose 1.x all build it the same way.

# ---- builder ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. Cargo needs every target the manifest names to exist before it fetches, hence the
# empty stand-ins; `COPY . .` below replaces them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/kvshelf benches tests \
 && touch src/lib.rs src/bin/kvshelf/main.rs src/bin/kvshelf-worker.rs benches/hashing.rs \
      benches/codec.rs tests/worker_identity.rs \
 && cargo fetch --locked

COPY . .
RUN cargo build --release --locked --bins \
 && install -D -m 0755 target/release/kvshelf /out/kvshelf \
 && install -D -m 0755 target/release/kvshelf-worker /out/kvshelf-worker

# ---- runtime ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: `rediss://` URLs verify the server against the system CA store (rustls
# with rustls-native-certs reads /etc/ssl/certs). curl: used by the demo worker of
# docker-compose.yml (docker/demo-worker.sh) and handy for operators; the HEALTHCHECK below
# does not need it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

# A fixed, numeric, unprivileged user (Kubernetes' runAsNonRoot can check a numeric USER).
RUN groupadd --system --gid 10001 kvshelf \
 && useradd --system --uid 10001 --gid kvshelf --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kvshelf

COPY --from=builder /out/kvshelf /out/kvshelf-worker /usr/local/bin/

USER 10001:10001
EXPOSE 7070
# Plain log lines in `docker logs` (kvshelf's logger honours NO_COLOR).
ENV NO_COLOR=1

# Liveness: GET /healthz over bash's /dev/tcp, so the check needs no curl (bash is part of
# every Debian image). It does not look at Redis: an unreachable Redis makes the sidecar
# answer misses, not die, and restarting it would not help (readiness is GET /readyz).
# If you make kvshelf listen on another port, set KVSHELF_HEALTH_PORT to it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${KVSHELF_HEALTH_PORT:-7070} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["kvshelf"]
CMD ["serve", "--listen", "0.0.0.0:7070"]
