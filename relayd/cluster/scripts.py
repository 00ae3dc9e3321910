"""The cluster's Lua scripts: presence, watches, the instance registry, shared budgets.

Like the store's scripts, each touches the keys of one hash slot only (see
``keys``), so they run unchanged on a single Redis and on a Cluster.
"""

from __future__ import annotations

from ..storage.redis.scripts import Script

# KEYS: presence HASH (instance -> kind), watchers SET, this instance's HASH of addresses in the address's slot
# (queue key -> label: the address sealed with encryption at rest, else '').
# ARGV: queue key, instance, kind ('' when the instance has no session of the address left), watch ttl ms, label.
# Records (or drops) the instance's sessions of the address and watches the address for the instance. Returns
# {watchers to tell that the presence changed, presence afterwards (flat)}.
JOIN = Script("join", r"""
local ON, W, MINE = KEYS[1], KEYS[2], KEYS[3]
if ARGV[3] == '' then
  redis.call('HDEL', ON, ARGV[2])
  redis.call('HDEL', MINE, ARGV[1])
else
  redis.call('HSET', ON, ARGV[2], ARGV[3])
  redis.call('HSET', MINE, ARGV[1], ARGV[5])
end
local watchers = redis.call('SMEMBERS', W)
redis.call('DEL', W)
redis.call('SADD', W, ARGV[2])
redis.call('PEXPIRE', W, ARGV[4])
return {watchers, redis.call('HGETALL', ON)}
""")

# KEYS: presence HASH, watchers SET. ARGV: instance, watch ttl ms.
# Reads the presence and watches the address: the next change of it is told to this instance.
LOOKUP = Script("lookup", r"""
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('HGETALL', KEYS[1])
""")

# KEYS: the instance registry (ZSET instance -> last heartbeat, ms of the Redis clock).
# ARGV: instance, ttl ms, forget after ms. Returns {age of this instance's previous heartbeat in ms or '',
# live instances, lapsed instances (no heartbeat within ttl), long-lapsed instances to forget (at most 10)}.
HEARTBEAT = Script("heartbeat", r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local cut = now - tonumber(ARGV[2])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], cut, '+inf')
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cut)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[3])), 'LIMIT', 0, 10)
local age = ''
if previous then age = tostring(now - tonumber(previous)) end
return {age, live, lapsed, dead}
""")

# KEYS: the instance registry. ARGV: instance. An instance that stops cleanly leaves at once.
LEAVE_REGISTRY = Script("leave_registry", "return redis.call('ZREM', KEYS[1], ARGV[1])")

# KEYS: a dead instance's HASH of addresses in one slot, then per address its presence HASH and watchers SET.
# ARGV: the dead instance, then the queue keys (in the order of KEYS). Returns the watchers to tell (flat).
FORGET = Script("forget", r"""
local out = {}
for k = 2, #KEYS, 2 do
  redis.call('HDEL', KEYS[k], ARGV[1])
  for _, w in ipairs(redis.call('SMEMBERS', KEYS[k + 1])) do out[#out + 1] = w end
  redis.call('DEL', KEYS[k + 1])
  redis.call('HDEL', KEYS[1], ARGV[k / 2 + 1])
end
return out
""")

# KEYS: a budget SET (recipients queued for this hour). ARGV: recipient, budget, window ms.
# Returns 1 when the recipient is within the budget (and records it), 0 when the budget is spent.
SPEND = Script("spend", r"""
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local n = redis.call('SCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
if n == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
""")
