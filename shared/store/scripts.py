"""Every Lua script ProcessDistro runs, each naming its KEYS and ARGV at the top.

A script is what must happen atomically: a task entry leaving the stream with its result,
a requeue that two processes may race, the first result claiming an index, a job's state
changing. Every change of a job's state goes through the one Lua function `MOVE_FN`, which
is a compare-and-set against the table `jobs.TRANSITIONS`: `TRANSITION_LUA` calls it for a
single move, and `COMMIT_LUA`/`EARLY_LUA` call it inside their larger steps.
"""

from __future__ import annotations

from ..jobs import TERMINAL, JobState, allowed

assert allowed(JobState.RUNNING, JobState.FINALIZING)  # what COMMIT_LUA and EARLY_LUA do

_TERMINAL_LUA = ", ".join(f"['{s.value}'] = true" for s in sorted(TERMINAL))

# move(job_key, active_key, job_id, to, from_csv) -> true if the job was in one of the
# states of `from_csv` and is now `to`. A terminal state leaves `keys.ACTIVE_JOBS` (and the
# one move out of one, a retry, lists the job again);
# `done` counts `finalized` (a job is finalized once: tests read the count).
MOVE_FN = f"""
local TERMINAL = {{{_TERMINAL_LUA}}}
local function move(job_key, active_key, job_id, to, from_csv)
  local state = redis.call('HGET', job_key, 'state')
  if not state then return false end
  local ok = false
  for s in string.gmatch(from_csv, '[^,]+') do
    if s == state then ok = true end
  end
  if not ok then return false end
  redis.call('HSET', job_key, 'state', to)
  if TERMINAL[to] then redis.call('ZREM', active_key, job_id) end
  if TERMINAL[state] and not TERMINAL[to] then  -- a retry: listed again, as `JobStore.create` lists it
    local priority = tonumber(redis.call('HGET', job_key, 'priority') or '0') or 0
    local created = tonumber(redis.call('HGET', job_key, 'created') or '0') or 0
    redis.call('ZADD', active_key, -priority * 1e10 + created, job_id)
  end
  if to == 'done' then redis.call('HINCRBY', job_key, 'finalized', 1) end
  return true
end
"""

TRANSITION_LUA = (
    MOVE_FN
    + """
local job_key, active_key = KEYS[1], KEYS[2]
local job_id, to, from_csv = ARGV[1], ARGV[2], ARGV[3]
-- ARGV[4..]: field, value pairs written with the move (error, finished, outputs...)
if not move(job_key, active_key, job_id, to, from_csv) then return 0 end
if #ARGV >= 5 then redis.call('HSET', job_key, unpack(ARGV, 4)) end
return 1
"""
)

# Requeue entries: ACK wins once, so two processes racing to requeue the same entry
# (a gateway on socket close, the scheduler's reaper) add only one copy.
REQUEUE_LUA = """
local tasks = KEYS[1]
local group, bump = ARGV[1], tonumber(ARGV[2])
-- bump 1: the copy counts one more attempt; 0: a task given back unstarted
-- ARGV[3..]: the entry ids
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('XACK', tasks, group, id) == 1 then
    local e = redis.call('XRANGE', tasks, id, id)
    if #e > 0 then
      local f = e[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'attempt' then f[j + 1] = tostring(tonumber(f[j + 1]) + bump) end
      end
      redis.call('XADD', tasks, '*', unpack(f))
      n = n + 1
    end
    redis.call('XDEL', tasks, id)
  end
end
return n
"""

# Hand a result over: add it to the results stream and drop the task entry, in one step.
# The set `returned` (`keys.job_returned`) names the nodes whose result for a replicated
# subtask is on its way: never marked unless the result is in.
HANDOVER_LUA = """
local tasks, results, returned = KEYS[1], KEYS[2], KEYS[3]
local group, entry, node, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- node: '' to mark nobody; ARGV[5..]: the result entry's field, value pairs
redis.call('XADD', results, '*', unpack(ARGV, 5))
redis.call('XACK', tasks, group, entry)
redis.call('XDEL', tasks, entry)
if node ~= '' then
  redis.call('SADD', returned, node)
  redis.call('EXPIRE', returned, ttl)
end
return 1
"""

# Hand several results of one node over in one call: for each, what HANDOVER_LUA does.
HANDOVER_MANY_LUA = """
local tasks, results = KEYS[1], KEYS[2]
-- KEYS[2 + i]: the returned set (`keys.job_returned`) of the i-th result's subtask
local group, ttl = ARGV[1], ARGV[2]
-- then per result: task entry id, voter to mark ('' for nobody), the number n of field and
-- value strings of its result entry, and those n strings
local a = 3
for i = 3, #KEYS do
  local entry, marker, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('XADD', results, '*', unpack(ARGV, a + 3, a + 2 + n))
  redis.call('XACK', tasks, group, entry)
  redis.call('XDEL', tasks, entry)
  if marker ~= '' then
    redis.call('SADD', KEYS[i], marker)
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  a = a + 3 + n
end
return #KEYS - 2
"""

# Record a merged result: first valid result per index wins; the job moves to
# `finalizing` exactly once, when the last index is merged.
COMMIT_LUA = (
    MOVE_FN
    + """
local job_key, done_set, results, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, entry, index, job_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local added = redis.call('SADD', done_set, index)
redis.call('XACK', results, group, entry)
redis.call('XDEL', results, entry)
if added == 0 then
  redis.call('HINCRBY', stats, 'tasks_duplicate', 1)
  return 'duplicate'
end
redis.call('HINCRBY', stats, 'tasks_completed', 1)
local done = redis.call('HINCRBY', job_key, 'done', 1)
local total = tonumber(redis.call('HGET', job_key, 'total'))
if total and done >= total and move(job_key, nil, job_id, 'finalizing', 'running') then
  return 'finalize'
end
return 'merged'
"""
)

# A job that knows its answer early (a crack hit): running -> finalizing.
EARLY_LUA = (
    MOVE_FN
    + """
local job_key = KEYS[1]
local job_id = ARGV[1]
if move(job_key, nil, job_id, 'finalizing', 'running') then return 1 end
return 0
"""
)

# Take a merged index back (its node was banned): it is computed again and merged anew.
UNMERGE_LUA = """
local job_key, done_set, claims = KEYS[1], KEYS[2], KEYS[3]
local index = ARGV[1]
if redis.call('HGET', job_key, 'state') ~= 'running' then return 0 end
if redis.call('SREM', done_set, index) == 0 then return 0 end
redis.call('HDEL', claims, index)
redis.call('HINCRBY', job_key, 'done', -1)
return 1
"""

# The first valid result for an index claims it (by its result entry id); a claim by the
# same entry (redelivered after a crash) still counts as ours.
CLAIM_LUA = """
local claims = KEYS[1]
local index, entry = ARGV[1], ARGV[2]
local owner = redis.call('HGET', claims, index)
if not owner then
  redis.call('HSET', claims, index, entry)
  return 1
end
if owner == entry then return 1 end
return 0
"""

# One node's vote on a replicated subtask: node -> sha256 of its result. Returns
# {1 if the node had not voted yet, number of votes, votes equal to this one}.
VOTE_LUA = """
local votes = KEYS[1]
local node, digest, ttl = ARGV[1], ARGV[2], ARGV[3]
local fresh = redis.call('HSET', votes, node, digest)
redis.call('EXPIRE', votes, ttl)
local all = redis.call('HVALS', votes)
local same = 0
for i = 1, #all do
  if all[i] == digest then same = same + 1 end
end
return {fresh, #all, same}
"""

# CLAIM_LUA for a batch of results, in order (a later result for an index claimed earlier
# in the batch loses). KEYS[i]: the claims hash of result i's job; ARGV[2i-1], ARGV[2i]:
# its index and result entry id. Returns one 1 (ours) or 0 per result.
CLAIM_MANY_LUA = """
local out = {}
for i = 1, #KEYS do
  local index, entry = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HSETNX', KEYS[i], index, entry) == 1 or redis.call('HGET', KEYS[i], index) == entry then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# COMMIT_LUA for a batch of merged results: each index joins its job's done set, every
# entry is ACKed and deleted (one XACK, one XDEL), the counters move once per job, and a
# job whose last index is in moves to `finalizing` exactly once (on its last result here).
# KEYS[1] results, KEYS[2] stats, then per result its job's record and done set;
# ARGV[1] the group, then per result: job id, index, entry id.
# Returns per result 'merged', 'duplicate' or 'finalize'.
COMMIT_MANY_LUA = (
    MOVE_FN
    + """
local results, stats, group = KEYS[1], KEYS[2], ARGV[1]
local n = (#KEYS - 2) / 2
local out, ids, added, last, order = {}, {}, {}, {}, {}
local completed, duplicate = 0, 0
for i = 1, n do
  local job_key, done_set = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local job_id, index, entry = ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  ids[i] = entry
  if redis.call('SADD', done_set, index) == 1 then
    completed = completed + 1
    out[i] = 'merged'
    if not added[job_id] then
      added[job_id] = 0
      order[#order + 1] = {job_id, job_key}
    end
    added[job_id] = added[job_id] + 1
    last[job_id] = i
  else
    duplicate = duplicate + 1
    out[i] = 'duplicate'
  end
end
if n > 0 then
  redis.call('XACK', results, group, unpack(ids))
  redis.call('XDEL', results, unpack(ids))
end
if completed > 0 then redis.call('HINCRBY', stats, 'tasks_completed', completed) end
if duplicate > 0 then redis.call('HINCRBY', stats, 'tasks_duplicate', duplicate) end
for _, jk in ipairs(order) do
  local job_id, job_key = jk[1], jk[2]
  local done = redis.call('HINCRBY', job_key, 'done', added[job_id])
  local total = tonumber(redis.call('HGET', job_key, 'total'))
  if total and done >= total and move(job_key, nil, job_id, 'finalizing', 'running') then
    out[last[job_id]] = 'finalize'
  end
end
return out
"""
)

# A job no longer needs an uploaded module: forget it, and delete the module if no other job
# needs it. One script, so a submit that adds its job to the set (in a transaction) either
# comes first and keeps the module, or after and stores it again.
RELEASE_MODULE_LUA = """
local users_key = KEYS[1]      -- keys.module_jobs(sha)
local blob_key = KEYS[2]       -- keys.module_blob(sha)
local job_modules_key = KEYS[3]  -- keys.job_modules(job)
local job_id = ARGV[1]
local sha = ARGV[2]
redis.call('SREM', users_key, job_id)
redis.call('SREM', job_modules_key, sha)
if redis.call('SCARD', users_key) == 0 then
  redis.call('DEL', blob_key)
  return 1
end
return 0
"""
