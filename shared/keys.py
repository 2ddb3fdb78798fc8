"""Every Redis key and stream name. No other module spells one.

Streams
    COMMANDS  CLI, gateways, aggregators -> scheduler (`submit`, `cancel`, `fail`: the
              `shared.messages.Command` union); group SCHEDULER_GROUP
    TASKS     scheduler -> gateways; group NODES_GROUP, one consumer per WebSocket
              connection (`queue.consumer_name`), so a connection's pending entries are
              exactly the tasks its node holds, and an old connection's cleanup never
              touches a newer one's
    RESULTS   gateways -> aggregators; group AGGREGATORS_GROUP (scale aggregators freely)
    EVENTS    job events, a capped log for people looking into a run (no service reads it)

Per job: JOB hash, JOB_DONE set of merged task indexes, in JOBS (sorted by submit time)
and, until terminal, in ACTIVE_JOBS.
Per node: NODE hash, in NODES (sorted by last heartbeat).
How each per-job and per-node key goes once its job or node is gone: `JOB_KEY_ENDS`,
`NODE_KEY_ENDS` (at the end; `store/expiry.py`).
"""

from __future__ import annotations

PREFIX = "pd:"

COMMANDS = PREFIX + "commands"
SCHEDULER_GROUP = "scheduler"
TASKS = PREFIX + "tasks"
NODES_GROUP = "nodes"
RESULTS = PREFIX + "results"
AGGREGATORS_GROUP = "aggregators"
EVENTS = PREFIX + "events"
EVENTS_MAXLEN = 10_000
PARKED_CONSUMER = "parked"  # in NODES_GROUP: holds replicated copies waiting for a particular node
PARKED = PREFIX + "tasks:parked"  # set of the entry ids it holds
CONTROL = PREFIX + "control"  # pub/sub: scheduler -> gateways (cancel_job)

JOBS = PREFIX + "jobs"
ACTIVE_JOBS = PREFIX + "jobs:active"
NODES = PREFIX + "nodes"
JOIN_CODE = PREFIX + "join_code"
TOKEN_SECRET = PREFIX + "token_secret"
TOKEN_SECRET_PREVIOUS = PREFIX + "token_secret:previous"  # valid until it expires (`rotate-code`)
STATS = PREFIX + "stats"  # hash of cluster-wide counters
LATENCY = PREFIX + "latency_ms"  # list of recent task round-trip times
FINALIZE_QUEUE = "pd-finalize"  # rq queue name (rq adds its own prefix)


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_done(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:done"


def block(job_id: str, sha256: str) -> str:
    """A shared task input (bytes) of one job, addressed by its sha256. Per job, so that
    ending one job never deletes a block another job still needs."""
    return f"{PREFIX}job:{job_id}:block:{sha256}"


def job_claims(job_id: str) -> str:
    """Hash index -> result entry id that won the right to merge that index."""
    return f"{PREFIX}job:{job_id}:claims"


def job_blocks(job_id: str) -> str:
    """Set of the block hashes a job uses (deleted with the job's blocks when it ends)."""
    return f"{PREFIX}job:{job_id}:blocks"


def job_votes(job_id: str, index: int) -> str:
    """Hash voter (`core.dispatch.voter_key`: the node id, or "@" + its address) -> sha256 of
    the result it returned, for a replicated subtask (TTL 1 day)."""
    return f"{PREFIX}job:{job_id}:votes:{index}"


def job_returned(job_id: str, index: int) -> str:
    """Set of the voters (`core.dispatch.voter_key`) that handed in a result for a replicated subtask (TTL 1 day),
    written by the gateway as the result leaves it: the aggregator's votes may lag behind."""
    return f"{PREFIX}job:{job_id}:returned:{index}"


def job_decided(job_id: str, index: int) -> str:
    """Set (TTL 1 day) when no other node could confirm a replicated subtask before its one
    result reached the aggregator: that result is accepted when it comes."""
    return f"{PREFIX}job:{job_id}:decided:{index}"


def job_first_vote(job_id: str, index: int) -> str:
    """The first result of a replicated subtask, kept until a second node confirms it (TTL 1 day)."""
    return f"{PREFIX}job:{job_id}:vote:{index}"


def job_modules(job_id: str) -> str:
    """Set of the sha256 of the uploaded modules a job runs (`store.modules`): released, and
    each deleted once no job needs it, when the job ends."""
    return f"{PREFIX}job:{job_id}:modules"


def module_blob(sha256: str) -> str:
    """An uploaded WASM module's bytes, stored once whatever the number of jobs running it."""
    return f"{PREFIX}module:{sha256}"


def module_jobs(sha256: str) -> str:
    """Set of the job ids that need uploaded module `sha256`; the module goes with the last."""
    return f"{PREFIX}module:{sha256}:jobs"


def backup_marker(entry_id: str) -> str:
    """Set (with a TTL) once a backup copy of task entry `entry_id` exists."""
    return f"{PREFIX}backup:{entry_id}"


def node(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def node_merged(node_id: str) -> str:
    """List of "job:index" results a node merged (recent first), for recomputing after a ban."""
    return f"{PREFIX}merged:{node_id}"


def service_heartbeat(service: str, instance: str) -> str:
    return f"{PREFIX}service:{service}:{instance}"


def service_heartbeat_pattern(service: str) -> str:
    return f"{PREFIX}service:{service}:*"


def rate(bucket: str, who: str) -> str:
    return f"{PREFIX}rate:{bucket}:{who}"


def job_failures(job_id: str, index: int) -> str:
    """Hash node id -> its failure message, for every node that reported subtask `index`
    failing (TTL 1 day; `core.failures.judge_failure`): such a node never gets it again."""
    return f"{PREFIX}job:{job_id}:failed:{index}"


def job_drops(job_id: str, index: int) -> str:
    """Hash node id -> how often its connection dropped while holding subtask `index` (TTL 1
    day; `core.failures.judge_drops`)."""
    return f"{PREFIX}job:{job_id}:drops:{index}"


def job_tally(job_id: str) -> str:
    """Hash "<node>:ok" / "<node>:failed" -> tasks of the job each node returned or failed,
    to compare a failing node with its peers (TTL 1 day, renewed with every count)."""
    return f"{PREFIX}job:{job_id}:tally"


def node_bench(node_id: str) -> str:
    """Set, with a TTL of `Settings.bench_s`, while a node whose failures stand out gets no
    new tasks; its count of benches is the field `benches` of its `node` hash."""
    return f"{PREFIX}bench:{node_id}"


def banned_address(address: str) -> str:
    """Set (with a TTL, `PD_BAN_ADDRESS_S`) when a node from `address` was banned: new joins
    from it are refused, whatever device id they claim."""
    return f"{PREFIX}banned:address:{address}"


def job_vote_nodes(job_id: str, index: int) -> str:
    """Hash voter -> the node id whose vote it cast on a replicated subtask (TTL 1 day): votes
    are counted per voter (`core.dispatch.voter_key`), penalties go to nodes."""
    return f"{PREFIX}job:{job_id}:vote_nodes:{index}"


def job_stats(job_id: str) -> str:
    """Hash of a job's result counters for the operator's view (`verified`, `rejected`),
    written by the aggregator; it expires with the job's record."""
    return f"{PREFIX}job:{job_id}:stats"


#: Every per-job key kind (a function above taking a job id) and how it goes once the job
#: is over: "expire" (`store.expiry.job_ended` gives it a TTL), "delete" (deleted with the
#: job's blocks), "ttl" (written with a TTL). tests/hostile/test_hostile_edges.py checks it.
JOB_KEY_ENDS = {
    "job": "expire",
    "job_done": "expire",
    "block": "delete",
    "job_claims": "delete",
    "job_blocks": "delete",
    "job_modules": "delete",
    "job_votes": "ttl",
    "job_returned": "ttl",
    "job_decided": "ttl",
    "job_first_vote": "ttl",
    "job_vote_nodes": "ttl",
    "job_failures": "ttl",
    "job_drops": "ttl",
    "job_tally": "ttl",
    "job_stats": "expire",
}

#: Every per-node key kind and how it goes: "ttl" (refreshed on every sign of life,
#: `store.expiry.node_seen`).
NODE_KEY_ENDS = {"node": "ttl", "node_merged": "ttl", "node_bench": "ttl"}
