# Shared by .ci/compose_e2e.sh and .ci/swarm_e2e.sh (sourced, from the repository root).
# Respects DOCKER_HOST; PD_GATEWAY_PORT, PD_REDIS_PORT, PD_PROMETHEUS_PORT move the host ports.

t0=$(date +%s)
say() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - t0 ))"; }
die() { printf '%s: FAIL: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers${DOCKER_HOST:+ at $DOCKER_HOST} (.ci/run starts one)"

# Registry images when the engine has them or can pull them; else stand-ins built from
# Debian's packages (services/local-images.sh), which also sets the build's wheelhouse.
images() {
    if [ "${PD_LOCAL_IMAGES:-auto}" != 1 ] && {
        docker image inspect redis:7 python:3.11-slim prom/prometheus:v2.53.0 >/dev/null 2>&1 ||
            { timeout 300 docker pull -q redis:7 >/dev/null 2>&1 &&
              timeout 600 docker pull -q python:3.11-slim >/dev/null 2>&1 &&
              timeout 300 docker pull -q prom/prometheus:v2.53.0 >/dev/null 2>&1; }
    }; then
        echo "registry images: python:3.11-slim, redis:7, prom/prometheus:v2.53.0"
    else
        [ "${PD_LOCAL_IMAGES:-auto}" = 0 ] && die "the registry's images cannot be had and PD_LOCAL_IMAGES=0"
        echo "the registry cannot be reached: images from Debian's packages (services/local-images.sh)"
        eval "$(bash services/local-images.sh --env)"
    fi
}

export PD_GATEWAY_PORT=${PD_GATEWAY_PORT:-30000}
export PD_REDIS_PORT=${PD_REDIS_PORT:-6379}
export PD_PROMETHEUS_PORT=${PD_PROMETHEUS_PORT:-9090}
for port in "$PD_GATEWAY_PORT" "$PD_REDIS_PORT" "$PD_PROMETHEUS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is taken on this host (set PD_GATEWAY_PORT/PD_REDIS_PORT/PD_PROMETHEUS_PORT)"
    fi
done
