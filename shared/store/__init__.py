"""The only code that calls Redis (apart from `shared/redis_server.py`, which starts one).

- `connection`: clients with capped exponential backoff.
- `scripts`: every Lua script, KEYS and ARGV named at the top of each.
- `jobs`: job records, `JobStore.transition` (every state write), blocks, events.
- `streams`: consumer groups and the task stream reads every service shares.
"""
