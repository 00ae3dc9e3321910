"""The Lua scripts: every multi-key change of one address is one atomic script.

Each script touches only the keys it declares, all in one hash slot (see
``layout``), so it runs unchanged on a single Redis and on a Cluster. Sequence
numbers are per address: ``max(server clock in microseconds, last + 1)``, kept
in the address's own counters. They only need to order one address's queue
(every ``Store`` call that takes a seq also names the address); being clock
based they are also distinct across addresses in practice, and they never go
backwards for one address, not even when the server clock does or a replica
with another clock takes over.

Scripts that change a slot's message or byte totals bump its ``ver`` and
return ``{messages, bytes, ver}`` of the slot, so each instance keeps exact
per-slot totals from its own writes and the newest ones from periodic reads.
Scripts that store something for an address also return the address's
presence (``instance, kind, ...`` as ``relayd.cluster`` wrote it), read in the
same atomic step, so a caller knows exactly which instances to tell.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..store import KEY_OVERHEAD_BYTES


@dataclass(frozen=True)
class Script:
    """A script's source and SHA1, for EVALSHA with an EVAL fallback on NOSCRIPT."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# KEYS (RecipientKeys.all()): 1 queue, 2 times, 3 messages, 4 ids, 5 counters, 6 receipt_queue,
# 7 receipt_times, 8 receipts, 9 expiry (slot), 10 stats (slot), 11 migrated, 12 presence, 13 watchers,
# 14 delivered, 15 history, 16 history order, 17 history until, 18 history expiry (slot).
# ARGV[1]: the address.
# History (``[history] days``) keeps a message that leaves as delivered under "lower-cased sender\nmessageId":
# "seq record", ordered by its timestamp, until a time in ms; its
# bytes count in the slot's ``bytes`` (the storage budget) but not in the address's queue counters.
# A message record is "[sender, messageId, size, timestamp, queued_at]\n" followed by the content; the ids
# index maps a messageId to [[sender as the client spelled it, seq], ...] and compares senders lower-cased.
# The delivered index holds "lower-cased sender\nmessageId" of messages that left as delivered, scored by their
# queued_at, until expiry forgets them: a resend meanwhile is answered 'delivered'.
_RECIPIENT_PRELUDE = r"""
local Q, T, M, I, N, RQ, RT, RM, EXP, STATS, MIG, ON, W, D, H, HO, HU, HEXP = unpack(KEYS)
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

local function stored_as(mid, lsender)
  local raw = redis.call('HGET', I, mid)
  if raw then
    for _, e in ipairs(cjson.decode(raw)) do
      if string.lower(e[1]) == lsender then return e[2] end
    end
  end
  return nil
end

local function delivered_id(lsender, mid) return lsender .. '\n' .. mid end

local function was_delivered(mid, lsender)
  return redis.call('ZSCORE', D, delivered_id(lsender, mid)) ~= false
end

-- Remembers a message as delivered from ``at`` (ms), or from a later time it is already remembered from.
local function remember_delivered(lsender, mid, at)
  local id = delivered_id(lsender, mid)
  local known = redis.call('ZSCORE', D, id)
  if not known or tonumber(known) < tonumber(at) then redis.call('ZADD', D, at, id) end
end

local function index(mid, sender, s)
  local raw = redis.call('HGET', I, mid)
  local list = raw and cjson.decode(raw) or {}
  list[#list + 1] = {sender, s}
  redis.call('HSET', I, mid, cjson.encode(list))
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

-- Keeps a delivered message's record in history until ``keep_to``; returns the bytes it adds (0: kept already).
local function keep(id, s, rec, size, timestamp, keep_to)
  if redis.call('HSETNX', H, id, s .. ' ' .. rec) == 0 then return 0 end
  redis.call('ZADD', HO, timestamp, id)
  redis.call('ZADD', HU, keep_to, id)
  return size
end

-- Forgets kept messages by id; returns the bytes freed.
local function unkeep(ids)
  local freed = 0
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', H, id)
    if raw then
      local rec = string.sub(raw, string.find(raw, ' ', 1, true) + 1)
      local meta = cjson.decode(string.sub(rec, 1, string.find(rec, '\n', 1, true) - 1))
      freed = freed + tonumber(meta[3])
      redis.call('HDEL', H, id)
      redis.call('ZREM', HO, id)
      redis.call('ZREM', HU, id)
    end
  end
  return freed
end

-- After history changed by ``delta`` bytes: the slot's bytes and its history expiry index.
local function settle_history(delta)
  if delta ~= 0 then
    redis.call('HINCRBY', STATS, 'bytes', delta)
    redis.call('HINCRBY', STATS, 'ver', 1)
  end
  local first = redis.call('ZRANGE', HU, 0, 0, 'WITHSCORES')
  if first[2] then redis.call('ZADD', HEXP, first[2], who) else redis.call('ZREM', HEXP, who) end
end

-- Deletes one message (remembered as delivered when ``delivered``, and kept in history until ``until`` when it
-- is not 0); returns its content size and the bytes history kept, or nil when there is no such message.
local function drop_message(s, delivered, keep_to)
  local rec = redis.call('HGET', M, s)
  if not rec then return nil, 0 end
  local meta = cjson.decode(string.sub(rec, 1, string.find(rec, '\n', 1, true) - 1))
  local queued_at = redis.call('ZSCORE', T, s)
  redis.call('HDEL', M, s)
  redis.call('ZREM', Q, s)
  redis.call('ZREM', T, s)
  unindex(meta[2], s)
  local kept = 0
  if delivered then
    remember_delivered(string.lower(meta[1]), meta[2], queued_at or fmt(meta[5]))
    if keep_to and keep_to ~= '0' then
      kept = keep(delivered_id(string.lower(meta[1]), meta[2]), s, rec, meta[3], fmt(meta[4]), keep_to)
    end
  end
  return meta[3], kept
end

local function drop_receipt(s)
  if redis.call('HDEL', RM, s) == 0 then return false end
  redis.call('ZREM', RQ, s)
  redis.call('ZREM', RT, s)
  return true
end

-- A record's last field is its time (queued_at of a message, timestamp of a receipt): replace it without
-- re-encoding the rest (cjson would round large numbers).
local function retime(rec, when)
  local cut = string.find(rec, '\n', 1, true)
  local meta, rest = rec, ''
  if cut then meta, rest = string.sub(rec, 1, cut - 1), string.sub(rec, cut) end
  return string.match(meta, '^(.*),[^,]*%]$') .. ',' .. fmt(when) .. ']' .. rest
end

-- After a change: the address's counters, its slot's statistics and retention index. ``added_at``: the change
-- only added a message queued then (nothing left T, RT or D), so the index keeps the older of it and what it had.
local function settle(c0, b0, c1, b1, receipts_delta, added_at)
  if c1 ~= c0 or b1 ~= b0 then
    if c1 > 0 then redis.call('HSET', N, 'count', c1, 'bytes', b1) else redis.call('HDEL', N, 'count', 'bytes') end
    redis.call('HINCRBY', STATS, 'messages', c1 - c0)
    redis.call('HINCRBY', STATS, 'bytes', b1 - b0)
    redis.call('HINCRBY', STATS, 'ver', 1)
    if c0 == 0 and c1 > 0 then redis.call('HINCRBY', STATS, 'recipients', 1) end
    if c0 > 0 and c1 == 0 then redis.call('HINCRBY', STATS, 'recipients', -1) end
  end
  if receipts_delta ~= 0 then redis.call('HINCRBY', STATS, 'receipts', receipts_delta) end
  if added_at then
    local known = redis.call('ZSCORE', EXP, who)
    if not known or tonumber(added_at) < tonumber(known) then redis.call('ZADD', EXP, added_at, who) end
    return
  end
  local oldest = nil
  for _, times in ipairs({T, RT, D}) do
    local first = redis.call('ZRANGE', times, 0, 0, 'WITHSCORES')
    if first[2] and (oldest == nil or tonumber(first[2]) < oldest) then oldest = tonumber(first[2]) end
  end
  if oldest == nil then
    redis.call('ZREM', EXP, who)
    redis.call('DEL', N)
  else
    redis.call('ZADD', EXP, fmt(oldest), who)
  end
end

local function slot_totals()
  return redis.call('HMGET', STATS, 'messages', 'bytes', 'ver')
end

local function presence()
  return redis.call('HGETALL', ON)
end

-- An instance that caches the presence it is about to read asks to be told when it changes.
local function watch(instance, ttl_ms)
  if instance ~= '' then
    redis.call('SADD', W, instance)
    redis.call('PEXPIRE', W, ttl_ms)
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

# Any number of messages, each to its own address (``WriteQueue.merge``): a batch is one call and one reply.
# KEYS: per message the first 14 of its address's keys (``layout.ENQUEUE_KEYS``, up to D): it never touches
# history (H, HO, HU, HEXP are not its keys).
# ARGV: max_messages, max_bytes, drop_oldest (1/0), drop chunk, ledger ttl ms, watcher instance ('' for none),
# watch ttl ms; then per message: who, sender, messageId, record, size, queued_at, over the storage budget (1/0),
# migration member ('' when not migrating).
# Returns one JSON string: an array with per message {outcome, seq, dropped, slot totals or {}, presence} (an
# empty table is {}), or {"err": message} when Redis refused one of its commands (the messages before it are
# stored, the ones after it are tried). Outcome is queued, duplicate (seq: the stored one's), delivered,
# no_space, full or migrated. One string, because redis-py reads nested replies in Python: the nested form cost
# the client about a tenth of a queued message.
ENQUEUE = Script("enqueue", _RECIPIENT_PRELUDE + r"""
local max_messages, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local drop_oldest, chunk = ARGV[3] == '1', tonumber(ARGV[4])
local ledger_ttl, watcher, watch_ttl = ARGV[5], ARGV[6], ARGV[7]

local function enqueue(k)
watch(watcher, watch_ttl)
local sender, mid, record = ARGV[k + 1], ARGV[k + 2], ARGV[k + 3]
local size, queued_at = tonumber(ARGV[k + 4]), ARGV[k + 5]
local ledger = ARGV[k + 7]
if already_migrated(ledger) then return {'migrated', '0', 0, {}, presence()} end
local stored = stored_as(mid, string.lower(sender))
if stored then return {'duplicate', stored, 0, {}, presence()} end
if was_delivered(mid, string.lower(sender)) then return {'delivered', '0', 0, {}, presence()} end
if ARGV[k + 6] == '1' then return {'no_space', '0', 0, {}, presence()} end
if size > max_bytes then return {'full', '0', 0, {}, presence()} end
local c0, b0 = counters()
local count, used, dropped = c0, b0, 0
while count > 0 and (count >= max_messages or used + size > max_bytes) do
  if not drop_oldest then return {'full', '0', 0, {}, presence()} end
  local progress = false
  for _, v in ipairs(redis.call('ZRANGE', Q, 0, chunk - 1)) do
    if not (count > 0 and (count >= max_messages or used + size > max_bytes)) then break end
    local vsize = drop_message(v, false)
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
index(mid, sender, s)
remember_migrated(ledger, ledger_ttl)
settle(c0, b0, count + 1, used + size, 0, dropped == 0 and queued_at or nil)
return {'queued', s, dropped, slot_totals(), presence()}
end

local out = {}
for n = 1, #KEYS / 14 do
  Q, T, M, I, N, RQ, RT, RM, EXP, STATS, MIG, ON, W, D = unpack(KEYS, n * 14 - 13, n * 14)
  local k = n * 8
  who = ARGV[k]
  local ok, result = pcall(enqueue, k)
  if not ok then result = {err = type(result) == 'table' and result.err or tostring(result)} end
  out[n] = result
end
return cjson.encode(out)
""")

# ARGV: who, then per message: seq ('0': a new one), sender, messageId, size, queued_at, record.
# Puts back what is not stored already (same sender, case-insensitively, and messageId), past the caps; one
# known as delivered is stored again (its delivery did not happen after all).
# Returns {restored, {seq or '0' per message}, slot totals or {}, presence}.
RESTORE = Script("restore", _RECIPIENT_PRELUDE + r"""
local c0, b0 = counters()
local count, used, restored, seqs, forgotten = c0, b0, 0, {}, 0
local last = tonumber(redis.call('HGET', N, 'last') or '0')
for k = 2, #ARGV, 6 do
  local s, sender, mid, size = ARGV[k], ARGV[k + 1], ARGV[k + 2], tonumber(ARGV[k + 3])
  if stored_as(mid, string.lower(sender)) or (s ~= '0' and redis.call('HEXISTS', M, s) == 1) then
    seqs[#seqs + 1] = '0'
  else
    if s == '0' then
      s = next_seq('last')
    elseif tonumber(s) > last then
      last = tonumber(s)
      redis.call('HSET', N, 'last', s)
    end
    redis.call('ZADD', Q, s, s)
    redis.call('ZADD', T, ARGV[k + 4], s)
    redis.call('HSET', M, s, ARGV[k + 5])
    redis.call('ZREM', D, delivered_id(string.lower(sender), mid))
    forgotten = forgotten + unkeep({delivered_id(string.lower(sender), mid)})
    index(mid, sender, s)
    count, used, restored = count + 1, used + size, restored + 1
    seqs[#seqs + 1] = s
  end
end
settle(c0, b0, count, used, 0)
if forgotten > 0 then settle_history(-forgotten) end
local totals = {}
if restored > 0 then totals = slot_totals() end
return {restored, seqs, totals, presence()}
""")

# ARGV: who, mode (seq | id: as delivered; all: not), kept until ('0': no history), then seqs or messageIds.
# Returns {removed, slot totals or {}}.
REMOVE = Script("remove", _RECIPIENT_PRELUDE + r"""
local c0, b0 = counters()
local count, used, removed, kept = c0, b0, 0, 0
local keep_to = ARGV[3]
local function take(s)
  local size, k = drop_message(s, true, keep_to)
  if size then count, used, removed, kept = count - 1, used - size, removed + 1, kept + k end
end
local mode = ARGV[2]
if mode == 'seq' then
  for k = 4, #ARGV do take(ARGV[k]) end
elseif mode == 'id' then
  for k = 4, #ARGV do
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
if removed == 0 then return {0, {}} end
settle(c0, b0, count, used, 0)
if keep_to ~= '0' then settle_history(kept) end
return {removed, slot_totals()}
""")

# ARGV: who, before (ms), limit. Removes up to limit messages, limit receipts and limit delivered records older
# than before. Returns {messages removed, receipts removed, slot totals or {}, delivered records forgotten}.
EXPIRE = Script("expire", _RECIPIENT_PRELUDE + r"""
local before, limit = '(' .. ARGV[2], tonumber(ARGV[3])
local c0, b0 = counters()
local count, used, removed, gone = c0, b0, 0, 0
for _, s in ipairs(redis.call('ZRANGEBYSCORE', T, '-inf', before, 'LIMIT', 0, limit)) do
  local size = drop_message(s, false)
  if size then count, used, removed = count - 1, used - size, removed + 1 end
end
for _, s in ipairs(redis.call('ZRANGEBYSCORE', RT, '-inf', before, 'LIMIT', 0, limit)) do
  if drop_receipt(s) then gone = gone + 1 end
end
local forgotten = redis.call('ZRANGEBYSCORE', D, '-inf', before, 'LIMIT', 0, limit)
if #forgotten > 0 then redis.call('ZREM', D, unpack(forgotten)) end
settle(c0, b0, count, used, -gone)
local totals = {}
if removed > 0 then totals = slot_totals() end
return {removed, gone, totals, #forgotten}
""")

# ARGV: who, what (m: messages, r: receipts, d: delivered records), before (ms), delta (ms), after, limit.
# Moves the time of up to limit records whose time is before ``before``: for m and r those with seq > after;
# for d the page at offset ``after`` in time order (latest first when delta > 0), which moving keeps in place.
# Returns {moved, where to go on ('' when none was left)}.
SHIFT_TIMES = Script("shift_times", _RECIPIENT_PRELUDE + r"""
local before, delta, limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
if ARGV[2] == 'd' then
  local offset = tonumber(ARGV[5])
  local page
  if delta > 0 then
    page = redis.call('ZREVRANGE', D, offset, offset + limit - 1, 'WITHSCORES')
  else
    page = redis.call('ZRANGE', D, offset, offset + limit - 1, 'WITHSCORES')
  end
  local moved = 0
  for k = 1, #page, 2 do
    local t = tonumber(page[k + 1])
    if delta ~= 0 and t < before then
      redis.call('ZADD', D, fmt(t + delta), page[k])
      moved = moved + 1
    end
  end
  if moved > 0 then
    local c0, b0 = counters()
    settle(c0, b0, c0, b0, 0)
  end
  if #page < 2 * limit then return {moved, ''} end
  return {moved, tostring(offset + limit)}
end
local order, times, records = Q, T, M
if ARGV[2] == 'r' then order, times, records = RQ, RT, RM end
local moved, last = 0, ''
for _, s in ipairs(redis.call('ZRANGEBYSCORE', order, '(' .. ARGV[5], '+inf', 'LIMIT', 0, limit)) do
  last = s
  local t = tonumber(redis.call('ZSCORE', times, s))
  local rec = redis.call('HGET', records, s)
  if t and rec and t < before then
    redis.call('ZADD', times, fmt(t + delta), s)
    redis.call('HSET', records, s, retime(rec, t + delta))
    moved = moved + 1
  end
end
if moved > 0 then
  local c0, b0 = counters()
  settle(c0, b0, c0, b0, 0)
end
return {moved, last}
""")

# ARGV: who, kept until ('0': no history), then per message: sender, messageId, queued_at, timestamp, size,
# record ('' without history). Remembers messages delivered without being stored as delivered (a copy still
# stored answers 'duplicate' first, and is remembered from the later time once it leaves as delivered), and
# keeps them in history. Returns {how many were recorded, slot totals or {}}.
RECORD_DELIVERED = Script("record_delivered", _RECIPIENT_PRELUDE + r"""
local recorded, kept, keep_to = 0, 0, ARGV[2]
for k = 3, #ARGV, 6 do
  local lsender = string.lower(ARGV[k])
  remember_delivered(lsender, ARGV[k + 1], ARGV[k + 2])
  if keep_to ~= '0' then
    kept = kept + keep(delivered_id(lsender, ARGV[k + 1]), '0', ARGV[k + 5], tonumber(ARGV[k + 4]),
                       ARGV[k + 3], keep_to)
  end
  recorded = recorded + 1
end
if recorded > 0 then
  local c0, b0 = counters()
  settle(c0, b0, c0, b0, 0)
end
if keep_to ~= '0' then settle_history(kept) end
local totals = {}
if kept > 0 then totals = slot_totals() end
return {recorded, totals}
""")

# ARGV: who, then per message: lower-cased sender, messageId, seq, record, size, timestamp, kept until (ms).
# ``relayd migrate``: keeps copied messages in history, each until its own time, unless kept already.
# Returns {how many were new, slot totals or {}}.
COPY_HISTORY = Script("copy_history", _RECIPIENT_PRELUDE + r"""
local copied, added = 0, 0
for k = 2, #ARGV, 7 do
  local id = delivered_id(ARGV[k], ARGV[k + 1])
  if redis.call('HEXISTS', H, id) == 0 then
    added = added + keep(id, ARGV[k + 2], ARGV[k + 3], tonumber(ARGV[k + 4]), ARGV[k + 5], ARGV[k + 6])
    copied = copied + 1
  end
end
settle_history(added)
local totals = {}
if added > 0 then totals = slot_totals() end
return {copied, totals}
""")

# ARGV: who, 'all' or 'id', then messageIds. Forgets the address's kept messages (all, or those with these
# messageIds from any sender). Returns {deleted, slot totals or {}}.
DELETE_HISTORY = Script("delete_history", _RECIPIENT_PRELUDE + r"""
local ids = {}
if ARGV[2] == 'all' then
  ids = redis.call('HKEYS', H)
else
  local wanted = {}
  for k = 3, #ARGV do wanted[ARGV[k]] = true end
  for _, id in ipairs(redis.call('HKEYS', H)) do
    if wanted[string.sub(id, string.find(id, '\n', 1, true) + 1)] then ids[#ids + 1] = id end
  end
end
if #ids == 0 then return {0, {}} end
settle_history(-unkeep(ids))
return {#ids, slot_totals()}
""")

# ARGV: who, now (ms), limit. Forgets up to limit kept messages whose time ran out. Returns {forgotten, slot
# totals or {}}.
EXPIRE_HISTORY = Script("expire_history", _RECIPIENT_PRELUDE + r"""
local ids = redis.call('ZRANGEBYSCORE', HU, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local freed = unkeep(ids)
settle_history(-freed)
if #ids == 0 then return {0, {}} end
return {#ids, slot_totals()}
""")

# ARGV: who, cap, migration member, ledger ttl ms, then per receipt: record "[reader, messageId, timestamp]",
# timestamp. Past ``cap`` the recipient's oldest receipts go. Returns {dropped, seq per receipt}, or {-1} when
# the migration member was copied before.
ADD_RECEIPTS = Script("add_receipts", _RECIPIENT_PRELUDE + r"""
if already_migrated(ARGV[3]) then return {-1} end
local cap = tonumber(ARGV[2])
local c0, b0 = counters()
local out = {0}
for k = 5, #ARGV, 2 do
  local s = next_seq('rlast')
  redis.call('HSET', RM, s, ARGV[k])
  redis.call('ZADD', RQ, s, s)
  redis.call('ZADD', RT, ARGV[k + 1], s)
  out[#out + 1] = s
end
local added, dropped = #out - 1, 0
local n = redis.call('ZCARD', RQ)
if n > cap then
  for _, s in ipairs(redis.call('ZRANGE', RQ, 0, n - cap - 1)) do
    if drop_receipt(s) then dropped = dropped + 1 end
  end
end
out[1] = dropped
remember_migrated(ARGV[3], ARGV[4])
settle(c0, b0, c0, b0, added - dropped)
return out
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

# KEYS: key record, slot stats, migration ledger, key floor, the slot's unsigned keys. The record's field b holds
# what it counts in the storage budget (records stored before it existed count 0, and come into the count when
# written again).
# ARGV: mode (put | migrate), created_at, migration member, ledger ttl ms, updated_at, issued_at of a signed key
# ('' when unsigned), then field/value pairs (created_at excluded). A signed key raises the floor (never lowers
# it); a migrated key never replaces one that is as new or newer.
# Returns {outcome, created_at, the change of the slot's kbytes}; outcome is stored, migrated or newer.
PUT_KEY = Script("put_key", r"""
local K, STATS, MIG, FLOOR = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, created = ARGV[1], ARGV[2]
if mode == 'migrate' and redis.call('SISMEMBER', MIG, ARGV[3]) == 1 then return {'migrated', ''} end
if ARGV[6] ~= '' then
  local floor = redis.call('GET', FLOOR)
  if not floor or tonumber(ARGV[6]) > tonumber(floor) then redis.call('SET', FLOOR, ARGV[6]) end
end
if mode == 'migrate' then
  local current = redis.call('HGET', K, 'updated_at')
  if current and tonumber(current) >= tonumber(ARGV[5]) then return {'newer', current} end
end
local old = redis.call('HGET', K, 'created_at')
local size = -tonumber(redis.call('HGET', K, 'b') or '0')
if old then created = old else redis.call('HINCRBY', STATS, 'keys', 1) end
redis.call('DEL', K)
local fields = {'created_at', created}
for k = 7, #ARGV do fields[#fields + 1] = ARGV[k] end
redis.call('HSET', K, unpack(fields))
local counted = redis.call('HSTRLEN', K, 'public_key') + redis.call('HSTRLEN', K, 'signature') + KEY_OVERHEAD
redis.call('HSET', K, 'b', counted)
size = size + counted
if size ~= 0 then redis.call('HINCRBY', STATS, 'kbytes', size) end
if redis.call('HEXISTS', K, 'signature') == 1 then
  redis.call('ZREM', KEYS[5], K)
else
  redis.call('ZADD', KEYS[5], ARGV[5], K)
end
if mode == 'migrate' then
  redis.call('SADD', MIG, ARGV[3])
  redis.call('PEXPIRE', MIG, ARGV[4])
end
return {'stored', created, size}
""".replace("KEY_OVERHEAD", str(KEY_OVERHEAD_BYTES)))

# KEYS: key floor. ARGV: issued_at. Raises the floor (``relayd migrate`` copies floors of deleted keys).
RAISE_FLOOR = Script("raise_floor", r"""
local floor = redis.call('GET', KEYS[1])
if not floor or tonumber(ARGV[1]) > tonumber(floor) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
""")

_FORGET_KEY = r"""
local function forget_key()
  local size = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
  redis.call('ZREM', KEYS[3], KEYS[1])
  if redis.call('DEL', KEYS[1]) == 0 then return {0, 0} end
  redis.call('HINCRBY', KEYS[2], 'keys', -1)
  if size > 0 then redis.call('HINCRBY', KEYS[2], 'kbytes', -size) end
  return {1, size}
end
"""

# The three scripts below return {1, what the key counted in the storage budget} when they deleted it, else {0, 0}.
# KEYS: key record, slot stats, the slot's unsigned keys. Deletes the key (its floor stays).
DELETE_KEY = Script("delete_key", _FORGET_KEY + "return forget_key()")

# KEYS: key record, slot stats, the slot's unsigned keys. Deletes the key when it is unsigned.
DROP_UNSIGNED_KEY = Script("drop_unsigned_key", _FORGET_KEY + r"""
if redis.call('HEXISTS', KEYS[1], 'signature') == 1 then return {0, 0} end
return forget_key()
""")

# KEYS: key record, slot stats, the slot's unsigned keys. ARGV: before (ms). Deletes the key when it is unsigned
# and was last uploaded or looked up before ``before``. Its entry in the index goes either way.
EXPIRE_KEY = Script("expire_key", _FORGET_KEY + r"""
local last = redis.call('ZSCORE', KEYS[3], KEYS[1])
if not last or tonumber(last) >= tonumber(ARGV[1]) then return {0, 0} end
if redis.call('HEXISTS', KEYS[1], 'signature') == 1 then
  redis.call('ZREM', KEYS[3], KEYS[1])
  return {0, 0}
end
return forget_key()
""")

# KEYS: the slot's unsigned keys. ARGV: now (ms), key record names looked up. Marks those still listed as used.
TOUCH_KEYS = Script("touch_keys", r"""
for k = 2, #ARGV do
  local last = redis.call('ZSCORE', KEYS[1], ARGV[k])
  if last and tonumber(last) < tonumber(ARGV[1]) then redis.call('ZADD', KEYS[1], ARGV[1], ARGV[k]) end
end
return 1
""")

# KEYS: lock. ARGV: locked_at. Locks are permanent; the first stamp stays.
LOCK = Script("lock", "redis.call('SET', KEYS[1], ARGV[1], 'NX') return 1")

# KEYS: the token hash's slot: HASH hash -> "address expires", ZSET hash -> expires. ARGV: hash, address, expires.
SAVE_TOKEN = Script("save_token", r"""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
""")

# KEYS: the address's ZSET hash -> expires. ARGV: hash, expires, max per address.
# Returns the hashes forgotten to stay within the cap (of the others, those expiring first; never this one).
OWN_TOKEN = Script("own_token", r"""
redis.call('ZREM', KEYS[1], ARGV[1])
local n, cap = redis.call('ZCARD', KEYS[1]), tonumber(ARGV[3]) - 1
local gone = {}
if n > cap then
  gone = redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)
  redis.call('ZREM', KEYS[1], unpack(gone))
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return gone
""")

# KEYS: a slot's token HASH and ZSET. ARGV: hashes to forget.
DROP_TOKENS = Script("drop_tokens", r"""
for k = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[k])
  redis.call('ZREM', KEYS[2], ARGV[k])
end
return 1
""")

# KEYS: a slot's token HASH and ZSET. ARGV: before (ms, inclusive), limit.
# Forgets up to limit tokens expiring at or before ``before``; returns {hash, address, ...} of each.
EXPIRE_TOKENS = Script("expire_tokens", r"""
local out = {}
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))) do
  local v = redis.call('HGET', KEYS[1], h)
  redis.call('HDEL', KEYS[1], h)
  redis.call('ZREM', KEYS[2], h)
  out[#out + 1] = h
  out[#out + 1] = v and string.match(v, '^(%S+)') or ''
end
return out
""")

# Any number of calls (``WriteQueue.merge``). KEYS: the set of slots holding data, once per call. ARGV: a slot
# number per call. Returns one JSON string: an array with 1 per call.
ADD_SLOTS = Script("add_slots", r"""
redis.call('SADD', KEYS[1], unpack(ARGV))
local out = {}
for i = 1, #ARGV do out[i] = 1 end
return cjson.encode(out)
""")

# Read only, on a single Redis (a Cluster's slots do not share one): any number of slots. KEYS: the slots'
# statistics hashes. ARGV: the fields. Returns one JSON string: an array with each hash's values of those fields
# (false for a missing one). One reply for them all: read as a pipeline of HMGETs, redis-py took 37 us of
# relayd's CPU per slot, 0.2 s for 5,000 slots at every refresh.
SLOT_STATS = Script("slot_stats", r"""
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return cjson.encode(out)
""")

# Read only, on a single Redis (a Cluster's slots do not share one): any number of per-slot indexes. KEYS: the
# indexes (sorted sets). ARGV: the highest score (a ZRANGEBYSCORE bound: "(n" leaves n out), how many members
# at most (-1: all), then each index's offset (none: 0). Returns an array per index: its members scored up to
# that, lowest first. One reply for them all (see SLOT_STATS): housekeeping reads an index of every slot.
DUE_MEMBERS = Script("due_members", r"""
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'LIMIT', ARGV[2 + i] or 0, ARGV[2])
end
return out
""")

# KEYS: this instance's probe key. ARGV: value, ttl ms. A write, so refused writes show up without traffic.
PROBE = Script("probe", "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1")

# Push subscriptions. KEYS (``Layout.push``): the address's HASH id -> record, ZSET id -> created_at, STRING
# expires_at, then the slot's stats and push expiry index (ZSET address -> expires_at). A record is
# [provider, target, p256dh, auth, bytes], bytes being what it counts in the slot's pbytes (records stored
# before it existed count 0). Nothing expires by Redis TTL: ``EXPIRE_PUSH``, run by the relay's housekeeping,
# deletes them and takes them out of pbytes, so the count stays exact.
_PUSH_PRELUDE = r"""
local R, C, X, STATS, IDX = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function counted(raw)
  if not raw then return 0 end
  return tonumber(cjson.decode(raw)[5] or 0)
end
local function keep_until(expires, who)
  redis.call('SET', X, expires)
  for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
  redis.call('ZADD', IDX, expires, who)
end
local function counts(grown)
  if grown ~= 0 then redis.call('HINCRBY', STATS, 'pbytes', grown) end
end
"""

# ARGV: id, record, created_at, max per address, expires_at, bytes, address. Past the cap the oldest others go.
# Returns {the created_at kept, the change of the slot's pbytes}.
PUT_PUSH = Script("put_push", _PUSH_PRELUDE + r"""
local created = redis.call('ZSCORE', C, ARGV[1]) or ARGV[3]
local grown = tonumber(ARGV[6]) - counted(redis.call('HGET', R, ARGV[1]))
redis.call('HSET', R, ARGV[1], ARGV[2])
redis.call('ZREM', C, ARGV[1])
local n, cap = redis.call('ZCARD', C), tonumber(ARGV[4]) - 1
if n > cap then
  local gone = redis.call('ZREVRANGE', C, cap, -1)
  for _, id in ipairs(gone) do grown = grown - counted(redis.call('HGET', R, id)) end
  redis.call('ZREM', C, unpack(gone))
  redis.call('HDEL', R, unpack(gone))
end
redis.call('ZADD', C, created, ARGV[1])
keep_until(ARGV[5], ARGV[7])
counts(grown)
return {created, grown}
""")

# ARGV: id, address. Returns {1 when it was there, what it counted}.
DELETE_PUSH = Script("delete_push", _PUSH_PRELUDE + r"""
local raw = redis.call('HGET', R, ARGV[1])
redis.call('ZREM', C, ARGV[1])
if not raw then return {0, 0} end
redis.call('HDEL', R, ARGV[1])
if redis.call('HLEN', R) == 0 then
  redis.call('DEL', C, X)
  redis.call('ZREM', IDX, ARGV[2])
end
local size = counted(raw)
counts(-size)
return {1, size}
""")

# ARGV: expires_at, address.
EXTEND_PUSH = Script("extend_push", _PUSH_PRELUDE + r"""
if redis.call('EXISTS', R) == 0 then return 0 end
keep_until(ARGV[1], ARGV[2])
return 1
""")

# ARGV: now (ms), address. Deletes every subscription of the address when they expired at ``now`` (else the
# index learns their expiry). Returns {how many went, what they counted}.
EXPIRE_PUSH = Script("expire_push", _PUSH_PRELUDE + r"""
local expires = redis.call('GET', X)
if expires and tonumber(expires) > tonumber(ARGV[1]) and redis.call('EXISTS', R) == 1 then
  redis.call('ZADD', IDX, expires, ARGV[2])
  return {0, 0}
end
local n, size = 0, 0
for _, raw in ipairs(redis.call('HVALS', R)) do
  n = n + 1
  size = size + counted(raw)
end
redis.call('DEL', R, C, X)
redis.call('ZREM', IDX, ARGV[2])
counts(-size)
return {n, size}
""")

ALL = (ENQUEUE, RESTORE, REMOVE, RECORD_DELIVERED, COPY_HISTORY, EXPIRE, SHIFT_TIMES, ADD_RECEIPTS, REMOVE_RECEIPTS,
       PUT_KEY, RAISE_FLOOR, DELETE_KEY, LOCK, SAVE_TOKEN, OWN_TOKEN, DROP_TOKENS, EXPIRE_TOKENS, ADD_SLOTS, PROBE,
       PUT_PUSH, DELETE_PUSH, EXTEND_PUSH, EXPIRE_PUSH)
