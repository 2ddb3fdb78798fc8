"""Uploaded WASM modules as data: stored once in Redis by content, kept while a job needs them.

Layout (names in `shared/keys.py`):
    module_blob(sha)   the module's bytes, stored once however many jobs run it
    module_jobs(sha)   set of the jobs that need it
    job_modules(job)   set of the modules a job needs (what `release` lets go of)

A submit adds its job to both sets and then stores the bytes if they are not there yet, in
that order, so a release racing it never deletes bytes the new job needs (`RELEASE_MODULE_LUA`
deletes the bytes only when the set of jobs is empty). `release` runs wherever a job ends:
`store.jobs.drop_blocks` calls it, and the scheduler's cancel and fail and the finalizer
call that. Every gateway serves the bytes from here (`GatewayStore.module`), so a module
survives a gateway restart and reaches nodes of any gateway.
"""

from __future__ import annotations

import hashlib

import redis

from .. import keys
from .scripts import RELEASE_MODULE_LUA


def acquire(client: redis.Redis, job_id: str, data: bytes) -> str:
    """Record that `job_id` needs the module `data` and store its bytes unless they are
    stored already; returns its sha256. Call before the job's submit command is sent."""
    sha = hashlib.sha256(data).hexdigest()
    pipe = client.pipeline(transaction=True)
    pipe.sadd(keys.module_jobs(sha), job_id)
    pipe.sadd(keys.job_modules(job_id), sha)
    pipe.exists(keys.module_blob(sha))
    *_, present = pipe.execute()
    if not present:
        # safe after the SADD: a release now sees our job in the set and keeps the bytes
        client.set(keys.module_blob(sha), data)
    return sha


def release(client: redis.Redis, job_id: str) -> list[str]:
    """The job is over: it needs its modules no more. Deletes each one no other job needs;
    returns the sha256 of those deleted. Idempotent."""
    script = client.register_script(RELEASE_MODULE_LUA)
    deleted = []
    for raw in client.smembers(keys.job_modules(job_id)):
        sha = raw.decode()
        keys_ = [keys.module_jobs(sha), keys.module_blob(sha), keys.job_modules(job_id)]
        if int(script(keys=keys_, args=[job_id, sha])):
            deleted.append(sha)
    return deleted


def stored(client: redis.Redis, sha: str) -> bool:
    """Are the bytes of module `sha` in Redis?"""
    return bool(client.exists(keys.module_blob(sha)))


def load(client: redis.Redis, sha: str) -> bytes | None:
    """The bytes of an uploaded module (None: not stored, or no job needs it any more)."""
    data = client.get(keys.module_blob(sha))
    return None if data is None else bytes(data)


def users(client: redis.Redis, sha: str) -> set[str]:
    """The jobs that need module `sha`."""
    return {j.decode() for j in client.smembers(keys.module_jobs(sha))}
