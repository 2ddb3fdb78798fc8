# Sourced by .ci/run: a Docker engine for `make test`, `make compose-e2e`, `make swarm-e2e`.
# ensure_docker_engine: when none answers (at DOCKER_HOST, else the default socket), install
# Debian's docker.io, docker-compose and debootstrap if missing and start dockerd (vfs: no
# overlay filesystem is needed); an EXIT trap stops the dockerd it started, by its PID.

ensure_docker_engine() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    if docker info >/dev/null 2>&1; then
        echo "a Docker engine answers${DOCKER_HOST:+ at $DOCKER_HOST}"
        return
    fi
    [ "$(id -u)" = 0 ] || { echo "no Docker engine answers and dockerd needs root" >&2; return 1; }
    local args=(--storage-driver=vfs --pidfile /run/pd-ci-dockerd.pid)
    if [ -n "${DOCKER_HOST:-}" ]; then
        args+=(-H "$DOCKER_HOST" --exec-root /run/pd-ci-docker-exec)
    fi
    echo "starting dockerd ${args[*]}"
    dockerd "${args[@]}" >/tmp/pd-ci-dockerd.log 2>&1 &
    PD_CI_DOCKERD=$!
    trap stop_docker_engine EXIT
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && { echo "dockerd $PD_CI_DOCKERD answers"; return; }
        sleep 1
    done
    tail -20 /tmp/pd-ci-dockerd.log >&2
    return 1
}

stop_docker_engine() {
    local rc=$?
    if [ -n "${PD_CI_DOCKERD:-}" ]; then
        [ "$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null)" = active ] && docker swarm leave --force >/dev/null 2>&1
        kill "$PD_CI_DOCKERD" 2>/dev/null && wait "$PD_CI_DOCKERD" 2>/dev/null
        echo "stopped dockerd $PD_CI_DOCKERD"
    fi
    return "$rc"
}
