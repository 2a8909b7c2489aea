# Sourced by smoke.sh and faults.sh: sets the array `compose` to the compose command here —
# $COMPOSE if set, else the `docker compose` plugin (v2), else Debian's `docker-compose`
# (v1) — or returns 1 when there is none.
if [[ -n "${COMPOSE:-}" ]]; then
  read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  return 1
fi
