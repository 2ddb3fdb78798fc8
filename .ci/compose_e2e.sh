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

# the gateway serves outputs to the operator (docker-compose.yml: PD_OPERATOR_TOKEN)
PD_OPERATOR_TOKEN=$(.venv/bin/python -c "import secrets; print(secrets.token_hex(24))")
export PD_OPERATOR_TOKEN
REDIS_URL="redis://127.0.0.1:$PD_REDIS_PORT/0"
GATEWAY_URL="http://127.0.0.1:$PD_GATEWAY_PORT"

say "${COMPOSE[*]} up -d --build --scale aggregator=3"
"${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${DC[@]}" up -d --build --scale aggregator=3

say "checks from the host"
PD_REDIS_URL="$REDIS_URL" .venv/bin/python .ci/stack_e2e.py compose --project "$PROJECT"

say "an output over HTTP with the operator's token (the data volume is not on the host)"
read -r JOB RAW < <(PD_REDIS_URL="$REDIS_URL" .venv/bin/python -c "
import json, os
from processdistro.shared import keys
from processdistro.shared.store.connection import plain_client
r = plain_client(os.environ['PD_REDIS_URL'])
job = r.zrevrange(keys.JOBS, 0, 0)[0].decode()
print(job, json.loads(r.hget(keys.job(job), 'outputs'))['raw'])
")
FETCHED=$(mktemp -d)
CLI_ENV=(env -u PD_HOME PD_HOME="$FETCHED/home" PD_REDIS_URL="$REDIS_URL" PD_GATEWAY_URL="$GATEWAY_URL")
"${CLI_ENV[@]}" .venv/bin/processdistro result "$JOB" --role raw -o "$FETCHED/raw.npy" --token "$PD_OPERATOR_TOKEN"
want=$("${DC[@]}" exec -T gateway sha256sum "$RAW" | cut -d' ' -f1)
got=$(sha256sum "$FETCHED/raw.npy" | cut -d' ' -f1)
[ "$want" = "$got" ] || die "the output fetched over HTTP ($got) is not the volume's ($want)"
if "${CLI_ENV[@]}" PD_OPERATOR_TOKEN= .venv/bin/processdistro result "$JOB" --role raw -o "$FETCHED/no.npy" 2>/dev/null; then
    die "an output was served without the operator's token"
fi
rm -rf "$FETCHED"
say "compose-e2e passed"
