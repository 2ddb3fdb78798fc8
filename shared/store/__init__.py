"""The only code that calls Redis (apart from `shared/redis_server.py`, which starts one).

One module per concern; the gateway, the only asyncio process, has its own async module.

- `connection`: clients with capped exponential backoff; `Client`, the type others name.
- `scripts`: every Lua script, KEYS and ARGV named at the top of each.
- `jobs`: job records, `JobStore.transition` (every state write), blocks, events.
- `streams`: consumer groups and the reads every service shares (live nodes, task input).
- `commands`: the scheduler's command stream and the gateways' control channel.
- `tasks`: the task stream for the scheduler (feed, requeue, backups, parked copies, reaping).
- `nodes`: node records and liveness as the scheduler reads them.
- `results`: the results stream, votes, claims, commits and reputation (aggregator).
- `gateway`: everything a gateway does on Redis (async).
- `client`: what the CLI and the Python API do (submit, cancel, list jobs and nodes).
- `liveness`: services' heartbeat keys.
"""
