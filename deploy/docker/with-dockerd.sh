#!/usr/bin/env bash
# Run a command against a docker daemon: the one that answers (DOCKER_HOST, or the default socket), else one this
# script starts for the command and stops afterwards (CI on a fresh machine). The daemon it starts makes no bridge
# and touches no iptables (containers use --network=host only), with its data under a temporary directory.
#   deploy/docker/with-dockerd.sh deploy/check.sh
# Needs root to start a daemon (dockerd from Debian's docker.io).
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ))
fi
if docker version >/dev/null 2>&1; then
    exec "$@"
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/prunefusion-dockerd.XXXXXX")
export DOCKER_HOST="unix://$root/docker.sock"
dockerd --bridge=none --iptables=false --ip6tables=false --data-root "$root/data" --exec-root "$root/exec" \
    --pidfile "$root/docker.pid" -H "$DOCKER_HOST" >"$root/dockerd.log" 2>&1 &
pid=$!
stop() {
    local rc=$?
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$root" 2>/dev/null || true
    exit "$rc"
}
trap stop EXIT
for _ in $(seq 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$root/dockerd.log" >&2; exit 1; }
    sleep 0.5
done
docker version --format "dockerd started for this command: {{.Server.Version}} on $DOCKER_HOST" \
    || { tail -20 "$root/dockerd.log" >&2; exit 1; }
"$@"
