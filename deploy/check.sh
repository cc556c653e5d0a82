#!/usr/bin/env bash
# deploy/check.sh: build the container images and check them end to end against a running docker daemon.
#
# usage: deploy/check.sh [--no-compose] [--help]
#
#   lint      hadolint on deploy/docker/Dockerfile, Dockerfile.cuda and deploy/compose/Dockerfile.prometheus
#   base      the local Debian bookworm base images, made with debootstrap when absent (deploy/docker/make_base.sh;
#             the rootfs tarballs are cached in ~/.cache/prunefusion-deploy, so a rerun only imports them)
#   wheels    every wheel the image installs (deploy/docker/build_wheels.sh; pip's cache makes reruns quick)
#   image     docker build --network=none of the CPU image (prunefusion:cpu) and Prometheus' image
#   pico      a pico test model (tests/pico.py, random weights, no training) in a temporary folder
#   run       docker run --network=host with deploy/docker/pico.yaml: grpc health SERVING, a Generate round trip,
#             the same greedy completion over the OpenAI-compatible HTTP API (port 56080)
#             and an embedded-Redis cache hit from the host, docker's HEALTHCHECK healthy, then `docker stop`
#             (SIGTERM): exit code 0, stopped within the drain time
#   compose   deploy/compose/docker-compose.yaml (server + Redis + Prometheus, all on the host network): SERVING,
#             the second identical greedy Generate is a cache hit through the compose Redis (its keys counted),
#             Prometheus scraped the server (target up, the cache-hit counter > 0), no Docker network created,
#             the server exits 0 on `stop`, then `down`
#
# Needs: a docker daemon (DOCKER_HOST is honoured; deploy/docker/with-dockerd.sh starts one), docker-compose
# (1.29), debootstrap and root for a missing base, hadolint (.venv/bin/hadolint, from the dev extra), .venv.
# Containers use the host network only and bind 127.0.0.1 on ports 56051-56052, 56080, 56464-56465, 56379, 56090.
# The images stay (a rerun builds from docker's cache); containers, volumes and temporary files are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=1
for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --no-compose) COMPOSE=0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

PY=.venv/bin/python
HADOLINT=${HADOLINT:-.venv/bin/hadolint}
DOCKER_COMPOSE=${DOCKER_COMPOSE:-docker-compose}
IMAGE=${PRUNEFUSION_IMAGE:-prunefusion:cpu}
BASE=prunefusion-base:bookworm
PROMETHEUS_BASE=prunefusion-prometheus-base:bookworm
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-prunefusion-prometheus:bookworm}
CONTAINER=prunefusion-check-serve
PROJECT=prunefusion-check
COMPOSE_FILE=deploy/compose/docker-compose.yaml
# deploy/docker/pico.yaml: drain_delay_seconds 1 + drain_seconds 5; a stop may take that plus this slack
DRAIN_LIMIT=9
# without buildx the docker CLI can only use the legacy builder; say so instead of a warning on every build
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
export PRUNEFUSION_IMAGE=$IMAGE PROMETHEUS_IMAGE

START=$(date +%s.%N)
TIMINGS=()
WORK=
COMPOSE_UP=0
since() { awk -v now="$(date +%s.%N)" -v t0="$1" 'BEGIN { printf "%.1f", now - t0 }'; }
summary() {
    echo "== timings"
    local line
    for line in "${TIMINGS[@]}"; do echo "   $line"; done
    echo "   total ${1:-}$(since "$START") s"
}
cleanup() {
    local rc=$?
    set +e
    docker rm -f -v "$CONTAINER" >/dev/null 2>&1
    if [ "$COMPOSE_UP" = 1 ]; then
        PRUNEFUSION_MODELS=${WORK:-/nonexistent}/models $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" \
            down -v --timeout 30 >/dev/null 2>&1
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ "$rc" != 0 ]; then summary "(failed, rc $rc) "; fi
}
trap cleanup EXIT
step() {
    local name=$1 t0
    shift
    echo "== $name"
    t0=$(date +%s.%N)
    "$@"
    TIMINGS+=("$(printf '%-8s %6s s' "$name" "$(since "$t0")")")
    echo "-- $name: $(since "$t0") s"
}

lint() {
    "$HADOLINT" --version
    local file
    for file in deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda deploy/compose/Dockerfile.prometheus; do
        "$HADOLINT" "$file"
        echo "hadolint $file: clean"
    done
}

preflight() {
    docker version --format 'docker: client {{.Client.Version}}, daemon {{.Server.Version}}' \
        || { echo "no docker daemon answers (DOCKER_HOST=${DOCKER_HOST:-unset}); deploy/docker/with-dockerd.sh" \
                  "deploy/check.sh starts one" >&2; exit 1; }
    [ "$COMPOSE" = 0 ] || $DOCKER_COMPOSE version --short
    [ -x "$PY" ] || { echo "no $PY: run scripts/setup.sh first" >&2; exit 1; }
    # a container or stack left by an interrupted run
    docker rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
    if [ "$COMPOSE" = 1 ]; then
        PRUNEFUSION_MODELS=/nonexistent $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" down -v >/dev/null 2>&1 || true
    fi
    "$PY" deploy/docker/probe.py free 56051 56052 56080 56464 56465 56379 56090
}

bases() {
    deploy/docker/make_base.sh "$BASE" python3,python3-venv,ca-certificates,tini
    [ "$COMPOSE" = 0 ] || deploy/docker/make_base.sh "$PROMETHEUS_BASE" prometheus,ca-certificates
}

images() {
    local t0
    t0=$(date +%s.%N)
    docker build --quiet --network=none --build-arg BASE="$BASE" -f deploy/docker/Dockerfile -t "$IMAGE" . \
        2> >(grep -v -e DEPRECATED -e 'BuildKit is currently disabled' -e 'environment-variable' -e '^\s*$' >&2)
    IMAGE_BUILD_S=$(since "$t0")
    IMAGE_MB=$(( $(docker image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))
    echo "image $IMAGE: ${IMAGE_MB} MB, built in ${IMAGE_BUILD_S} s"
    if [ "$COMPOSE" = 1 ]; then
        docker build --quiet --network=none --build-arg BASE="$PROMETHEUS_BASE" \
            -f deploy/compose/Dockerfile.prometheus -t "$PROMETHEUS_IMAGE" deploy/compose \
            2> >(grep -v -e DEPRECATED -e 'BuildKit is currently disabled' -e 'environment-variable' -e '^\s*$' >&2)
        echo "image $PROMETHEUS_IMAGE: $(( $(docker image inspect --format '{{.Size}}' "$PROMETHEUS_IMAGE") / 1000000 )) MB"
    fi
}

pico() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/prunefusion-check.XXXXXX")
    "$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from pico import build_pico_llama
print('pico model:', build_pico_llama(Path(sys.argv[1])))" "$WORK/models/pico"
    # the container's user (uid 1000) reads it through a read-only bind mount
    chmod -R a+rX "$WORK"
}

health_status() { docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }

wait_healthy() {
    local name=$1 deadline=$((SECONDS + 60)) status shown
    shown=$(docker inspect --format '{{.Name}}' "$name" | sed 's|^/||')
    while status=$(health_status "$name") && [ "$status" != healthy ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "FAIL: docker HEALTHCHECK of $shown is '$status' after 60 s:" >&2
            docker inspect --format '{{json .State.Health}}' "$name" >&2
            exit 1
        fi
        sleep 1
    done
    echo "docker HEALTHCHECK: $shown healthy ($(docker inspect --format '{{range .State.Health.Log}}{{.Output}}{{end}}' "$name" \
        | grep . | tail -1))"
}

# stop a container with SIGTERM (docker stop), then assert exit code 0 within the drain limit
stop_cleanly() {
    local name=$1 t0 took code shown
    shown=$(docker inspect --format '{{.Name}}' "$name" | sed 's|^/||')
    t0=$(date +%s.%N)
    docker stop -t 30 "$name" >/dev/null
    took=$(since "$t0")
    code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
    echo "docker stop $shown: exit code $code after $took s (limit $DRAIN_LIMIT s)"
    if [ "$code" != 0 ] || awk -v t="$took" -v limit="$DRAIN_LIMIT" 'BEGIN { exit !(t > limit) }'; then
        docker logs --tail 30 "$name" >&2
        echo "FAIL: $shown should drain and exit 0 within $DRAIN_LIMIT s of SIGTERM" >&2
        exit 1
    fi
}

run_image() {
    docker run -d --name "$CONTAINER" --network=host --health-interval=2s --health-start-period=60s \
        -e PRUNEFUSION_HEALTH_TARGET=127.0.0.1:56051 \
        -v "$PWD/deploy/docker/pico.yaml:/etc/prunefusion/server.yaml:ro" \
        -v "$WORK/models/pico:/var/lib/prunefusion/models/pico:ro" "$IMAGE" >/dev/null
    "$PY" deploy/docker/probe.py wait 127.0.0.1:56051 --timeout 120 --container "$CONTAINER" \
        || { docker logs --tail 40 "$CONTAINER" >&2; exit 1; }
    "$PY" deploy/docker/probe.py generate 127.0.0.1:56051 pico --expect-cache-hit
    "$PY" deploy/docker/probe.py openai http://127.0.0.1:56080 pico --grpc 127.0.0.1:56051
    wait_healthy "$CONTAINER"
    stop_cleanly "$CONTAINER"
    docker logs "$CONTAINER" 2>&1 | grep -iE 'drain|SIGTERM|stopp' | tail -3 || true
    docker rm -v "$CONTAINER" >/dev/null
}

networks() { docker network ls --format '{{.Name}}' | sort | tr '\n' ' '; }

compose() {
    local before after server code
    before=$(networks)
    export PRUNEFUSION_MODELS=$WORK/models
    COMPOSE_UP=1
    $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" up -d
    after=$(networks)
    if [ "$before" != "$after" ]; then
        echo "FAIL: docker-compose created a network: before [$before] after [$after]" >&2
        exit 1
    fi
    echo "networks unchanged: $after"
    server=$($DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" ps -q server)
    "$PY" deploy/docker/probe.py wait 127.0.0.1:56052 --timeout 120 --container "$server" \
        || { $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" logs --tail 40 >&2; exit 1; }
    "$PY" deploy/docker/probe.py generate 127.0.0.1:56052 pico --expect-cache-hit
    local keys
    keys=$($DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" exec -T redis \
        redis-cli -h 127.0.0.1 -p 56379 --scan --pattern 'prunefusion-compose:*' | grep -c . || true)
    echo "compose Redis: dbsize $($DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" exec -T redis \
        redis-cli -h 127.0.0.1 -p 56379 dbsize | tr -d '\r'), $keys keys in namespace prunefusion-compose"
    [ "$keys" -gt 0 ] || { echo "FAIL: no cache entry in the compose Redis" >&2; exit 1; }
    "$PY" deploy/docker/probe.py prometheus http://127.0.0.1:56090 --job prunefusion --timeout 60 \
        --query 'sum(prunefusion_cache_lookups_total{result="hit"})'
    wait_healthy "$server"
    $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" ps
    stop_cleanly "$server"
    $DOCKER_COMPOSE -f "$COMPOSE_FILE" -p "$PROJECT" down -v --timeout 30
    COMPOSE_UP=0
    after=$(networks)
    [ "$before" = "$after" ] || { echo "FAIL: networks after down: [$after], before: [$before]" >&2; exit 1; }
}

step preflight preflight
step lint lint
step base bases
step wheels deploy/docker/build_wheels.sh
step image images
step pico pico
step run run_image
if [ "$COMPOSE" = 1 ]; then step compose compose; fi
echo "== image $IMAGE: ${IMAGE_MB} MB, docker build ${IMAGE_BUILD_S} s"
summary
echo "deploy check: OK"
