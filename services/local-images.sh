#!/usr/bin/env bash
# Build stand-ins for the registry images the stack uses, from Debian's packages, for a
# machine whose Docker engine cannot pull from the public image registry. With registry
# access none of this is needed: docker-compose.yml's defaults (python:3.11-slim, redis:7,
# prom/prometheus) are pulled as usual.
#
#   services/local-images.sh            build what is missing, then print the settings
#   eval "$(services/local-images.sh --env)"    ... and export them into this shell
#   services/local-images.sh --rebuild  rebuild every image (and the wheelhouse)
#
# What it makes (each step is skipped when its result already exists):
#   processdistro/debian:bookworm   debootstrap --variant=minbase from the mirror apt uses
#   processdistro/python:3.11       + Debian's python3 in a venv at /opt/python, first on
#                                   PATH: a stand-in for python:3.11-slim (`python`, `pip`)
#   processdistro/redis:7           + redis-server/redis-cli (Redis 7.0), as the redis user
#   processdistro/prometheus:2      + prometheus (2.42) and wget, as nobody, like prom/prometheus
#   services/wheelhouse/            the project's dependencies as wheels, built on the host
#                                   with `pip wheel` (containers here cannot reach the Python
#                                   package index over TLS); services/Dockerfile installs
#                                   from it with --no-index when WHEELHOUSE is set
# and prints the variables docker-compose.yml reads:
#   PD_BASE_IMAGE PD_REDIS_IMAGE PD_PROMETHEUS_IMAGE PD_WHEELHOUSE
# Needs: root (debootstrap), debootstrap, a Docker engine (DOCKER_HOST is respected), and a
# Python 3.11 on the host for the wheels (.venv/bin/python when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUITE=${PD_DEBIAN_SUITE:-bookworm}
BASE=processdistro/debian:$SUITE
PYBASE=processdistro/python:3.11
REDIS=processdistro/redis:7
PROM=processdistro/prometheus:2
WHEELHOUSE=services/wheelhouse

ENV_ONLY=0
REBUILD=0
for arg in "$@"; do
    case $arg in
        --env) ENV_ONLY=1 ;;
        --rebuild) REBUILD=1 ;;
        *) echo "usage: $0 [--env] [--rebuild]" >&2; exit 2 ;;
    esac
done

# Progress goes to stderr, so that `eval "$(... --env)"` sees only the settings.
say() { printf 'local-images: %s\n' "$*" >&2; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
have_image() { [ "$REBUILD" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror apt is configured with (deb822 sources first, then sources.list).
mirror() {
    if [ -n "${PD_DEBIAN_MIRROR:-}" ]; then echo "$PD_DEBIAN_MIRROR"; return; fi
    local m
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        /etc/apt/sources.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

build_base() {
    have_image "$BASE" && { say "$BASE exists"; return; }
    command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/pd-rootfs.XXXXXX")
    trap 'rm -rf "$dir"' RETURN
    say "debootstrap --variant=minbase $SUITE from $(mirror) ($(elapsed))"
    debootstrap --variant=minbase "$SUITE" "$dir" "$(mirror)" >"$dir.log" 2>&1 \
        || { tail -20 "$dir.log" >&2; rm -f "$dir.log"; exit 1; }
    rm -f "$dir.log"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    chmod 755 "$dir" # mktemp made it 0700: the image's / would shut out every user but root
    tar -C "$dir" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    say "$BASE imported ($(elapsed))"
}

# build TAG: a Dockerfile on stdin, no context
build() {
    local tag=$1
    have_image "$tag" && { say "$tag exists"; cat >/dev/null; return; }
    say "building $tag ($(elapsed))"
    docker build -q -t "$tag" - >/dev/null
    say "$tag built ($(elapsed))"
}

build_wheelhouse() {
    local py=python3 stamp="$WHEELHOUSE/.pyproject.sha256" want
    [ -x .venv/bin/python ] && py=.venv/bin/python
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$REBUILD" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "$WHEELHOUSE is up to date"
        return
    fi
    "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "the wheelhouse needs Python 3.11 on the host (the image runs Debian bookworm'"'"'s 3.11)")'
    say "pip wheel into $WHEELHOUSE ($(elapsed))"
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    # The dependencies and the build backend; the project itself is built inside the image
    # from the copied source, so its own wheel is dropped. Debian's Python is 3.11.2, where
    # redis also needs async-timeout (python_full_version < 3.11.3), which a newer host skips.
    "$py" -m pip wheel --quiet --disable-pip-version-check -w "$WHEELHOUSE" . 'setuptools>=77' wheel \
        'async-timeout>=4.0.3' >&2
    rm -f "$WHEELHOUSE"/processdistro-*.whl
    echo "$want" >"$stamp"
    say "$(ls "$WHEELHOUSE"/*.whl | wc -l) wheels ($(elapsed))"
}

if [ "$ENV_ONLY" = 0 ] || ! { docker image inspect "$PYBASE" "$REDIS" "$PROM" >/dev/null 2>&1 && [ -f "$WHEELHOUSE/.pyproject.sha256" ]; }; then
    build_base
    build "$PYBASE" <<DOCKERFILE
FROM $BASE
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
ENV PATH=/opt/python/bin:\$PATH LANG=C.UTF-8
CMD ["python"]
DOCKERFILE
    build "$REDIS" <<DOCKERFILE
FROM $BASE
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data /usr/local/etc/redis && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
# Like the official image without a config file: reachable from other containers.
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
    build "$PROM" <<DOCKERFILE
FROM $BASE
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
DOCKERFILE
    build_wheelhouse
    say "done ($(elapsed))"
fi

cat <<ENV
export PD_BASE_IMAGE=$PYBASE
export PD_REDIS_IMAGE=$REDIS
export PD_PROMETHEUS_IMAGE=$PROM
export PD_WHEELHOUSE=$WHEELHOUSE
ENV
