"""The Lua scripts: every multi-key change of one address is one atomic script.

Each script touches only the keys it declares, all in one hash slot (see
``layout``), so it runs unchanged on a single Redis and on a Cluster. Sequence
numbers are per address: ``max(server clock in microseconds, last + 1)``, kept
in the address's own counters. They only need to order one address's queue
(every ``Store`` call that takes a seq also names the address); being clock
based they are also distinct across addresses in practice, and they never go
backwards for one address, not even when the server clock does or a replica
with another clock takes over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    """A script's source and SHA1, for EVALSHA with an EVAL fallback on NOSCRIPT."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# KEYS (RecipientKeys.all()): 1 queue, 2 times, 3 messages, 4 ids, 5 counters, 6 receipt_queue,
# 7 receipt_times, 8 receipts, 9 expiry (slot), 10 stats (slot), 11 migrated. ARGV[1]: the address.
# A message record is "[sender, messageId, size, timestamp, queued_at]\n" followed by the content.
_RECIPIENT_PRELUDE = r"""
local Q, T, M, I, N, RQ, RT, RM, EXP, STATS, MIG = unpack(KEYS)
local who = ARGV[1]

local function fmt(n) return string.format('%.0f', n) end

local function next_seq(field)
  local t = redis.call('TIME')
  local seq = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('HGET', N, field) or '0')
  if seq <= last then seq = last + 1 end
  local s = fmt(seq)
  redis.call('HSET', N, field, s)
  return s
end

local function counters()
  local v = redis.call('HMGET', N, 'count', 'bytes')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0')
end

local function unindex(mid, s)
  local raw = redis.call('HGET', I, mid)
  if not raw then return end
  local kept = {}
  for _, e in ipairs(cjson.decode(raw)) do
    if e[2] ~= s then kept[#kept + 1] = e end
  end
  if #kept == 0 then redis.call('HDEL', I, mid) else redis.call('HSET', I, mid, cjson.encode(kept)) end
end

-- Deletes one message; returns its content size, or nil when there is no such message.
local function drop_message(s)
  local rec = redis.call('HGET', M, s)
  if not rec then return nil end
  local meta = cjson.decode(string.sub(rec, 1, string.find(rec, '\n', 1, true) - 1))
  redis.call('HDEL', M, s)
  redis.call('ZREM', Q, s)
  redis.call('ZREM', T, s)
  unindex(meta[2], s)
  return meta[3]
end

local function drop_receipt(s)
  if redis.call('HDEL', RM, s) == 0 then return false end
  redis.call('ZREM', RQ, s)
  redis.call('ZREM', RT, s)
  return true
end

-- After a change: the address's counters, its slot's statistics and retention index.
local function settle(c0, b0, c1, b1, receipts_delta)
  if c1 ~= c0 or b1 ~= b0 then
    if c1 > 0 then redis.call('HSET', N, 'count', c1, 'bytes', b1) else redis.call('HDEL', N, 'count', 'bytes') end
    redis.call('HINCRBY', STATS, 'messages', c1 - c0)
    redis.call('HINCRBY', STATS, 'bytes', b1 - b0)
    if c0 == 0 and c1 > 0 then redis.call('HINCRBY', STATS, 'recipients', 1) end
    if c0 > 0 and c1 == 0 then redis.call('HINCRBY', STATS, 'recipients', -1) end
  end
  if receipts_delta ~= 0 then redis.call('HINCRBY', STATS, 'receipts', receipts_delta) end
  local a = redis.call('ZRANGE', T, 0, 0, 'WITHSCORES')
  local b = redis.call('ZRANGE', RT, 0, 0, 'WITHSCORES')
  local oldest = a[2] and tonumber(a[2]) or nil
  if b[2] and (oldest == nil or tonumber(b[2]) < oldest) then oldest = tonumber(b[2]) end
  if oldest == nil then
    redis.call('ZREM', EXP, who)
    redis.call('DEL', N)
  else
    redis.call('ZADD', EXP, fmt(oldest), who)
  end
end

local function already_migrated(member)
  return member ~= '' and redis.call('SISMEMBER', MIG, member) == 1
end

local function remember_migrated(member, ttl_ms)
  if member ~= '' then
    redis.call('SADD', MIG, member)
    redis.call('PEXPIRE', MIG, ttl_ms)
  end
end
"""

# ARGV: who, sender, messageId, record, size, queued_at, max_messages, max_bytes, drop_oldest (1/0),
# drop chunk, migration member ('' when not migrating), migration ledger ttl ms.
# Returns {outcome, seq, dropped}; outcome is queued, duplicate, full or migrated.
ENQUEUE = Script("enqueue", _RECIPIENT_PRELUDE + r"""
local sender, mid, record = ARGV[2], ARGV[3], ARGV[4]
local size, queued_at = tonumber(ARGV[5]), ARGV[6]
local max_messages, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local drop_oldest, chunk = ARGV[9] == '1', tonumber(ARGV[10])
if already_migrated(ARGV[11]) then return {'migrated', '0', 0} end
local raw = redis.call('HGET', I, mid)
if raw then
  for _, e in ipairs(cjson.decode(raw)) do
    if e[1] == sender then return {'duplicate', '0', 0} end
  end
end
if size > max_bytes then return {'full', '0', 0} end
local c0, b0 = counters()
local count, used, dropped = c0, b0, 0
while count > 0 and (count >= max_messages or used + size > max_bytes) do
  if not drop_oldest then return {'full', '0', 0} end
  local progress = false
  for _, v in ipairs(redis.call('ZRANGE', Q, 0, chunk - 1)) do
    if not (count > 0 and (count >= max_messages or used + size > max_bytes)) then break end
    local vsize = drop_message(v)
    if vsize then
      count, used, dropped, progress = count - 1, used - vsize, dropped + 1, true
    end
  end
  if not progress then break end
end
local s = next_seq('last')
redis.call('ZADD', Q, s, s)
redis.call('ZADD', T, queued_at, s)
redis.call('HSET', M, s, record)
raw = redis.call('HGET', I, mid)
local list = raw and cjson.decode(raw) or {}
list[#list + 1] = {sender, s}
redis.call('HSET', I, mid, cjson.encode(list))
remember_migrated(ARGV[11], ARGV[12])
settle(c0, b0, count + 1, used + size, 0)
return {'queued', s, dropped}
""")

# ARGV: who, mode (seq | id | all), then seqs or messageIds. Returns the number of messages removed.
REMOVE = Script("remove", _RECIPIENT_PRELUDE + r"""
local c0, b0 = counters()
local count, used, removed = c0, b0, 0
local function take(s)
  local size = drop_message(s)
  if size then count, used, removed = count - 1, used - size, removed + 1 end
end
local mode = ARGV[2]
if mode == 'seq' then
  for k = 3, #ARGV do take(ARGV[k]) end
elseif mode == 'id' then
  for k = 3, #ARGV do
    local raw = redis.call('HGET', I, ARGV[k])
    if raw then
      for _, e in ipairs(cjson.decode(raw)) do take(e[2]) end
    end
  end
elseif mode == 'all' then
  removed = redis.call('ZCARD', Q)
  redis.call('UNLINK', Q, T, M, I)
  count, used = 0, 0
end
settle(c0, b0, count, used, 0)
return removed
""")

# ARGV: who, before (ms), limit. Removes up to limit messages and limit receipts older than before.
# Returns {messages removed, receipts removed}.
EXPIRE = Script("expire", _RECIPIENT_PRELUDE + r"""
local before, limit = '(' .. ARGV[2], tonumber(ARGV[3])
local c0, b0 = counters()
local count, used, removed, gone = c0, b0, 0, 0
for _, s in ipairs(redis.call('ZRANGEBYSCORE', T, '-inf', before, 'LIMIT', 0, limit)) do
  local size = drop_message(s)
  if size then count, used, removed = count - 1, used - size, removed + 1 end
end
for _, s in ipairs(redis.call('ZRANGEBYSCORE', RT, '-inf', before, 'LIMIT', 0, limit)) do
  if drop_receipt(s) then gone = gone + 1 end
end
settle(c0, b0, count, used, -gone)
return {removed, gone}
""")

# ARGV: who, record "[reader, messageId, timestamp]", timestamp, migration member, ledger ttl ms.
# Returns the receipt's seq, or '' when it was migrated before.
ADD_RECEIPT = Script("add_receipt", _RECIPIENT_PRELUDE + r"""
if already_migrated(ARGV[4]) then return '' end
local c0, b0 = counters()
local s = next_seq('rlast')
redis.call('HSET', RM, s, ARGV[2])
redis.call('ZADD', RQ, s, s)
redis.call('ZADD', RT, ARGV[3], s)
remember_migrated(ARGV[4], ARGV[5])
settle(c0, b0, c0, b0, 1)
return s
""")

# ARGV: who, seqs... Returns the number of receipts removed.
REMOVE_RECEIPTS = Script("remove_receipts", _RECIPIENT_PRELUDE + r"""
local c0, b0 = counters()
local gone = 0
for k = 2, #ARGV do
  if drop_receipt(ARGV[k]) then gone = gone + 1 end
end
if gone > 0 then settle(c0, b0, c0, b0, -gone) end
return gone
""")

# KEYS: key record, slot stats, migration ledger.
# ARGV: mode (put | migrate), created_at, migration member, ledger ttl ms, updated_at, then field/value pairs
# (created_at excluded). A migrated key never replaces one that is as new or newer.
# Returns {outcome, created_at}; outcome is stored, migrated or newer.
PUT_KEY = Script("put_key", r"""
local K, STATS, MIG = KEYS[1], KEYS[2], KEYS[3]
local mode, created = ARGV[1], ARGV[2]
if mode == 'migrate' then
  if redis.call('SISMEMBER', MIG, ARGV[3]) == 1 then return {'migrated', ''} end
  local current = redis.call('HGET', K, 'updated_at')
  if current and tonumber(current) >= tonumber(ARGV[5]) then return {'newer', current} end
end
local old = redis.call('HGET', K, 'created_at')
if old then created = old else redis.call('HINCRBY', STATS, 'keys', 1) end
redis.call('DEL', K)
local fields = {'created_at', created}
for k = 6, #ARGV do fields[#fields + 1] = ARGV[k] end
redis.call('HSET', K, unpack(fields))
if mode == 'migrate' then
  redis.call('SADD', MIG, ARGV[3])
  redis.call('PEXPIRE', MIG, ARGV[4])
end
return {'stored', created}
""")

# KEYS: key record, slot stats. Returns 1 when a key was deleted.
DELETE_KEY = Script("delete_key", r"""
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'keys', -1)
  return 1
end
return 0
""")

# KEYS: lock. ARGV: locked_at. Locks are permanent; the first stamp stays.
LOCK = Script("lock", "redis.call('SET', KEYS[1], ARGV[1], 'NX') return 1")

# KEYS: the set of slots holding data. ARGV: slot numbers.
ADD_SLOTS = Script("add_slots", "return redis.call('SADD', KEYS[1], unpack(ARGV))")

# KEYS: this instance's probe key. ARGV: value, ttl ms. A write, so refused writes show up without traffic.
PROBE = Script("probe", "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1")

ALL = (ENQUEUE, REMOVE, EXPIRE, ADD_RECEIPT, REMOVE_RECEIPTS, PUT_KEY, DELETE_KEY, LOCK, ADD_SLOTS, PROBE)
