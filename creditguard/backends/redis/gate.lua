-- The scripts of one account's gate and holds in Redis (creditguard/_redis_gate.py loads
-- them). Sections start with a line "--@ <name>"; "_now" precedes every script.

--@ _now
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(n) return string.format('%d', n) end
-- How long idle keys outlive the latest expiry they hold (as in _redis_state.lua).
local IDLE_MS = 3600000
-- Expire ``keys`` IDLE_MS after the latest score of the sorted sets ``sets`` (or now).
local function touch(keys, sets)
  local until_ms = now
  for _, key in ipairs(sets) do
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if last[2] and tonumber(last[2]) > until_ms then until_ms = tonumber(last[2]) end
  end
  for _, key in ipairs(keys) do redis.call('PEXPIREAT', key, fmt(until_ms + IDLE_MS)) end
end

--@ enter
-- KEYS: gate, queue, alive, ticket. ARGV: token, limit, lease_ms, alive_ms.
-- 0: the turn is the caller's (taken now, or before); else the caller waits in the
-- queue, and the answer is its ticket (the lower, the sooner its turn).
local gate, queue, alive = KEYS[1], KEYS[2], KEYS[3]
local token, limit = ARGV[1], tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', gate, '-inf', fmt(now))
local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', fmt(now), 'LIMIT', 0, 100)
for _, d in ipairs(dead) do
  redis.call('ZREM', queue, d)
  redis.call('ZREM', alive, d)
end
if redis.call('ZSCORE', gate, token) then return 0 end
local ticket = redis.call('ZSCORE', queue, token)
if not ticket then
  ticket = redis.call('INCR', KEYS[4])
  redis.call('ZADD', queue, fmt(ticket), token)
end
local free = limit - redis.call('ZCARD', gate)
local answer = tonumber(ticket)
if free > 0 and redis.call('ZRANK', queue, token) < free then
  redis.call('ZREM', queue, token)
  redis.call('ZREM', alive, token)
  redis.call('ZADD', gate, fmt(now + tonumber(ARGV[3])), token)
  answer = 0
else
  redis.call('ZADD', alive, fmt(now + tonumber(ARGV[4])), token)
end
touch({gate, queue, alive, KEYS[4]}, {gate, alive})
return answer

--@ leave
-- KEYS: gate, queue, alive. ARGV: token. Give the turn back, or leave the queue.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1

--@ renew_turns
-- KEYS: gate, queue, alive, ticket. ARGV: lease_ms, tokens... Renew the turns of this
-- process, never shortening one (a hold's turn lives as long as the hold); a turn Redis
-- lost (a restart, a flush, an eviction) is taken again. The tokens taken again.
local due = fmt(now + tonumber(ARGV[1]))
local again = {}
for i = 2, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then again[#again + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[1], 'GT', due, ARGV[i])
end
touch(KEYS, {KEYS[1], KEYS[3]})
return again

--@ keep
-- KEYS: res, lease, hold, gate, state. ARGV: id, expires_ms, cost, gen, balance, turn.
-- Keep the reservation ``id`` open as a hold (its record marked ':h'); its expiry (Unix
-- ms), or nil when the reservation is gone (its lease expired).
local id = ARGV[1]
local rec = redis.call('HGET', KEYS[1], id)
if not rec then return false end
local due = now + tonumber(ARGV[2])
if string.sub(rec, -2) ~= ':h' then redis.call('HSET', KEYS[1], id, rec .. ':h') end
redis.call('ZADD', KEYS[2], fmt(due), id)
redis.call('HSET', KEYS[3], 'cost', ARGV[3], 'gen', ARGV[4], 'balance', ARGV[5],
           'turn', ARGV[6])
redis.call('PEXPIREAT', KEYS[3], fmt(due + 60000))
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[4], 'XX', fmt(due), ARGV[6]) end
touch({KEYS[1], KEYS[2], KEYS[5]}, {KEYS[2]})
touch({KEYS[4]}, {KEYS[4]})
return fmt(due)

--@ hold
-- KEYS: res, lease, hold, gate. ARGV: id, claim (0/1), lease_ms.
-- The open hold {cost, gen, balance, expiry}, or nil (unknown, ended or expired). With
-- claim, it ends: its reservation is an ordinary one again (leased for lease_ms, to be
-- settled by the caller) and its turn is given back.
local id = ARGV[1]
local info = redis.call('HMGET', KEYS[3], 'cost', 'gen', 'balance', 'turn')
if not info[1] then return false end
local due = tonumber(redis.call('ZSCORE', KEYS[2], id))
local rec = redis.call('HGET', KEYS[1], id)
if not due or due <= now or not rec then
  redis.call('DEL', KEYS[3])
  return false
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[3])
  if string.sub(rec, -2) == ':h' then
    redis.call('HSET', KEYS[1], id, string.sub(rec, 1, -3))
  end
  redis.call('ZADD', KEYS[2], fmt(now + tonumber(ARGV[3])), id)
  if info[4] ~= '' then redis.call('ZREM', KEYS[4], info[4]) end
end
return {info[1], info[2], info[3], fmt(due)}
