#!/usr/bin/env bash
# make compose-e2e: the stack from nothing with docker compose, checked from the host, torn
# down. Exits 0 only when every check of .ci/stack_e2e.py held. Respects DOCKER_HOST.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/stack_lib.sh
PROJECT=pd-e2e

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
command -v "${COMPOSE[0]}" >/dev/null || die "neither 'docker compose' nor 'docker-compose' is installed"
DC=("${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml)

say "images"
images

teardown() {
    rc=$?
    if [ "$rc" != 0 ]; then
        echo "--- logs (failure) ---"
        "${DC[@]}" ps || true
        "${DC[@]}" logs --tail 60 2>&1 | tail -300 || true
    fi
    say "tear down"
    "${DC[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    exit "$rc"
}
trap teardown EXIT

say "${COMPOSE[*]} up -d --build --scale aggregator=3"
"${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${DC[@]}" up -d --build --scale aggregator=3

say "checks from the host"
PD_REDIS_URL="redis://127.0.0.1:$PD_REDIS_PORT/0" .venv/bin/python .ci/stack_e2e.py compose --project "$PROJECT"
say "compose-e2e passed"
