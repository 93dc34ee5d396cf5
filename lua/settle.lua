-- After the upstream answered: settle a hold, or release a persistent cap; or close a check's hold (both).
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash, 4.. the member levels' state hashes
-- (lib/members.lua), in the order of the hold's member holds ("close": none).
-- The protocol is gateway/state/settle.py (SettleArgs, ReleaseArgs, CloseArgs, SettleReply, CloseReply).
-- ARGV[1] = "settle": 2 "keep" or "back" for the limit units, 3 the credits actually owed ("" keeps what
--   was held), 4 plan name (for events), 5 units the answer reported (counted in the usage history; ""
--   for none), 6 "1" when the record restores, 7.. the hold (Hold.argv): id ("" when not metered),
--   period credits, purchased credits, credit window, allowance, usage key, the member levels' holds
--   (JSON, "" for none), then name, units, window of each limit held.
-- ARGV[1] = "release": 2 limit name, 3 units, 4 the plan's cap, 5 plan name, 6 "1" when the record restores.
-- ARGV[1] = "close" (a consuming check's stored hold, in one call): 2 to 6 as "settle", 7 the hold's id,
--   8 the "<route>|<operation>" the caller settles it as (the hold's usage key must end with it), 9 the
--   caller's plan version, 10 a cap to release ("" for none), 11 its units, 12 its cap ("" for none),
--   13 the status spec (its `cr`: the credits as the plan has them), 14 calendar bounds (lib/args.lua's bounds_arg), 15 the
--   ids of the member levels it is settled at (JSON, nearest first, "" for none: KEYS 4.. are their state).
-- Answers {status ("ok", "settled": settled before, "missing": restore first), balance or nil}; "close"
-- also answers "stale" (as decide.lua: the plan changed, resolve and retry) and "mismatch" (the hold was
-- taken for another route or operation: nothing written) and "read" (it was held at other member levels
-- than ARGV 15 names, the billable's chain changed since: settle it as "settle", nothing written), and its
-- balance is status.lua's.
-- Every argument is checked before the first write (lib/args.lua): a bad one is an error reply, nothing written.
--#include rules
--#include args
--#include members
local S, EV, HOLDS = KEYS[1], KEYS[2], KEYS[3]
local op = text_arg(1, {settle = true, release = true, close = true})
text_arg(6)
local release, hold, owed, units, close
if op == 'release' then
  release = {text_arg(2), whole_arg(3, 0), whole_arg(4, -1, nil, true)}
  text_arg(5)
else
  text_arg(2, {keep = true, back = true})
  owed = whole_arg(3, 0, nil, true)
  text_arg(4)
  units = whole_arg(5, 0, nil, true)
end
if op == 'settle' then
  hold = {id = text_arg(7), cp = whole_arg(8), cb = whole_arg(9), w = whole_arg(10), a = whole_arg(11, -1),
    q = text_arg(12), l = {}, m = {}}
  if text_arg(13) ~= '' then
    local ok, m = pcall(cjson.decode, ARGV[13])
    if not ok or type(m) ~= 'table' or #m ~= #KEYS - 3 then bad_arg(13, "the member levels' holds, one per key after the third") end
    hold.m = m
  end
  if (#ARGV - 13) % 3 ~= 0 then bad_arg(#ARGV, 'a whole (name, units, window) triple of a limit held') end
  for i = 14, #ARGV, 3 do hold.l[#hold.l + 1] = {text_arg(i), whole_arg(i + 1, 0), whole_arg(i + 2, 0)} end
elseif op == 'close' then
  close = {id = text_arg(7), as = text_arg(8), pv = whole_arg(9), spec = json_arg(13), bounds = bounds_arg(14, true), members = {}}
  if (ARGV[15] or '') ~= '' then close.members = json_arg(15) end
  if #close.members ~= #KEYS - 3 then bad_arg(15, "the member levels' ids, one per key after the third") end
  if text_arg(10) ~= '' then release = {ARGV[10], whole_arg(11, 0), whole_arg(12, -1, nil, true)} end
  if close.id == '' then bad_arg(7, 'a hold id') end
end
-- Nothing is written above this line.
-- State Redis lost is not written before it is restored (the restore keeps fields already present, so a
-- count or balance written now would hide the record's). A hold lost with it stays charged; a release
-- is retried by the caller after the restore.
if ARGV[6] == '1' and redis.call('HEXISTS', S, 'hyd') == 0 then
  return {'missing'}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local events = {}

local function num(field, default)
  return tonumber(redis.call('HGET', S, field)) or default
end

local function give_back_cap(n, units, to)
  local usage = num('u:' .. n, 0) - units
  if usage < 0 then usage = 0 end
  redis.call('HSET', S, 'u:' .. n, usage)
  if to and usage <= to then redis.call('HDEL', S, 'g:' .. n, 'b:' .. n) end
  if to and to > 0 then
    local ratio = usage / to
    if ratio < num('t:' .. n, 0) then redis.call('HSET', S, 't:' .. n, ratio) end
  end
end

if op == 'release' then
  give_back_cap(release[1], release[2], release[3])
  if #KEYS > 3 then members_lib().release(release[1], release[2]) end
  redis.call('HINCRBY', S, 'chg', 1)
  return {'ok'}
end

if close then
  local pv = tonumber(redis.call('HGET', S, 'pv')) or 0
  if pv ~= close.pv then
    local found = redis.call('HMGET', S, 'asg', 'sub', 'ov', 'sus')
    return {'stale', pv, found[1], found[2], found[3], found[4]}
  end
  local raw = redis.call('HGET', HOLDS, close.id)
  if not raw then return {'settled'} end
  local stored = cjson.decode(raw)
  if (tonumber(stored.exp) or 0) <= now then return {'settled'} end  -- past its lifetime: kept as charged
  local q = tostring(stored.q or '')
  if string.match(q, '^[^|]*|(.*)$') ~= close.as then return {'mismatch'} end
  local held_m = stored.m or {}
  if #held_m ~= #close.members then return {'read'} end
  for i, m in ipairs(held_m) do
    if m.id ~= close.members[i] then return {'read'} end
  end
  local limits = {}
  for _, l in ipairs(stored.l or {}) do limits[#limits + 1] = {l[1], tonumber(l[2]), tonumber(l[3])} end
  hold = {id = close.id, cp = tonumber(stored.cp) or 0, cb = tonumber(stored.cb) or 0, w = tonumber(stored.w) or 0,
    a = tonumber(stored.a) or 0, q = q, l = limits, m = held_m}
end

if hold.id ~= '' and redis.call('HDEL', HOLDS, hold.id) == 0 then
  return {'settled'}  -- settled before: settling twice changes nothing
end

local usage_key = hold.q
-- The usage history's changes (in lib/members.lua's USAGE_COUNTERS order): the member levels change as the root.
local counted = {0, 0, 0, 0}
local function count(j, delta)
  add_to(S, USAGE_COUNTERS[j] .. usage_key, delta)
  counted[j] = counted[j] + delta
end
if ARGV[2] == 'back' then
  count(1, -1)
  for _, l in ipairs(hold.l) do
    local n, held_units, ws = l[1], l[2], l[3]
    if string.sub(n, 1, 2) == 'o:' then
      -- Units billed past a limit, or a pay-as-you-go request (decide.lua): a request given back is not billed.
      redis.call('HSET', S, n, math.max(0, num(n, 0) - held_units))
    elseif string.sub(n, 1, 2) ~= 'p:' then
      count(2, -held_units)
      if ws == 0 then
        give_back_cap(n, held_units, nil)
      elseif num('w:' .. n, nil) == ws then
        local usage = num('u:' .. n, 0) - held_units
        if usage < 0 then usage = 0 end
        redis.call('HSET', S, 'u:' .. n, usage)
      end
    end
  end
end

-- Pay-as-you-go priced from the answer (decide.lua's 'p:<meter>|<window>'): the units it reported are billed.
if units then
  for _, l in ipairs(hold.l) do
    if string.sub(l[1], 1, 2) == 'p:' then add_to(S, 'o:' .. string.sub(l[1], 3), units) end
  end
end

local balance = nil
if owed then
  local held = hold.cp + hold.cb
  local allowance = hold.a or 0
  local spent, purchased, debt = num('c:s', 0), num('c:p', 0), num('c:d', 0)
  local same_period = num('c:w', nil) == hold.w
  local function left()
    if allowance < 0 then return 0 end
    return math.max(0, allowance - spent)
  end
  local before = left() + purchased - debt
  if allowance < 0 then
    if same_period then spent = spent + owed - held end
  elseif owed < held then
    -- Give back to where it came from: purchased first (taken last), then the period allowance.
    local back = held - owed
    local to_purchased = math.min(back, hold.cb)
    purchased = purchased + to_purchased
    if same_period then spent = math.max(0, spent - (back - to_purchased)) end
    -- Outstanding debt is paid before anything else is spendable.
    local pay = math.min(debt, purchased)
    purchased, debt = purchased - pay, debt - pay
    pay = math.min(debt, left())
    spent, debt = spent + pay, debt - pay
  elseif owed > held then
    local extra = owed - held
    local from_period = math.min(extra, left())
    spent = spent + from_period
    extra = extra - from_period
    local from_purchased = math.min(extra, purchased)
    purchased = purchased - from_purchased
    debt = debt + extra - from_purchased
  end
  redis.call('HSET', S, 'c:s', spent, 'c:p', purchased, 'c:d', debt)
  if owed ~= held then count(3, owed - held) end
  if units then count(2, units) end
  balance = left() + purchased - debt
  if allowance >= 0 and balance < before then
    local threshold = num('c:thr', nil)
    if threshold and before >= threshold and balance < threshold then
      events[#events + 1] = {'credits_low', {balance = balance, threshold = threshold}}
    end
    if before > 0 and balance <= 0 then events[#events + 1] = {'credits_depleted', {balance = balance}} end
  end
  if allowance < 0 then balance = nil end
end

if close and release then
  give_back_cap(release[1], release[2], release[3])
  if #KEYS > 3 then members_lib().release(release[1], release[2]) end
end
if #hold.m > 0 then members_lib().settle(hold.m, ARGV[2] == 'back', owed, usage_key, counted) end
redis.call('HINCRBY', S, 'chg', 1)
if #events > 0 then
  local seq = num('eseq', 0)
  for _, e in ipairs(events) do
    seq = seq + 1
    redis.call('RPUSH', EV, cjson.encode({seq = seq, type = e[1], at = now, plan = ARGV[4], data = e[2]}))
  end
  redis.call('HSET', S, 'eseq', seq)
end
if close then
  -- What status.lua would answer now (read only: the period's rollover is written by the next decision).
  local cr = close.spec.cr
  local ws = window_of(cr.p, now, close.bounds, tonumber(redis.call('HGET', S, 'bp_s')), tonumber(redis.call('HGET', S, 'bp_e')))
  local spent, purchased, debt = credits_in(ws, tonumber(redis.call('HGET', S, 'c:w')), cr.a, cr.ro == 1,
    num('c:s', 0), num('c:p', 0), num('c:d', 0))
  local left = period_left(cr.a, spent)
  balance = left and left + purchased - debt
end
return {'ok', balance or false}
