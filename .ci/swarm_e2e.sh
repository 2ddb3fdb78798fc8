#!/usr/bin/env bash
# make swarm-e2e: the same job on a one-node Docker Swarm, deployed with `docker stack deploy`
# from the same docker-compose.yml (its deploy: sections), checked from the host by
# .ci/stack_e2e.py, then removed. Initialises the swarm (and leaves it afterwards) unless
# the engine is in one already. Exits 0 only when every check held. Respects DOCKER_HOST.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/stack_lib.sh
STACK=pd-e2e
# On a swarm the Redis port is published through the routing mesh on every address of the
# node, so Redis gets a password (the compose file passes it to redis-server and the services).
PD_REDIS_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
export PD_REDIS_PASSWORD
export PD_IMAGE=${PD_IMAGE:-processdistro:local}

say "images"
images
say "docker build -t $PD_IMAGE (stack deploy does not build)"
docker build -q -f services/Dockerfile -t "$PD_IMAGE" \
    --build-arg "BASE_IMAGE=${PD_BASE_IMAGE:-python:3.11-slim}" --build-arg "WHEELHOUSE=${PD_WHEELHOUSE:-}" . 2>&1 \
    | grep -v -e DEPRECATED -e buildx -e docs.docker.com -e '^ *$' || true
docker image inspect "$PD_IMAGE" >/dev/null || die "the image did not build"

left_swarm=0
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
    say "docker swarm init --advertise-addr 127.0.0.1"
    docker swarm init --advertise-addr 127.0.0.1 >/dev/null
    left_swarm=1
fi

teardown() {
    rc=$?
    if [ "$rc" != 0 ]; then
        echo "--- services and logs (failure) ---"
        docker stack ps --no-trunc "$STACK" 2>&1 | head -40 || true
        for s in redis gateway scheduler aggregator prometheus; do
            echo "--- $s"; docker service logs --tail 30 "${STACK}_$s" 2>&1 | tail -40 || true
        done
    fi
    say "tear down"
    docker stack rm "$STACK" >/dev/null 2>&1 || true
    # the stack's volumes can go once its containers are gone
    for _ in $(seq 60); do
        [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ] && break
        sleep 1
    done
    docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK" | xargs -r docker volume rm >/dev/null || true
    docker node update --label-rm processdistro.data "$(docker info --format "{{.Swarm.NodeID}}")" >/dev/null 2>&1 || true
    if [ "$left_swarm" = 1 ]; then
        docker swarm leave --force >/dev/null || true
    fi
    exit "$rc"
}
trap teardown EXIT

# The stateful services are placed on the node that holds their volumes (README, "A LAN of
# controllers"); here that is this one node.
docker node update --label-add processdistro.data=true "$(docker info --format "{{.Swarm.NodeID}}")" >/dev/null

say "docker stack deploy $STACK from docker-compose.yml (services/swarm-stack.py)"
# services/swarm-stack.py drops the keys the stack loader refuses (long-form depends_on,
# build, restart) and the "monitoring" profile (Grafana has no image without the registry).
stackfile=$(mktemp /tmp/pd-stack.XXXXXX.yml)
.venv/bin/python services/swarm-stack.py >"$stackfile"
docker stack deploy --resolve-image never -c "$stackfile" "$STACK" 2>&1 | grep -v "ignoring IP-address" || true
rm -f "$stackfile"
docker stack ps "$STACK" >/dev/null 2>&1 || die "docker stack deploy did not deploy $STACK"

say "checks from the host"
PD_REDIS_URL="redis://:$PD_REDIS_PASSWORD@127.0.0.1:$PD_REDIS_PORT/0" \
    .venv/bin/python .ci/stack_e2e.py swarm --project "$STACK"
say "swarm-e2e passed"
