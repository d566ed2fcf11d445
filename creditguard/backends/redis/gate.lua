-- The scripts of one account's gate and holds in Redis (creditguard/_redis_gate.py loads
-- them). Sections start with a line "--@ <name>"; "_now" precedes every script but those
-- marked "--@ <name> state", which the state scripts' "_keys" and "_head" precede.

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

--@ leave
-- KEYS: gate, queue, alive. ARGV: token, limit, lease_ms, the tokens of the caller's
-- process that wait for a turn... Give the turn back, or leave the queue. A turn given
-- back goes at once, if fewer than limit are taken (limit 0: never), to the first caller
-- queued that still looks (first come, first served): leased for lease_ms when it waits
-- in the caller's process (told at once), else until its next look is due, when it takes
-- it (enter). The token it went to, or ''.
local gate, queue, alive = KEYS[1], KEYS[2], KEYS[3]
local gone = redis.call('ZREM', gate, ARGV[1])
redis.call('ZREM', queue, ARGV[1])
redis.call('ZREM', alive, ARGV[1])
if gone == 0 then return '' end
redis.call('ZREMRANGEBYSCORE', gate, '-inf', fmt(now))
if redis.call('ZCARD', gate) >= tonumber(ARGV[2]) then return '' end
local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', fmt(now), 'LIMIT', 0, 100)
for _, d in ipairs(dead) do
  redis.call('ZREM', queue, d)
  redis.call('ZREM', alive, d)
end
local head = redis.call('ZRANGE', queue, 0, 0)[1]
if not head then return '' end
local due = tonumber(redis.call('ZSCORE', alive, head))
for i = 4, #ARGV do
  if ARGV[i] == head then due = now + tonumber(ARGV[3]) end
end
if not due then return '' end
redis.call('ZREM', queue, head)
redis.call('ZREM', alive, head)
redis.call('ZADD', gate, fmt(due), head)
return head

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

--@ enter state
-- Preceded by the state scripts' "_keys" and "_head" (state.lua), not by "_now".
-- KEYS: state, res, lease, flight, gate, queue, alive, ticket.
-- ARGV[1]: 'token limit lease_ms alive_ms check cost ttl_ms id known finished', one
-- string (id '-': do not admit; known, finished as for admit, maybe empty); ARGV[2...]:
-- the ids of the caller's own enclosing reservations.
-- Take a turn, or stand in the queue. With check, a caller new at the gate that the
-- account cannot pay (on its trusted, fresh cached balance, less the open holds and the
-- caller's own reservations) is refused and not queued; with no such balance, the answer
-- is {'check'} (the caller reads, then asks again without check). With an id, a caller
-- granted its turn is admitted at once when the cached balance covers its cost beside
-- every reservation (else it is admitted the usual way). Answers:
-- {'refuse', available, held, balance json}; {'check'}; {'queued', ticket} (ask again
-- within alive_ms; the lowest ticket is next); {'turn'} (granted, not admitted);
-- {'turn', gen} (admitted on the balance named known); {'turn', gen, tag, balance json}.
local token, limit, lease, alive_ms, check, cost, ttl, id, known, finished = string.match(
  ARGV[1], '^(%w+) (%d+) (%d+) (%d+) ([01]) (%d+) (%d+) (%S+) (%S*) (%S*)$')
limit, lease, cost, ttl = tonumber(limit), tonumber(lease), tonumber(cost), tonumber(ttl)
local K_GATE, K_QUEUE, K_ALIVE, K_TICKET = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local admit = id ~= '-'
if check == '1' or admit then sweep() end
if finished ~= '' then mark_finished(split(finished)) end  -- as admit does (state.lua)
-- Expired turns and waiters that stopped looking leave.
redis.call('ZREMRANGEBYSCORE', K_GATE, '-inf', fmt(now))
local dead = redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', fmt(now), 'LIMIT', 0, 100)
for _, d in ipairs(dead) do
  redis.call('ZREM', K_QUEUE, d)
  redis.call('ZREM', K_ALIVE, d)
end
local granted = false
local ticket = nil
if redis.call('ZSCORE', K_GATE, token) then
  granted = true  -- taken before, or handed over by a leave: leased from now
  redis.call('ZADD', K_GATE, fmt(now + lease), token)
else
  ticket = redis.call('ZSCORE', K_QUEUE, token)
  if not ticket and check == '1' then
    local raw = redis.call('HMGET', K_STATE, 'cached_total', 'cached_seq', 'floor', 'cached_at',
                           'reserved')
    local total = tonumber(raw[1])
    if not total or (tonumber(raw[2]) or 0) < (tonumber(raw[3]) or 0)
       or now - (tonumber(raw[4]) or 0) >= ttl then
      return {'check'}
    end
    if cost > total - (tonumber(raw[5]) or 0) then
      local own_ids = {}
      for i = 2, #ARGV do own_ids[ARGV[i]] = true end
      local held, own = 0, 0
      local all = redis.call('HGETALL', K_RES)
      for i = 1, #all, 2 do
        local c = parse(all[i + 1])
        if is_hold(all[i + 1]) then
          held = held + c
        elseif own_ids[all[i]] then
          own = own + c
        end
      end
      local free = total - held - own
      if cost > free then
        if free < 0 then free = 0 end
        return {'refuse', free, held, redis.call('HGET', K_STATE, 'cached') or ''}
      end
    end
  end
  if not ticket then
    ticket = redis.call('INCR', K_TICKET)
    redis.call('ZADD', K_QUEUE, fmt(ticket), token)
  end
  local free = limit - redis.call('ZCARD', K_GATE)
  if free > 0 and redis.call('ZRANK', K_QUEUE, token) < free then
    redis.call('ZREM', K_QUEUE, token)
    redis.call('ZREM', K_ALIVE, token)
    redis.call('ZADD', K_GATE, fmt(now + lease), token)
    granted = true
  else
    redis.call('ZADD', K_ALIVE, fmt(now + tonumber(alive_ms)), token)
  end
end
-- Keep the gate's keys IDLE_MS past the latest turn or look.
local until_ms = now
for _, key in ipairs({K_GATE, K_ALIVE}) do
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > until_ms then until_ms = tonumber(last[2]) end
end
for _, key in ipairs({K_GATE, K_QUEUE, K_ALIVE, K_TICKET}) do
  redis.call('PEXPIREAT', key, fmt(until_ms + IDLE_MS))
end
if not granted then return {'queued', tonumber(ticket)} end
if not admit then return {'turn'} end
local raw = redis.call('HMGET', K_STATE, 'cached_total', 'cached_seq', 'floor', 'cached_at',
                       'cache_gen', 'reserved', 'inflight', 'cache_id')
local total = tonumber(raw[1])
local reserved = tonumber(raw[6]) or 0
if not total or (tonumber(raw[2]) or 0) < (tonumber(raw[3]) or 0)
   or now - (tonumber(raw[4]) or 0) >= ttl
   or (cost > 0 and cost > total - reserved) then
  return {'turn'}
end
local gen = raw[5] or '0'
if redis.call('HSETNX', K_RES, id, fmt(cost) .. ':' .. gen .. ':0') == 0 then
  return redis.error_reply('creditguard: reservation id already in use')
end
redis.call('ZADD', K_LEASE, fmt(now + lease), id)
redis.call('HSET', K_STATE, 'reserved', fmt(reserved + cost),
           'inflight', fmt((tonumber(raw[7]) or 0) + 1))
touch()
local tag = raw[8] and raw[8] .. ':' .. gen or ''
if tag ~= '' and tag == known then return {'turn', tonumber(gen)} end
return {'turn', tonumber(gen), tag, redis.call('HGET', K_STATE, 'cached') or ''}
