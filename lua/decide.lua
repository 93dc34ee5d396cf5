-- One decision: features (decided by the caller), rate limits, limits and credits, all or nothing.
-- The protocol is gateway/state/decide.py (DecideArgs, DecideReply); the spec is gateway/state/spec.py.
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash (all under one hash tag), 4.. the member
--       levels' state hashes (ARGV 12), then, last (with ARGV 13), the idempotency record of a consuming
--       check (gateway/idempotency.py).
-- ARGV: 1 spec (lib/spec.lua; its shadow is true on a shadowed plan or route), 2 the caller's plan version,
--       3 calendar bounds (lib/args.lua's bounds_arg),
--       4 "1" when the caller already denies (features): evaluate, write nothing but events; "s" when the
--       caller shadows a denial of its own (features on a shadowed route): counted as a would-be denial,
--       5 hold id for a metered spend ("" for none), 6 credit cost override ("" for the spec's),
--       7 "1" when missing state must be restored first, 8 hold lifetime (s), 9 plan name (for events),
--       10 usage key "<month>|<route>|<operation>": admitted requests, units and credits are counted
--       under it (`qr:`, `qu:`, `qc:`; would-be denials in shadow `qs:`) for the record's usage history,
--       11 "1" for a dry run: evaluate everything, write nothing (no events, holds, counters or lease),
--       12 the billable's member levels (lib/members.lua; "" or absent for none): KEYS 4.. are their state
--       hashes, each decided against its own terms with the root, all or nothing,
--       13 the request's fingerprint, with the idempotency record as the last key ("" or absent for none;
--       the record keeps it with the hold id).
-- Every argument is checked before the first write (lib/args.lua): a bad one is an error reply, nothing written.
--#include rules
--#include args
--#include members
--#include spec
local S, EV, HOLDS = KEYS[1], KEYS[2], KEYS[3]
whole_arg(2)
for _, i in ipairs({4, 5, 7, 9, 10, 11}) do text_arg(i) end
local cost_override = whole_arg(6, 0, nil, true)
local hold_ttl = whole_arg(8, 0)
local dry = ARGV[11] == '1'
local fingerprint = ARGV[13] or ''
local ONCE = nil
if fingerprint ~= '' then ONCE = KEYS[#KEYS] end
local levels = members_arg(12, ONCE and #KEYS - 1 or #KEYS)
local spec = spec_arg(1)
local cr, rates, limits = spec[3], spec[5], spec[6]
local bounds = bounds_arg(3)
if ONCE then
  -- A retry of a request decided before answers what that one answered (or its fingerprint): nothing is taken again.
  local seen = redis.call('GET', ONCE)
  if seen then return {'once', seen} end
end

local usage_key = ARGV[10]
-- Every field a decision reads, in one call: the fixed ones, the usage counters', each policy's. Those
-- only a rare path needs (a stale plan, a billing cycle, an auto-recharge, a shadowed denial) are read by it.
local QR, QC, QU, QS = 'qr:' .. usage_key, 'qc:' .. usage_key, 'qu:' .. usage_key, 'qs:' .. usage_key
local names = {'pv', 'hyd', 'chg', 'eseq', 'hx', 'c:w', 'c:s', 'c:p', 'c:d', 'c:thr', QR, QC, QU}
-- Rate limit k's field is names[RATES + k]; limit k's u, g, t, b, w are names[LIMITS + 5k - 4 ..].
local RATES = #names
for k, r in ipairs(rates) do names[RATES + k] = 'r:' .. r[1] end
local LIMITS = #names
for _, l in ipairs(limits) do
  local n = l[1]
  names[#names + 1] = 'u:' .. n; names[#names + 1] = 'g:' .. n; names[#names + 1] = 't:' .. n
  names[#names + 1] = 'b:' .. n; names[#names + 1] = 'w:' .. n
end
local values = redis.call('HMGET', S, unpack(names))
local F = {}
for i, f in ipairs(names) do F[f] = values[i] end

local pv = tonumber(F.pv) or 0
if pv ~= tonumber(ARGV[2]) then
  local plan_fields = redis.call('HMGET', S, 'asg', 'sub', 'ov', 'sus')
  return {'stale', pv, plan_fields[1] or false, plan_fields[2] or false, plan_fields[3] or false, plan_fields[4] or false}
end
if ARGV[7] == '1' and not F.hyd then
  return {'missing'}
end

local forced_deny = ARGV[4] == '1'
-- Shadow: a would-be denial is admitted and charged as if it were within; its violations are still answered.
local shadow = spec[1]
local caller_shadowed = ARGV[4] == 's'
local hold_id = ARGV[5]
local plan = ARGV[9]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function num(field, default)
  local v = F[field]
  if v then return tonumber(v) or default end
  return default
end

local function ceil_s(ms)
  local s = math.ceil(ms / 1000)
  if s < 0 then return 0 end
  return s
end

local function window(p)
  if p ~= 'bc' then return window_of(p, now, bounds) end
  if not F.bp_read then
    local period = redis.call('HMGET', S, 'bp_s', 'bp_e')
    F.bp_s, F.bp_e, F.bp_read = period[1], period[2], true
  end
  return window_of(p, now, bounds, num('bp_s', nil), num('bp_e', nil))
end

local admitted = not forced_deny
local policies, violations, events, writes = {}, {}, {}, {}
local function set(field, value) writes[#writes + 1] = field; writes[#writes + 1] = value end
-- A violation: {name, kind, retry after, usage, limit, cost, balance}; false stands for none.
local function violate(v)
  violations[#violations + 1] = v
  if not shadow then admitted = false end
end
local deny_events, deny_writes = {}, {}
-- A denial takes nothing, so its reply shows each policy as it was before the request: index in
-- `policies` -> {remaining, reset} before, where that differs from the state after an admission.
local before = {}
-- Events of an admission are sent only if it commits; a denial sends only its own (block, insufficient_credits).
local function event(kind, data) events[#events + 1] = {kind, data} end
local function deny_event(kind, data) deny_events[#deny_events + 1] = {kind, data} end
local held_limits = {}

-- after_limit = "bill": a request past `to` is admitted and its units past `to` are billed, counted on the
-- limit's meter in this window (`o:<meter>|<window start>`, saturating at the spend cap; the reconciler takes
-- their increase to the record's outbox, gateway/billing/outbox.py). At the cap it is block_usage, with
-- its own violation ('spend') and one spend_cap_reached event a window; warnings at warn_at of the cap.
-- Answers whether it may go on.
local billed = {}
local billed_held = {}  -- {counter field, units, window}: given back by a settle that gives the limits back
local function bill(l, usage, after, ws)
  local meter, cap = l[9][1], l[9][2]
  local at = meter .. '|' .. ws
  local so_far = billed[at] or tonumber(redis.call('HGET', S, 'o:' .. at)) or 0
  local units = after - math.max(usage, l[2])
  if cap >= 0 and so_far + units > cap then
    violate({l[1], 'spend', false, so_far, cap, units, false})
    if not shadow then
      if redis.call('HGET', S, 'oc:' .. at) ~= '1' then
        deny_writes[#deny_writes + 1] = 'oc:' .. at
        deny_event('spend_cap_reached', {limit = l[1], meter = meter, units = so_far, cap = cap})
      end
      return false
    end
    units = cap - so_far
  end
  billed[at] = so_far + units
  set('o:' .. at, so_far + units)
  if units > 0 then billed_held[#billed_held + 1] = {'o:' .. at, units, ws} end
  if cap > 0 then
    local warned = tonumber(redis.call('HGET', S, 'ow:' .. at)) or 0
    local top = nil
    for _, t in ipairs(l[10]) do
      if (so_far + units) / cap >= t and t > warned then top = t end
    end
    if top then
      set('ow:' .. at, top)
      event('spend_warning', {limit = l[1], meter = meter, threshold = top, units = so_far + units, cap = cap})
    end
  end
  return true
end

-- Rate limits: GCRA, one cell per policy, times in ms.
for k, r in ipairs(rates) do
  local name, interval, burst = r[1], r[2], r[3]
  local field = names[RATES + k]
  local tat = gcra_tat(F[field], now)
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    local wait = ceil_s(allow_at - now)
    if wait < 1 then wait = 1 end
    violate({name, 'rate', wait, false, false, false, false})
  end
  if allow_at > now and not shadow then
    policies[#policies + 1] = {name, 'rate', burst, r[4], 0, ceil_s(tat - now)}
  else
    -- A shadowed rate limit advances as if the request had been admitted, to an empty cell at most: a week
    -- of shadow traffic over the rate must not leave hours of refusals behind once it enforces.
    if new_tat > now + burst * interval then new_tat = now + burst * interval end
    set(field, new_tat)
    local left = math.max(0, gcra_available(new_tat, now, interval, burst))
    policies[#policies + 1] = {name, 'rate', burst, r[4], left, ceil_s(new_tat - now)}
    before[#policies] = {left + 1, ceil_s(tat - now)}
  end
end

-- Limits: persistent caps (p == '') and per-period allowances.
for k, l in ipairs(limits) do
  local n, to, c, p, after_code = l[1], l[2], l[3], l[4], l[5]
  local at = LIMITS + 5 * k
  local U, G, T, B, W = names[at - 4], names[at - 3], names[at - 2], names[at - 1], names[at]
  local stored = num(U, 0)
  local usage = stored
  local grace_at = num(G, nil)
  local warned = num(T, 0)
  -- The block mark: '1' once an enforced block was sent, 's' once a shadowed one was (an enforced block
  -- still follows it, when enforcement starts in the same window).
  local block_mark = F[B] or ''
  local ws, we = nil, nil
  if p ~= '' then
    ws, we = window(p)
    if num(W, nil) ~= ws then
      usage, grace_at, warned, block_mark = 0, nil, 0, ''
      set(W, ws); set(G, ''); set(T, 0); set(B, '')
    end
  end
  local after = usage + c
  local state = 'within'
  if to < 0 then
    state = 'unlimited'
  elseif c > to and after_code ~= 'o' then
    violate({n, 'size', false, usage, to, c, false})
    state = shadow and 'shadow' or 'denied'
  elseif after <= to then
    if p == '' and grace_at then
      -- The excess episode is over: a later one earns its own grace.
      grace_at = nil; block_mark = ''
      set(G, ''); set(B, '')
    end
  elseif after_code == 'w' then
    state = 'over'
  elseif after_code == 'o' then
    state = bill(l, usage, after, ws) and 'billed' or 'denied'
  else
    local in_grace = false
    if after_code == 'g' then
      local grace_ms, grace_max = l[6], l[7]
      local within_max = grace_max < 0 or after <= to + grace_max
      if not grace_at then
        if within_max then
          in_grace = true
          grace_at = now
          set(G, now)
          event('grace_start', {limit = n, usage = after, grace_ends_at = math.floor((now + grace_ms) / 1000)})
        end
      elseif now < grace_at + grace_ms and within_max then
        in_grace = true
      end
    end
    if in_grace then
      state = 'grace'
    else
      state = 'denied'
      local wait = nil
      if p ~= '' then wait = ceil_s(we - now); if wait < 1 then wait = 1 end end
      violate({n, (p == '' and 'cap' or 'allow'), wait or false, usage, to, c, false})
      if shadow then
        state = 'shadow'
        if block_mark == '' then
          set(B, 's')
          event('block', {limit = n, usage = usage, shadow = true})
        end
      elseif block_mark ~= '1' then
        deny_writes[#deny_writes + 1] = B
        deny_event('block', {limit = n, usage = usage})
      end
    end
  end
  local shown = after
  if state == 'denied' then shown = usage end
  local remaining, reset = nil, nil
  if to >= 0 then
    remaining = to - shown
    if remaining < 0 then remaining = 0 end
  end
  local w = l[8]
  if we then
    reset = ceil_s(we - now)
    w = math.floor((we - ws) / 1000)  -- this window's true length (a 31-day month is 2678400), not the nominal
  end
  policies[#policies + 1] = {n, p == '' and 'cap' or 'allow', to, w, remaining or false, reset or false}
  if to >= 0 and shown ~= usage then before[#policies] = {math.max(0, to - usage), reset or false} end
  if state ~= 'denied' then
    if to >= 0 then held_limits[#held_limits + 1] = {n, c, ws or 0} end
    if after ~= stored then set(U, after) end
    if to > 0 then
      local ratio = after / to
      if p == '' and ratio < warned then set(T, ratio); warned = ratio end
      local top = nil
      for _, t in ipairs(l[10]) do
        if ratio >= t and t > warned then top = t end
      end
      if top then
        set(T, top)
        event('warning', {limit = n, threshold = top, usage = after})
      end
    end
  end
end

-- Member levels (a key's, a team's own terms): a violation at any level denies at every level.
local member, members = nil, nil
if #levels > 0 then
  members = members_lib()
  member = members.decide(levels, now, bounds, cost_override or cr[4], limits, window)
  for _, v in ipairs(member.violations) do violate(v) end
end

-- Credits: balance = period allowance left + purchased - debt; spend takes the allowance first.
local credit = nil
local hold = nil
do
  local allowance = cr[1]
  local cost = cr[4]
  if cost_override then cost = cost_override end
  local ws = window(cr[2])
  local spent0, purchased0, debt0 = num('c:s', 0), num('c:p', 0), num('c:d', 0)
  local spent, purchased, debt, new_window = credits_in(ws, num('c:w', nil), allowance, cr[3], spent0, purchased0, debt0)
  if new_window then set('c:w', ws) end
  local unlimited = allowance < 0
  local left = period_left(allowance, spent) or 0
  local balance = left + purchased - debt
  if unlimited then
    spent = spent + cost
  elseif cost > 0 and balance < cost then
    violate({'credits', 'credits', false, false, false, cost, balance})
    if shadow then
      event('insufficient_credits', {needed = cost, balance = balance, shadow = true})
    else
      deny_event('insufficient_credits', {needed = cost, balance = balance})
      cost = 0
    end
  end
  local from_period, from_purchased = 0, 0
  if not unlimited and cost > 0 then
    from_period = math.min(cost, left)
    from_purchased = cost - from_period
    -- Past the purchased credits (only in shadow) the spend is debt; the hold counts it as purchased, so a
    -- give-back returns it there and settle pays the debt from it.
    local owed = from_purchased - math.max(0, math.min(from_purchased, purchased))
    spent, purchased, debt = spent + from_period, purchased - (from_purchased - owed), debt + owed
  end
  local after = balance - (from_period + from_purchased)
  if unlimited then after = nil end
  if spent ~= spent0 then set('c:s', spent) end
  if purchased ~= purchased0 then set('c:p', purchased) end
  if debt ~= debt0 then set('c:d', debt) end
  local show = cr[5] or allowance ~= 0 or purchased ~= 0 or debt ~= 0
  -- bal0 and p0: the balance and purchased credits before this request (what a denial shows).
  credit = {a = allowance, bal = after, p = purchased, bal0 = balance, p0 = purchased + from_purchased, show = show}
  if unlimited then credit.bal0 = nil end
  if admitted and cost > 0 and after then
    local threshold = num('c:thr', nil)
    if threshold and balance >= threshold and after < threshold then
      event('credits_low', {balance = after, threshold = threshold})
    end
    if balance > 0 and after <= 0 then event('credits_depleted', {balance = after}) end
    if threshold and after < threshold then
      local ar = redis.call('HMGET', S, 'ar:on', 'ar:lease', 'ar:n', 'ar:m')
      F['ar:on'], F['ar:lease'], F['ar:n'], F['ar:m'] = ar[1], ar[2], ar[3], ar[4]
    end
    if threshold and after < threshold and F['ar:on'] == '1' then
      local lease = num('ar:lease', 0)
      local month = window('m')
      local count = num('ar:n', 0)
      if num('ar:m', -1) ~= month then count = 0; set('ar:m', month) end
      if lease < now and count < spec[2] and not dry then
        set('ar:lease', now + 120000); set('ar:n', count + 1)
        credit.recharge = 1
      end
    end
  end
  hold = {cp = from_period, cb = from_purchased, w = ws, a = allowance}
end
if not hold then hold = {cp = 0, cb = 0, w = 0} end
hold.l = held_limits
if member then hold.m = member.hold end
hold.q = ARGV[10]

-- Pay-as-you-go (an operation's metered = { meter, unit_price }): every unit billed on the meter in this
-- month's window, `o:<meter>|<window>` as overage is. pg = {meter, true}: the request is one unit, billed now
-- (given back with the limits); {meter, false}: the units its answer reports are billed by the settle ('p:').
local payg_window = spec[4] and window('m')
local function pay_as_you_go(pg)
  local ws = payg_window
  local at = pg[1] .. '|' .. ws
  if pg[2] then
    local so_far = billed[at] or tonumber(redis.call('HGET', S, 'o:' .. at)) or 0
    set('o:' .. at, so_far + 1)
    billed_held[#billed_held + 1] = {'o:' .. at, 1, ws}
  else
    billed_held[#billed_held + 1] = {'p:' .. at, 0, ws}
  end
end

-- Holds whose settle never came (their process died) leave the hash once past their lifetime, kept as
-- charged. `hx` is the earliest expiry among them: nothing is read until one is due.
local next_expiry = tonumber(F.hx)
if next_expiry and next_expiry <= now and not dry then
  next_expiry = nil
  local held = redis.call('HGETALL', HOLDS)
  for i = 1, #held, 2 do
    local exp = tonumber(cjson.decode(held[i + 1]).exp) or 0
    if exp <= now then
      redis.call('HDEL', HOLDS, held[i])
    elseif not next_expiry or exp < next_expiry then
      next_expiry = exp
    end
  end
  if next_expiry then redis.call('HSET', S, 'hx', next_expiry) else redis.call('HDEL', S, 'hx') end
  F.chg = redis.call('HINCRBY', S, 'chg', 1)
end

local seq = num('eseq', 0)
local seq0 = seq
local out_events = {}
local function push_events(list)
  if #list == 0 then return end
  local items = {}
  for _, e in ipairs(list) do
    seq = seq + 1
    local item = cjson.encode({seq = seq, type = e[1], at = now, plan = plan, data = e[2]})
    out_events[#out_events + 1] = item
    items[#items + 1] = item
  end
  redis.call('RPUSH', EV, unpack(items))
  redis.call('LTRIM', EV, -100000, -1)
end

if dry then
  -- Nothing is written: no hold, no events, no counters.
  out_events = {}
  hold = nil
elseif admitted then
  local taken = hold.cp + hold.cb
  local units = 0
  for _, l in ipairs(held_limits) do units = units + l[2] end
  if spec[4] then pay_as_you_go(spec[4]) end
  for _, b in ipairs(billed_held) do hold.l[#hold.l + 1] = b end
  push_events(events)
  -- Only what changed is written (each number written costs Redis a conversion to text).
  if F.hyd ~= '1' then set('hyd', 1) end
  set('chg', num('chg', 0) + 1)
  if seq ~= seq0 then set('eseq', seq) end
  set(QR, num(QR, 0) + 1)
  if taken ~= 0 then set(QC, num(QC, 0) + taken) end
  if units ~= 0 then set(QU, num(QU, 0) + units) end
  if #violations > 0 or caller_shadowed then set(QS, (tonumber(redis.call('HGET', S, QS)) or 0) + 1) end
  if hold_id ~= '' and hold then
    hold.exp = now + hold_ttl * 1000
    redis.call('HSET', HOLDS, hold_id, cjson.encode(hold))
    if not next_expiry or hold.exp < next_expiry then set('hx', hold.exp) end
  end
  redis.call('HSET', S, unpack(writes))
  if member then
    members.commit(levels, member, usage_key, {1, units, taken, (#violations > 0 or caller_shadowed) and 1 or 0})
  end
else
  -- A denial consumes nothing; it only remembers which block events it has sent.
  if #deny_events > 0 and not forced_deny then
    -- insufficient_credits is sent on every 402; block once per window or episode.
    push_events(deny_events)
    local marks = {'hyd', 1, 'chg', num('chg', 0) + 1, 'eseq', seq}
    for _, f in ipairs(deny_writes) do marks[#marks + 1] = f; marks[#marks + 1] = 1 end
    redis.call('HSET', S, unpack(marks))
  end
  hold = nil
end
if ONCE and not dry then
  redis.call('SET', ONCE, cjson.encode({f = fingerprint, h = hold_id}), 'EX', 86400)
end

-- The reply is one flat array (Redis converts each table of a reply on its own: one is the cheapest;
-- numbers are integer replies, exact up to 2^53); false stands for none:
--   admitted, now (ms), the policies' count, each {name, kind, quota, window, remaining, reset},
--   the violations' count, each {name, kind, retry after, usage, limit, cost, balance},
--   the events' count, each (JSON), 1 and the credit {allowance, shown, balance, recharge, purchased} or 0,
--   1 and the hold {period credits, purchased credits, credit window, allowance, usage key, member levels'
--   holds (JSON) or false, the limits' count, each {name, units, window}} or 0.
-- A denial consumed nothing: its policies, balance and purchased credits are those before the request.
if not admitted then
  for i, b in pairs(before) do
    policies[i][5], policies[i][6] = b[1], b[2]
  end
  if credit then credit.bal, credit.p = credit.bal0, credit.p0 end
end
if member then
  for _, p in ipairs(admitted and member.after or member.before) do policies[#policies + 1] = p end
end
local out, n = {admitted and 1 or 0, now, #policies}, 3
for _, p in ipairs(policies) do
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = p[1], p[2], p[3], p[4], p[5], p[6]
  n = n + 6
end
n = n + 1; out[n] = #violations
for _, v in ipairs(violations) do
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6], out[n + 7] = v[1], v[2], v[3], v[4], v[5], v[6], v[7]
  n = n + 7
end
n = n + 1; out[n] = #out_events
for _, e in ipairs(out_events) do n = n + 1; out[n] = e end
if credit then
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] =
    1, credit.a, credit.show and 1 or 0, credit.bal or false, credit.recharge or 0, credit.p
  n = n + 6
else
  n = n + 1; out[n] = 0
end
if hold then
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6], out[n + 7], out[n + 8] =
    1, hold.cp, hold.cb, hold.w, hold.a or 0, hold.q, hold.m and cjson.encode(hold.m) or false, #hold.l
  n = n + 8
  for _, l in ipairs(hold.l) do
    out[n + 1], out[n + 2], out[n + 3] = l[1], l[2], l[3]
    n = n + 3
  end
else
  out[n + 1] = 0
end
return out
