-- The scripts of one account's state in Redis (creditguard/_redis_state.py loads them).
--
-- Sections start with a line "--@ <name> <keys> <prelude> [fields...]": <keys> is how many
-- of the account's four keys the script is given; <prelude> what precedes its body:
-- "keys" (the key names and the helpers that need no state), "head" (that, the server's
-- time and sweep()), "full" (head, a sweep(), the state helpers, and a load() of
-- [fields...]). Sections named "_..." are the preludes themselves.
--
-- Lua numbers are doubles: exact up to 2^53, far beyond any credit count, seq or
-- millisecond time here (the Python side refuses larger values before they get here);
-- they are written with '%d' (tostring would switch to exponents past 14 digits).
--
-- A reservation's record (in K_RES) is "cost:gen:after", with ":h" appended while it is
-- an open hold (see _redis_gate.lua).

--@ _keys
local K_STATE, K_RES, K_LEASE, K_FLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
-- The subject windows of reservations that count in one (an allowance): id -> "window_key
-- cost end_ms". Same hash tag as the account's keys (one slot), derived from K_STATE.
local BASE = string.sub(K_STATE, 1, -6)  -- what every key of the account starts with
local K_SUBJ = BASE .. 'subj'
-- How long a window's books outlive its end (a call admitted in it may end later).
local WINDOW_GRACE_MS = 86400000
local function fmt(n) return string.format('%d', n) end

-- (A window is named by what follows BASE, "w:<subject hash>:<start ms>": the prefix a
-- backend was given may hold any character, so it never travels in an argument.)

-- The call of reservation ``id`` ended: move its cost from its subject window's
-- ``reserved`` to ``spent`` as ``charged`` (nil: its cost, when its outcome is unknown),
-- once. Nothing for a reservation that counts in no window.
local function settle_subject(id, charged)
  local entry = redis.call('HGET', K_SUBJ, id)
  if not entry then return end
  redis.call('HDEL', K_SUBJ, id)
  local wname, c, wend = string.match(entry, '^(%S+) (%d+) (%d+)$')
  local wkey = BASE .. wname
  c = tonumber(c)
  if charged == nil then charged = c end
  if c > 0 then redis.call('HINCRBY', wkey, 'reserved', fmt(-c)) end
  if charged > 0 then redis.call('HINCRBY', wkey, 'spent', fmt(charged)) end
  redis.call('PEXPIREAT', wkey, fmt(tonumber(wend) + WINDOW_GRACE_MS))
end

-- A finished-spend item, "id" or "id=charged": the id, and what its call was charged.
local function finished_item(item)
  local id, charged = string.match(item, '^([^=]+)=?(%d*)$')
  return id, tonumber(charged)
end

-- Spends that finished (``items``, a list of finished-spend items): mark those still
-- recorded finished, all at one seq (Redis learns of them at the same instant), which it
-- returns (0: none was), and count what each was charged in its subject's window.
local function mark_finished(items)
  local seq = 0
  for _, item in ipairs(items) do
    local fid, charged = finished_item(item)
    local rec = redis.call('HGET', K_RES, fid)
    if rec then
      if seq == 0 then seq = redis.call('HINCRBY', K_STATE, 'seq', 1) end
      redis.call('HSET', K_RES, fid, string.match(rec, '^%d+:%-?%d+:') .. fmt(seq))
    end
    settle_subject(fid, charged)
  end
  return seq
end

-- The items of a comma-separated list, as a list.
local function split(text)
  local items = {}
  for item in string.gmatch(text, '[^,]+') do items[#items + 1] = item end
  return items
end
local function parse(rec)
  local c, g, a = string.match(rec, '^(%d+):(%-?%d+):(%d+)')
  return tonumber(c), tonumber(g), tonumber(a)
end
local function is_hold(rec) return string.sub(rec, -2) == ':h' end
local function record(c, g, a) return fmt(c) .. ':' .. fmt(g) .. ':' .. fmt(a) end

--@ _head
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- How long an idle account's keys outlive the latest lease (a hold's lease is its expiry).
local IDLE_MS = 3600000
-- The lease a reservation whose lease was lost gets (its process renews it, if alive).
local LOST_LEASE_MS = 60000

-- Keep the account's keys while anything in them may be needed: until the latest lease,
-- then IDLE_MS more. Every script that writes calls it.
local function touch()
  local last = redis.call('ZRANGE', K_LEASE, -1, -1, 'WITHSCORES')
  local until_ms = now
  if last[2] and tonumber(last[2]) > until_ms then until_ms = tonumber(last[2]) end
  local at = fmt(until_ms + IDLE_MS)
  redis.call('PEXPIREAT', K_STATE, at)
  redis.call('PEXPIREAT', K_RES, at)
  redis.call('PEXPIREAT', K_LEASE, at)
  redis.call('PEXPIREAT', K_SUBJ, at)
end

-- The books disagree (a key was lost: evicted, expired or deleted on its own): rebuild the
-- counters from the records, give records without a lease one, drop leases without a
-- record, and distrust every read that started before now (what it includes is unknown).
local function repair()
  local all = redis.call('HGETALL', K_RES)
  local cost, count, newest, known = 0, 0, 0, {}
  for i = 1, #all, 2 do
    local c, g, a = parse(all[i + 1])
    cost = cost + c
    count = count + 1
    if a > newest then newest = a end
    known[all[i]] = true
    if not redis.call('ZSCORE', K_LEASE, all[i]) then
      redis.call('ZADD', K_LEASE, fmt(now + LOST_LEASE_MS), all[i])
    end
  end
  for _, id in ipairs(redis.call('ZRANGE', K_LEASE, 0, -1)) do
    if not known[id] then redis.call('ZREM', K_LEASE, id) end
  end
  -- a window's reservation without a record: its call's outcome is unknown
  for _, id in ipairs(redis.call('HKEYS', K_SUBJ)) do
    if not known[id] then settle_subject(id, nil) end
  end
  local raw = redis.call('HMGET', K_STATE, 'seq', 'cache_gen')
  local seq = math.max(tonumber(raw[1]) or 0, newest) + 1
  redis.call('HSET', K_STATE, 'seq', fmt(seq), 'floor', fmt(seq),
             'cache_gen', fmt((tonumber(raw[2]) or 0) + 1),
             'reserved', fmt(cost), 'inflight', fmt(count))
  redis.call('HDEL', K_STATE, 'cached', 'cached_total', 'cache_id')
  if count > 0 then touch() end
end

-- Check the books (three O(1) commands), then remove the reservations whose lease
-- expired: spends of unknown outcome. Their credits are no longer counted and every read
-- that started before now is distrusted (hard invalidation).
local function sweep()
  local n = redis.call('HLEN', K_RES)
  if n ~= (tonumber(redis.call('HGET', K_STATE, 'inflight')) or 0)
     or n ~= redis.call('ZCARD', K_LEASE) then
    repair()
  end
  local due = '(' .. fmt(now)
  if redis.call('ZCOUNT', K_LEASE, '-inf', due) == 0 then return end
  local gone = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', due)
  local cost, n = 0, 0
  for _, id in ipairs(gone) do
    local rec = redis.call('HGET', K_RES, id)
    if rec then
      cost = cost + tonumber(string.match(rec, '^%d+'))
      n = n + 1
      redis.call('HDEL', K_RES, id)
      settle_subject(id, nil)  -- its outcome unknown: counted as spent
    end
  end
  redis.call('ZREMRANGEBYSCORE', K_LEASE, '-inf', due)
  local raw = redis.call('HMGET', K_STATE, 'seq', 'cache_gen', 'reserved', 'inflight')
  local seq = fmt((tonumber(raw[1]) or 0) + 1)
  redis.call('HSET', K_STATE, 'seq', seq, 'floor', seq,
             'cache_gen', fmt((tonumber(raw[2]) or 0) + 1),
             'reserved', fmt((tonumber(raw[3]) or 0) - cost),
             'inflight', fmt((tonumber(raw[4]) or 0) - n))
  redis.call('HDEL', K_STATE, 'cached', 'cached_total', 'cache_id')
end

--@ _helpers
local S, O = {}, {}    -- the state fields: as changed by this script, as read
local cached = nil     -- a balance is cached (nil: not looked at yet)
local cache_op = nil   -- what flush() does to the cached balance: 'store' or 'drop'
local new_json = nil   -- the balance to cache, set by this script, and its id
local new_id = nil

-- read the fields not read yet, in one HMGET
local function load(...)
  local names = {}
  for _, name in ipairs({...}) do
    if rawget(S, name) == nil then names[#names + 1] = name end
  end
  if #names == 0 then return end
  local raw = redis.call('HMGET', K_STATE, unpack(names))
  for i, name in ipairs(names) do
    local v = tonumber(raw[i]) or 0
    S[name] = v
    O[name] = v
    if name == 'cached_total' and cached == nil then cached = raw[i] and true or false end
  end
end
setmetatable(S, {__index = function(_, name)
  load(name)
  return rawget(S, name)
end})

local function is_cached()
  if cached == nil then load('cached_total') end
  return cached
end

-- stop counting a reservation as in flight
local function unhold(id, cost)
  redis.call('HDEL', K_RES, id)
  redis.call('ZREM', K_LEASE, id)
  S.reserved = S.reserved - cost
  S.inflight = S.inflight - 1
end

-- a spend that settled, or whose outcome is known: no older read may be trusted
local function release(id, cost, after)
  unhold(id, cost)
  if after > S.floor then S.floor = after end
end

-- distrust every read that started before now
local function invalidate()
  S.seq = S.seq + 1
  S.floor = S.seq
  S.cache_gen = S.cache_gen + 1
  cached = false
  cache_op = 'drop'
  new_json = nil
end

-- cache a balance; ``id`` names it (the random token of the read, or reservation id, that
-- brought it): a caller that knows the balance of that id is not sent it again
local function store(json, total, start, at, id)
  S.cache_gen = S.cache_gen + 1
  cached = true
  cache_op = 'store'
  new_json = json
  new_id = id
  S.cached_total = total
  S.cached_seq = start
  S.cached_at = at
end

local function cached_json()
  if not is_cached() then return '' end
  if new_json then return new_json end
  return redis.call('HGET', K_STATE, 'cached') or ''
end

-- write back the fields that changed (and store or drop the cached balance); any write
-- keeps the account's keys alive (touch)
local function flush()
  local args = {}
  for name, v in pairs(S) do
    if v ~= O[name] and name ~= 'cached_total' then
      args[#args + 1] = name
      args[#args + 1] = fmt(v)
    end
  end
  if cache_op == 'store' then
    args[#args + 1] = 'cached'
    args[#args + 1] = new_json
    args[#args + 1] = 'cached_total'
    args[#args + 1] = fmt(S.cached_total)
    args[#args + 1] = 'cache_id'
    args[#args + 1] = new_id
  elseif cache_op == 'drop' then
    redis.call('HDEL', K_STATE, 'cached', 'cached_total', 'cache_id')
  end
  if #args > 0 then redis.call('HSET', K_STATE, unpack(args)) end
  touch()
end

local function trusted() return is_cached() and S.cached_seq >= S.floor end

-- the open holds (their credits and count) and the finished spends waiting for a read
-- (how many, and the seq a read must start at to settle them all)
local function books()
  local held, holds, settling, newest = 0, 0, 0, 0
  local all = redis.call('HGETALL', K_RES)
  for i = 1, #all, 2 do
    local c, g, a = parse(all[i + 1])
    if is_hold(all[i + 1]) then
      held = held + c
      holds = holds + 1
    end
    if a > 0 then
      settling = settling + 1
      if a > newest then newest = a end
    end
  end
  return held, holds, settling, newest, all
end

--@ admit 3 head
-- ARGV[1]: 'cost ttl_ms <settle><may_wait> waited_for lease_ms id known finished keep
-- window', one string (waited_for -1: none; known: the tag of the balance the caller has,
-- or empty; finished: the items ("id" or "id=charged"), comma-separated, of spends of the
-- caller's process that finished since it last told Redis, or empty: marked finished
-- first, as "finish" does; keep: the credits never spent; window: the subject's
-- allowance window, "key|limit|end_ms|warn" (warn -1: none), or empty);
-- ARGV[2...]: the ids of the caller's own enclosing reservations.
local cost, ttl, settle, may_wait, waited, lease, id, known, finished, keep, wspec =
  string.match(ARGV[1],
  '^(%d+) (%d+) ([01])([01]) (%-?%d+) (%d+) (%S+) (%S*) (%S*) (%d+) (%S*)$')
cost, ttl, waited, keep = tonumber(cost), tonumber(ttl), tonumber(waited), tonumber(keep)
sweep()
if finished ~= '' then mark_finished(split(finished)) end
-- The subject's allowance first (it needs no balance): refused when the window cannot
-- take the cost even if its calls in flight charge nothing; held back when they stand in
-- the way.
local wkey, wname, wlimit, wend, wwarn, wspent, wres = nil, nil, 0, 0, -1, 0, 0
local blocked = false
if wspec ~= '' then
  wname, wlimit, wend, wwarn = string.match(wspec, '^([^|]+)|(%d+)|(%d+)|(%-?%d+)$')
  wkey = BASE .. wname
  wlimit, wend, wwarn = tonumber(wlimit), tonumber(wend), tonumber(wwarn)
  local w = redis.call('HMGET', wkey, 'spent', 'reserved')
  wspent, wres = tonumber(w[1]) or 0, tonumber(w[2]) or 0
  if cost > 0 then
    if cost > wlimit - wspent then return {'allowance', wspent, wres} end
    blocked = cost > wlimit - wspent - wres
  end
end
local raw = redis.call('HMGET', K_STATE, 'cached_total', 'cached_seq', 'floor', 'cached_at',
                       'cache_gen', 'reserved', 'inflight', 'cache_id')
local total = tonumber(raw[1])  -- nil: no balance cached
local cseq, floor = tonumber(raw[2]) or 0, tonumber(raw[3]) or 0
if not total or cseq < floor
   or (now - (tonumber(raw[4]) or 0) >= ttl and not (waited >= 0 and cseq >= waited)) then
  return {'read', floor}
end
local gen, reserved = raw[5] or '0', tonumber(raw[6]) or 0  -- (gen as stored: '%d')
if not blocked and (cost == 0 or cost <= total - reserved - keep) then
  if redis.call('HSETNX', K_RES, id, fmt(cost) .. ':' .. gen .. ':0') == 0 then
    return redis.error_reply('creditguard: reservation id already in use')
  end
  redis.call('ZADD', K_LEASE, fmt(now + tonumber(lease)), id)
  redis.call('HSET', K_STATE, 'reserved', fmt(reserved + cost),
             'inflight', fmt((tonumber(raw[7]) or 0) + 1))
  local warned = 0
  if wkey then
    if cost > 0 then redis.call('HINCRBY', wkey, 'reserved', fmt(cost)) end
    redis.call('PEXPIREAT', wkey, fmt(wend + WINDOW_GRACE_MS))
    redis.call('HSET', K_SUBJ, id, wname .. ' ' .. fmt(cost) .. ' ' .. fmt(wend))
    if wwarn >= 0 and wspent + wres + cost >= wwarn
       and redis.call('HSETNX', wkey, 'warned', '1') == 1 then
      warned = 1
    end
  end
  touch()
  -- the balance's tag: its name and generation ('': unnamed)
  local tag = raw[8] and raw[8] .. ':' .. gen or ''
  -- the caller has this balance: its generation alone says so
  if tag ~= '' and tag == known and warned == 0 then return tonumber(gen) end
  return {'ok', redis.call('HGET', K_STATE, 'cached') or '', tonumber(gen), tag, warned}
end
-- It does not fit. Refuse when the account cannot pay even if every other call in flight
-- charges nothing: the balance less the open holds and the caller's own enclosing
-- reservations (they cannot settle while it waits). Else only calls in flight stand in
-- the way: settle finished spends first, or wait for them, or say busy.
local own_ids = {}
for i = 2, #ARGV do own_ids[ARGV[i]] = true end
local newest, held, own = 0, 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > newest then newest = a end
  if is_hold(all[i + 1]) then
    held = held + c
  elseif own_ids[all[i]] then
    own = own + c
  end
end
local free = total - held - own - keep
if cost > free then
  if free < 0 then free = 0 end
  return {'refuse', free, reserved, redis.call('HGET', K_STATE, 'cached') or ''}
end
if newest > 0 and settle == '1' and not blocked then return {'read', newest} end
if may_wait == '1' then return {'wait', held, own} end
local available = total - reserved
if available < 0 then available = 0 end
return {'busy', available, reserved}

--@ finish 2 keys
-- ARGV: items ("id" or "id=charged": see admit). Marks spends finished (those still
-- recorded), all at one seq, which it returns (0: none was), and counts what each was
-- charged in its subject's window; decides nothing (leaves expired leases to the next).
return mark_finished(ARGV)

--@ reserve_unchecked 4 full reserved inflight
-- ARGV: id, cost, lease_ms
local cost = tonumber(ARGV[2])
if redis.call('HSETNX', K_RES, ARGV[1], record(cost, -1, 0)) == 0 then
  return redis.error_reply('creditguard: reservation id already in use')
end
redis.call('ZADD', K_LEASE, fmt(now + tonumber(ARGV[3])), ARGV[1])
S.reserved = S.reserved + cost
S.inflight = S.inflight + 1
flush()
return 1

--@ read_begin 4 full seq flight_seq
-- ARGV: token, budget_ms. (An account seen for the first time stays without keys but
-- the flight's, which expires: a read that fails leaves nothing.)
if redis.call('SET', K_FLIGHT, ARGV[1], 'NX', 'PX', ARGV[2]) then
  S.flight_seq = S.seq
  flush()
  return {1, S.seq}
end
return {0, S.flight_seq}

--@ read_done 4 full cached_total cached_seq floor cache_gen reserved inflight
-- ARGV: token, start_seq, balance json, total
local start = tonumber(ARGV[2])
if start >= S.floor and (not is_cached() or start >= S.cached_seq) then
  store(ARGV[3], tonumber(ARGV[4]), start, now, ARGV[1])
end
-- release the spends that finished before it started, in a few commands however many
local ids, cost, newest = {}, 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > 0 and a <= start then
    ids[#ids + 1] = all[i]
    cost = cost + c
    if a > newest then newest = a end
  end
end
for i = 1, #ids, 1000 do
  local last = math.min(i + 999, #ids)
  redis.call('HDEL', K_RES, unpack(ids, i, last))
  redis.call('ZREM', K_LEASE, unpack(ids, i, last))
end
if #ids > 0 then
  S.reserved = S.reserved - cost
  S.inflight = S.inflight - #ids
  if newest > S.floor then S.floor = newest end
end
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
flush()
return #ids

--@ read_failed 4 full
-- ARGV: token
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
return 0

--@ state 4 full cached_total cached_seq cached_at floor seq reserved inflight cache_gen
local held, holds, settling, newest = books()
local age = -1
if is_cached() then age = now - S.cached_at end
return {is_cached() and 1 or 0, cached_json(), S.cached_seq, age, S.floor, S.seq, S.reserved,
        S.inflight, settling, newest, redis.call('EXISTS', K_FLIGHT), S.cache_gen}

--@ committed 4 full
-- The credits of the open holds.
local held = books()
return held

--@ survey 5 full cached_total cached_seq floor reserved inflight
-- KEYS[5]: the gate's queue. {trusted, balance json, reserved, inflight, held, holds,
-- settling, gate_waiting, then id, cost, expiry (ms) of each open hold}
local held, holds, settling, newest, all = books()
local out = {trusted() and 1 or 0, trusted() and cached_json() or '', S.reserved - held,
             S.inflight - holds, held, holds, settling, redis.call('ZCARD', KEYS[5])}
for i = 1, #all, 2 do
  if is_hold(all[i + 1]) then
    local c = parse(all[i + 1])
    out[#out + 1] = all[i]
    out[#out + 1] = c
    out[#out + 1] = tonumber(redis.call('ZSCORE', K_LEASE, all[i])) or 0
  end
end
return out

--@ release 4 full reserved inflight floor
-- ARGV: id, invalidate, charged (what its call was charged, for its subject's window;
-- absent: nothing, its call did not run or failed)
local rec = redis.call('HGET', K_RES, ARGV[1])
settle_subject(ARGV[1], tonumber(ARGV[3]) or 0)
if rec then
  local c, g, a = parse(rec)
  release(ARGV[1], c, a)
end
if ARGV[2] == '1' then invalidate() end
flush()
return rec and 1 or 0

--@ settle_alone 4 full cached_total cached_seq cached_at floor seq reserved inflight cache_gen
-- ARGV: id, expected_gen, balance json, total, charged (for its subject's window)
local rec = redis.call('HGET', K_RES, ARGV[1])
if rec and trusted() and S.inflight == 1 and redis.call('EXISTS', K_FLIGHT) == 0 then
  local c, g, a = parse(rec)
  if a == 0 and g == S.cache_gen and g == tonumber(ARGV[2]) then
    S.seq = S.seq + 1
    S.floor = S.seq
    store(ARGV[3], tonumber(ARGV[4]), S.seq, S.cached_at, ARGV[1])  -- its age is the read's
    unhold(ARGV[1], c)
    settle_subject(ARGV[1], tonumber(ARGV[5]))
    flush()
    return 1
  end
end
return 0

--@ invalidate 4 full seq cache_gen
invalidate()
flush()
return S.seq

--@ bump 4 full seq
S.seq = S.seq + 1
flush()
return S.seq

--@ renew 4 full
-- ARGV: lease_ms, restore (0/1), then ids (restore 0) or id, cost pairs (restore 1).
-- Extend each lease still held to now + lease_ms, never shortening one (a hold's may be
-- longer). With restore, a reservation that is gone (Redis lost it: a restart, a flush,
-- an eviction) is recorded again (no balance excludes it) and every older read is
-- distrusted. {how many were held, the ids restored...}
local expiry = fmt(now + tonumber(ARGV[1]))
local step = ARGV[2] == '1' and 2 or 1
local out = {0}
for i = 3, #ARGV, step do
  local id = ARGV[i]
  if redis.call('HEXISTS', K_RES, id) == 1 then
    redis.call('ZADD', K_LEASE, 'GT', expiry, id)
    out[1] = out[1] + 1
  elseif step == 2 then
    local cost = tonumber(ARGV[i + 1])
    redis.call('HSET', K_RES, id, record(cost, -1, 0))
    redis.call('ZADD', K_LEASE, expiry, id)
    S.reserved = S.reserved + cost
    S.inflight = S.inflight + 1
    out[#out + 1] = id
  end
end
if #out > 1 then invalidate() end
if out[1] > 0 or #out > 1 then flush() end
return out

--@ block 4 full blocked_until
-- ARGV: ms
local until_ms = now + tonumber(ARGV[1])
if until_ms > S.blocked_until then S.blocked_until = until_ms end
flush()
return S.blocked_until

--@ window 2 keys
-- ARGV: window key. {spent, reserved} of a subject's allowance window.
local w = redis.call('HMGET', ARGV[1], 'spent', 'reserved')
return {tonumber(w[1]) or 0, tonumber(w[2]) or 0}

--@ flip 2 keys
-- ARGV: name, side ('1': low, '0': not). Records the side the balance was last seen on,
-- for the low-balance threshold ``name``; returns the side recorded before ('': none).
local before = redis.call('HGET', K_STATE, 'alert:' .. ARGV[1])
redis.call('HSET', K_STATE, 'alert:' .. ARGV[1], ARGV[2])
if redis.call('PTTL', K_STATE) < 0 then redis.call('PEXPIRE', K_STATE, 3600000) end
return before or ''

--@ blocked 4 full blocked_until
local left = S.blocked_until - now
if left < 0 then left = 0 end
return left
