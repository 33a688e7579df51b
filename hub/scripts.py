"""Lua scripts, one per atomic step. Each takes every key through KEYS, all in one hash slot: a worker's scripts
touch that worker's keys only, the board's scripts the board's (``{idx}``), and ``COMPARE_AND_SET`` and
``RATE_LIMIT_BUCKET`` one key each. Time comes from the Redis server, so all hubs share one clock.

Worker keys, always in this order (see ``shared.keys.WorkerKeys``):
  KEYS[1] info      HASH  registration, heartbeat fields (``hb`` last sign of life, ``renewed`` last heartbeat),
                          ``drain`` flag, ``secret`` digest
  KEYS[2] leases    ZSET  session id -> lease expiry (ms); a lease counts against max_streams until it is dropped
  KEYS[3] active    HASH  session id -> confirmed-at (ms); a lease without an entry here is pending
  KEYS[4] sessions  HASH  session id -> session record (JSON)
"""

from __future__ import annotations

#: The Redis server's clock, in ms (``now``; ``t`` is TIME's seconds and microseconds).
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Shared prelude: the Redis clock, and dropping leases whose time has passed (with their records).
#
# A pending lease (never confirmed) that lapsed is dropped by the next reservation, registration or heartbeat on its
# worker, and counts for nothing meanwhile: no confirmation can take it any more (CONFIRM refuses a lapsed one), so
# its slot comes back within the lease, heartbeat or not. Until it is dropped, a heartbeat that reports its session
# adopts it (a failover may have lost the confirmation of a session a client holds). An active lease is dropped
# only once a heartbeat after its expiry has not renewed it: by the heartbeat itself, or by
# ``purge_expired(judged_up_to())`` elsewhere. One that lapsed since the worker's last heartbeat is the next
# heartbeat's to renew or drop: it may have lapsed only because no heartbeat could reach Redis (an outage longer
# than the lease). A dead worker's leases count for nothing (it is out of routing, listings skip expired leases)
# and go with its keys.
_PRELUDE = _CLOCK + """
-- Drop one lease with its confirmation and record.
local function drop_lease(sid)
  redis.call('ZREM', KEYS[2], sid)
  redis.call('HDEL', KEYS[3], sid)
  redis.call('HDEL', KEYS[4], sid)
end
-- Drop lapsed leases: pending ones up to now, active ones up to ``upto`` (<= now).
local function purge_expired(upto)
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES')
  for i = 1, #lapsed, 2 do
    if tonumber(lapsed[i + 1]) <= upto or redis.call('HEXISTS', KEYS[3], lapsed[i]) == 0 then
      drop_lease(lapsed[i])
    end
  end
end
-- The leases a reservation counts now, without dropping any: all but the pending ones that lapsed.
local function held()
  local n = redis.call('ZCARD', KEYS[2])
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
    if redis.call('HEXISTS', KEYS[3], sid) == 0 then n = n - 1 end
  end
  return n
end
-- When the worker's last heartbeat ran (its ``renewed`` field; a registration is not a heartbeat).
local function judged_up_to()
  return math.min(now, tonumber(redis.call('HGET', KEYS[1], 'renewed') or 0))
end
local function effective_state()
  local st = redis.call('HMGET', KEYS[1], 'drain', 'worker_state')
  if st[1] == '1' or st[2] == 'draining' then return 'draining' end
  return 'ready'
end
-- Whether an SRE drained the worker (1) or not (0), whatever the worker reports itself.
local function drain_requested()
  return redis.call('HGET', KEYS[1], 'drain') == '1' and 1 or 0
end
-- Keys a script creates outlive the worker no longer than its info hash does.
local function inherit_ttl()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl <= 0 then return end
  for i = 2, 4 do
    if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
local function keep(retention_ms)
  for i = 1, 4 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], retention_ms) end
  end
end
"""

REGISTER = _PRELUDE + """
-- Register or re-register a worker. Refuses to take over the id of a live worker without its secret.
-- ARGV[1] digest of the secret the caller presents ('' if none)
-- ARGV[2] digest of the new secret to store
-- ARGV[3] liveness TTL (ms)
-- ARGV[4] retention of the worker's keys after its last sign of life (ms)
-- ARGV[5] '1' when the worker says an SRE had drained it and no resume reached it ('0' otherwise): it restores the
--         drain flag only where the worker's keys are gone (Redis restarted empty); existing keys keep their own
--         flag, as an SRE's resume since then must win
-- ARGV[6..] field, value pairs of the registration (url, region, max_streams, worker_state, static, ...); they
--          come after the defaults, so a registration's own worker_state (a leaving worker's 'draining') wins
-- Returns {1, used, max_streams, state, now, drain requested (0|1)} or {-1} when a live worker holds the id with
-- another secret.
-- Safe to run twice (a client's resend after a lost reply): the new secret is random, so finding it stored means
-- this very registration already ran.
local info = redis.call('HMGET', KEYS[1], 'secret', 'hb')
if info[1] and info[2] and now - tonumber(info[2]) < tonumber(ARGV[3]) and info[1] ~= ARGV[1]
   and info[1] ~= ARGV[2] then
  return {-1}
end
local fields = {}
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then fields = {'drain', '1'} end
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'secret', ARGV[2], 'hb', now, 'registered_at', now, 'worker_state', 'ready',
           unpack(fields))
-- A worker that registers may be a new process, numbering its heartbeats from 0 again: the numbers its sessions
-- were accepted at no longer compare with its heartbeats'. They fall back to the time rule (see HEARTBEAT), which
-- holds for a restarted worker (its sessions are gone) and for one that only registered again (it reports them).
local confirmed = redis.call('HGETALL', KEYS[3])
for i = 1, #confirmed, 2 do
  local at = string.match(confirmed[i + 1], '^(%d+):')
  if at then redis.call('HSET', KEYS[3], confirmed[i], at) end
end
purge_expired(judged_up_to())
keep(tonumber(ARGV[4]))
return {1, redis.call('ZCARD', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'max_streams')), effective_state(),
        now, drain_requested()}
"""

HEARTBEAT = _PRELUDE + """
-- Record a heartbeat and reconcile the worker's leases with the sessions it really runs.
-- ARGV[1] digest of the per-worker secret presented
-- ARGV[2] lease extension for sessions the worker reports (ms)
-- ARGV[3] grace before an active session the worker no longer reports is released (ms)
-- ARGV[4] retention (ms)
-- ARGV[5] state the worker reports ('ready' | 'draining')
-- ARGV[6] heartbeat metrics (JSON, stored as is)
-- ARGV[7] the heartbeat's number ('' when the worker does not number them)
-- ARGV[8..] ids of the sessions the worker runs
-- Returns {1, used, max_streams, state, now, drain requested (0|1), registered_at, unknown ids...}, {0} for an
-- unknown worker, {-1} for a bad secret.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('HGET', KEYS[1], 'secret') ~= ARGV[1] then return {-1} end
local reported = {}
for i = 8, #ARGV do reported[ARGV[i]] = true end
local extend_to = now + tonumber(ARGV[2])
-- Renew before purging: a lease that lapsed only because no heartbeat could reach Redis (an outage longer than the
-- lease) still holds its slot and record, and the worker says it runs the session, so the session goes on.
-- A slot that any other script has reused since was purged with its record, and its session is told to stop below.
for _, sid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if reported[sid] then
    -- The worker runs it: a pending lease whose confirmation was lost is adopted here, even one that lapsed if no
    -- other script dropped it first (a failover may have lost the confirmation of a session a client holds).
    redis.call('HSETNX', KEYS[3], sid, now)
    redis.call('ZADD', KEYS[2], extend_to, sid)
    reported[sid] = nil
  else
    local confirmed = redis.call('HGET', KEYS[3], sid)
    local gone = false
    if confirmed then
      local at, accepted = string.match(confirmed, '^(%d+):?(%d*)$')
      if accepted ~= '' and ARGV[7] ~= '' then
        -- The worker numbers its heartbeats and said which was its last before it took the session: a later one
        -- without it means the session ended, however late it arrives; an earlier one proves nothing.
        gone = tonumber(ARGV[7]) > tonumber(accepted)
      else
        -- Only after a grace: this heartbeat may have left the worker before the dispatch reached it.
        gone = now - tonumber(at) > tonumber(ARGV[3])
      end
    end
    if gone then drop_lease(sid) end
  end
end
purge_expired(now)
redis.call('HSET', KEYS[1], 'hb', now, 'renewed', now, 'worker_state', ARGV[5], 'status', ARGV[6])
keep(tonumber(ARGV[4]))
local result = {1, redis.call('ZCARD', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'max_streams')),
                effective_state(), now, drain_requested(), redis.call('HGET', KEYS[1], 'registered_at') or ''}
-- Sessions the hub does not hold (never confirmed, expired or ended): the worker must stop them.
for sid, _ in pairs(reported) do result[#result + 1] = sid end
return result
"""

RESERVE = _PRELUDE + """
-- Atomically take one stream slot as a pending lease, re-checking liveness, state and capacity.
-- ARGV[1] session id
-- ARGV[2] pending lease duration (ms): the time the hub has to dispatch and confirm
-- ARGV[3] liveness TTL (ms)
-- ARGV[4] session record (JSON)
-- Returns {1, used, max_streams, url} or {0, reason, used, max_streams}. Safe to run twice: session ids are
-- random, so a lease already held under this one is this reservation's own (a client's resend).
local w = redis.call('HMGET', KEYS[1], 'hb', 'max_streams', 'url')
if not w[1] then return {0, 'unknown', 0, 0} end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {1, redis.call('ZCARD', KEYS[2]), tonumber(w[2]), w[3]}
end
if now - tonumber(w[1]) >= tonumber(ARGV[3]) then return {0, 'stale', 0, tonumber(w[2])} end
if effective_state() ~= 'ready' then return {0, 'draining', 0, tonumber(w[2])} end
purge_expired(judged_up_to())
local used = redis.call('ZCARD', KEYS[2])
if used >= tonumber(w[2]) then return {0, 'full', used, tonumber(w[2])} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
inherit_ttl()
return {1, used + 1, tonumber(w[2]), w[3]}
"""

CONFIRM = _PRELUDE + """
-- Turn a pending lease into an active one after the worker accepted the dispatch.
-- ARGV[1] session id
-- ARGV[2] active lease duration (ms), renewed by every heartbeat that reports the session
-- ARGV[3] the worker's accepted_at_seq ('' when it does not number its heartbeats)
-- Returns {1, used} or {0, used} when the pending lease is gone or has expired (the caller releases it).
-- The active hash holds '<confirmed at ms>' or '<confirmed at ms>:<accepted_at_seq>'. A heartbeat may have
-- adopted the lease first (without a number): the worker's number is added, so the numbered rule still applies.
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expiry or tonumber(expiry) <= now then return {0, redis.call('ZCARD', KEYS[2])} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local confirmed = redis.call('HGET', KEYS[3], ARGV[1])
if not confirmed then
  confirmed = tostring(now)
  redis.call('HSET', KEYS[3], ARGV[1], confirmed)
end
if ARGV[3] ~= '' and not string.find(confirmed, ':', 1, true) then
  redis.call('HSET', KEYS[3], ARGV[1], confirmed .. ':' .. ARGV[3])
end
inherit_ttl()
return {1, redis.call('ZCARD', KEYS[2])}
"""

RELEASE = _PRELUDE + """
-- Free a session's slot at once (ended by the caller, refused or unreachable at dispatch). It purges nothing else:
-- the worker's other lapsed active leases wait for its next heartbeat, which may still renew them (see HEARTBEAT).
-- KEYS[5] the session's release receipt (STRING, short-lived): '<token>|<record>'
-- ARGV[1] session id
-- ARGV[2] this release's token (random per call, no '|'; a client library that resends the call resends it)
-- ARGV[3] how long the receipt is kept (ms)
-- Returns {removed (0|1), used, the session's record or false, the worker's url or false}: ending a session needs
-- the last two, and reading them here saves a round trip. ``used`` counts every lease not yet dropped, as RESERVE
-- does, so the board believes what the next reservation will enforce. Safe to run twice: a resend finds the
-- receipt its first run left and answers what that run answered.
local record = redis.call('HGET', KEYS[4], ARGV[1])
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if removed == 1 then
  redis.call('SET', KEYS[5], ARGV[2] .. '|' .. (record or ''), 'PX', ARGV[3])
else
  local receipt = redis.call('GET', KEYS[5])
  local cut = receipt and string.find(receipt, '|', 1, true)
  if cut and string.sub(receipt, 1, cut - 1) == ARGV[2] then
    removed = 1
    record = cut < #receipt and string.sub(receipt, cut + 1) or false
  end
end
return {removed, held(), record, redis.call('HGET', KEYS[1], 'url')}
"""

READ_SESSION = _PRELUDE + """
-- One session as the hub holds it, with its worker's liveness. Read-only: a lease that lapsed while its worker
-- lives is the worker's next heartbeat's to renew or end (see HEARTBEAT); one whose worker is gone is gone.
-- ARGV[1] session id
-- ARGV[2] liveness TTL (ms)
-- Returns {record or false, 'active'|'pending'|'lapsed'|'', worker alive (0|1), worker url or false}; 'lapsed' is a
-- pending lease past its expiry, which counts for nothing (see the prelude).
local record = redis.call('HGET', KEYS[4], ARGV[1])
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not record or not expiry then return {false, '', 0, false} end
local w = redis.call('HMGET', KEYS[1], 'hb', 'url')
local alive = (w[1] and now - tonumber(w[1]) < tonumber(ARGV[2])) and 1 or 0
if tonumber(expiry) <= now and alive == 0 then return {false, '', 0, false} end
local status = 'active'
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then status = tonumber(expiry) <= now and 'lapsed' or 'pending' end
return {record, status, alive, w[2]}
"""

READ_WORKER = _PRELUDE + """
-- Everything the hub holds for one worker, with the Redis clock for heartbeat ages.
-- Returns {now, used, field, value, field, value, ...} or {now, -1} when unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return {now, -1} end
local used = held()  -- as RESERVE counts: lapsed active leases hold until a heartbeat judges them
local result = {now, used}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do result[#result + 1] = v end
return result
"""

SET_DRAIN = _PRELUDE + """
-- An SRE drains (ARGV[1] = '1') or resumes (ARGV[1] = '0') a worker.
-- KEYS[1] the worker's info hash (the prelude's other keys are not used)
-- Returns the effective state, or false when the worker is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'drain', ARGV[1])
return effective_state()
"""

DEREGISTER = _PRELUDE + """
-- Remove a worker and everything it holds.
-- ARGV[1] digest of the per-worker secret presented, or '*' for an SRE removal
-- ARGV[2] liveness TTL (ms): an SRE removal of a worker heard from within it is refused (a live worker would
--         register again at its next heartbeat, and the sessions it runs would be told to stop)
-- Returns 1, 0 when unknown, -1 for a bad secret, -2 when an SRE removal finds the worker live.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '*' and redis.call('HGET', KEYS[1], 'secret') ~= ARGV[1] then return -1 end
if ARGV[1] == '*' and now - tonumber(redis.call('HGET', KEYS[1], 'hb') or 0) < tonumber(ARGV[2]) then
  return -2
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
"""

COMPARE_AND_SET = """
-- Set a string only if it still holds the value the caller saw (session-key affinity claims).
-- KEYS[1] the key
-- ARGV[1] expected current value ('' = must be absent)
-- ARGV[2] new value ('' = delete)
-- ARGV[3] TTL of the new value (ms)
-- Returns 1 when swapped, else the current value (false when absent). Safe to run twice: finding the new value
-- already there counts as swapped (claims are random, session ids too).
local current = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and current == ARGV[2] then return 1 end
if (current or '') ~= ARGV[1] then return current end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

#: How far back a hub may read the board's change log; a hub that last read longer ago reads everything.
BOARD_DELTA_HORIZON_MS = 60_000

_BOARD_CHANGES = _CLOCK + """
-- Log a change for hubs' delta reads: '<id>' status or used, '+<id>' registration view (or removal). The log
-- reaches back twice as far as a delta read may (BOARD_DELTA_HORIZON_MS).
local function note_change(member)
  redis.call('ZADD', KEYS[4], now, member)
end
local function trim_changes()
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - """ + str(2 * BOARD_DELTA_HORIZON_MS) + """)
end
"""


PUBLISH_BOARD = _BOARD_CHANGES + """
-- Mirror a worker onto the routing board that every hub reads in one round trip.
-- KEYS[1] board static, KEYS[2] board status, KEYS[3] board used, KEYS[4] board changes, KEYS[5] board registered
-- (KEYS[6], the board's epoch, travels with the others and is not used)
-- ARGV[1] worker id, ARGV[2] registration view JSON ('' = keep), ARGV[3] status JSON ('' = keep),
-- ARGV[4] used streams ('' = keep), ARGV[5] '1' to remove the worker from the board,
-- ARGV[6] with a registration view: when that registration ran (the worker's registered_at)
-- Returns 1, or for a removal 0 when the worker was not on the board.
trim_changes()
if ARGV[5] == '1' then
  local removed = redis.call('HDEL', KEYS[1], ARGV[1])
  removed = removed + redis.call('HDEL', KEYS[2], ARGV[1]) + redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  if removed == 0 then return 0 end
  note_change('+' .. ARGV[1])
  return 1
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[6])
  note_change('+' .. ARGV[1])
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end
if ARGV[3] ~= '' or ARGV[4] ~= '' then note_change(ARGV[1]) end
return 1
"""

PUBLISH_BOARD_BATCH = _BOARD_CHANGES + """
-- Mirror a batch of workers' figures onto the routing board in one call: a batch of heartbeats (status and slot
-- count), or the slot counts a batch of session steps changed (status '': the status view is left as it is).
-- KEYS[1] board static, KEYS[2] board status, KEYS[3] board used, KEYS[4] board changes, KEYS[5] board registered
-- (KEYS[6], the board's epoch, travels with the others and is not used)
-- ARGV[4i+1] worker id, ARGV[4i+2] status JSON or '', ARGV[4i+3] used streams, ARGV[4i+4] the worker's
-- registered_at ('' = any registration: session steps), for each worker of the batch (a later one wins)
-- A worker no longer on the board (deregistered meanwhile), or whose view there is another registration's (a
-- failover lost the board's last writes, not the worker's), is skipped: a late batch brings back no ghost, and the
-- caller has the worker register again, which writes its view anew for every hub.
-- Returns the ids of the workers skipped.
local skipped = {}
for i = 1, #ARGV, 4 do
  local on_board = redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1
  if on_board and ARGV[i + 3] ~= '' then on_board = redis.call('HGET', KEYS[5], ARGV[i]) == ARGV[i + 3] end
  if on_board then
    if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
    note_change(ARGV[i])
  else
    skipped[#skipped + 1] = ARGV[i]
  end
end
trim_changes()
return skipped
"""

RATE_LIMIT_BUCKET = """
-- Per-client token bucket for session creation.
-- KEYS[1] bucket hash
-- ARGV[1] capacity (tokens), ARGV[2] refill rate (tokens/s), ARGV[3] this call's id (a resend carries the same)
-- Returns {1, 0} when allowed, {0, retry_after_ms} when not. A resend of the last call answers as it did and takes
-- nothing more (the client's resend after a lost reply must not cost it a second token).
""" + _CLOCK + """
local cap, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'call', 'answer')
if b[3] == ARGV[3] and b[4] then
  local allowed, wait = string.match(b[4], '^(%d+):(%d+)$')
  return {tonumber(allowed), tonumber(wait)}
end
local tokens, at = tonumber(b[1]) or cap, tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate / 1000)  -- a clock that went back refills nothing
local allowed, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now, 'call', ARGV[3], 'answer', allowed .. ':' .. wait)
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
return {allowed, wait}
"""

READ_BOARD = """
-- What a hub needs to route, in one round trip: everything, or only what changed since its last read.
-- Views come back as ONE JSON string each: a hub parses a string with the C json module instead of 40,000 RESP
-- items in Python (at 10,000 workers the RESP parse of HGETALL took ~30% of an idle hub's CPU every refresh).
-- KEYS[1] board static, KEYS[2] board status, KEYS[3] board used, KEYS[4] board changes (KEYS[5], the board's
-- registered hash, travels with the others and is not read), KEYS[6] board epoch
-- ARGV[1] read only the changes since this Redis time (ms; '' = everything)
-- ARGV[2] how far back (ms) a delta may reach; a caller that read longer ago gets everything
-- Returns {static JSON, status JSON, used JSON, seconds, microseconds, complete, epoch}, each view a flat
-- [id, value, ...] array: complete = 1 for whole views; 0 for a delta, where status and used list the workers
-- changed since ARGV[1], static those whose registration changed, and a value is false for a worker now gone.
-- The epoch names the board's dataset, made here when there is none (a new Redis, or one that restarted empty):
-- a caller that last read another epoch must read everything, as its delta misses removals no log recorded.
""" + _CLOCK + """
local epoch = redis.call('GET', KEYS[6])
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('SET', KEYS[6], epoch)
end
local function flat(key)
  local v = redis.call('HGETALL', key)
  if #v == 0 then return '[]' end
  return cjson.encode(v)
end
if ARGV[1] == '' or tonumber(ARGV[1]) < now - tonumber(ARGV[2]) then
  return {flat(KEYS[1]), flat(KEYS[2]), flat(KEYS[3]), t[1], t[2], 1, epoch}
end
local ids, registered, seen = {}, {}, {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[1], '+inf')) do
  local id = member
  if string.sub(member, 1, 1) == '+' then id = string.sub(member, 2); registered[#registered + 1] = id end
  if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
end
-- HMGET in chunks: unpack() of thousands of ids overflows Lua's stack.
local function pairs_of(key, list)
  local out = {}
  for first = 1, #list, 500 do
    local chunk = {unpack(list, first, math.min(first + 499, #list))}
    local values = redis.call('HMGET', key, unpack(chunk))
    for i, id in ipairs(chunk) do out[#out + 1] = id; out[#out + 1] = values[i] end
  end
  if #out == 0 then return '[]' end
  return cjson.encode(out)
end
return {pairs_of(KEYS[1], registered), pairs_of(KEYS[2], ids), pairs_of(KEYS[3], ids), t[1], t[2], 0, epoch}
"""
