-- The status of one billable (DESIGN §3 status body), read only, by the rules decide.lua applies.
-- The protocol is gateway/state/status.py (StatusArgs, StatusReply); the spec is StatusSpec.
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash.
-- ARGV: 1 status spec (JSON: every limit, rate limit and the credits of the plan), 2 the caller's plan
--       version, 3 calendar bounds (lib/args.lua's bounds_arg), 4 "1" when missing state must be restored first.
--#include rules
--#include args
local S, HOLDS = KEYS[1], KEYS[3]
local spec = cjson.decode(ARGV[1])
local raw = redis.call('HGETALL', S)
local F = {}
for i = 1, #raw, 2 do F[raw[i]] = raw[i + 1] end

local pv = tonumber(F.pv) or 0
if pv ~= tonumber(ARGV[2]) then
  return {'stale', pv, F.asg or false, F.sub or false, F.ov or false, F.sus or false}
end
if ARGV[4] == '1' and not F.hyd then
  return {'missing'}
end

local bounds = bounds_arg(3)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bp_s, bp_e = tonumber(F.bp_s), tonumber(F.bp_e)

-- Limits: {name, usage, window start, window end, grace end, grace active, blocked, billed units}; false for none.
local limits = {}
for _, l in ipairs(spec.l) do
  local n, to, p, after, grace = l[1], l[2], l[3], l[4], l[5]
  local usage = tonumber(F['u:' .. n]) or 0
  local grace_at = tonumber(F['g:' .. n])
  local blocked_once = F['b:' .. n] == '1'
  local ws, we = false, false
  if p ~= '' then
    ws, we = window_of(p, now, bounds, bp_s, bp_e)
    if tonumber(F['w:' .. n]) ~= ws then usage, grace_at, blocked_once = 0, nil, false end
  end
  local grace_ends = false
  if grace_at then grace_ends = grace_at + grace end
  local over = to >= 0 and usage >= to
  local grace_active = grace_ends and now < grace_ends and to >= 0 and usage > to
  local blocked = false
  if after == 'w' or to < 0 then
    blocked = false
  elseif after == 'g' then
    blocked = over and not grace_active and (grace_at ~= nil or blocked_once)
  else
    blocked = over
  end
  -- after_limit = "bill" (l[6] its meter, l[7] the spend cap in units): blocked at the cap, not at `to`.
  local billed = false
  if after == 'o' then
    billed = tonumber(F['o:' .. l[6] .. '|' .. ws]) or 0
    blocked = l[7] >= 0 and billed >= l[7]
  end
  limits[#limits + 1] = {n, usage, ws, we, grace_ends, grace_active and 1 or 0, blocked and 1 or 0, billed}
end

-- Credits: {period left (false: unlimited), purchased, debt, held by unsettled holds, period end}.
local cr = spec.cr
local ws, we = window_of(cr.p, now, bounds, bp_s, bp_e)
local spent, purchased, debt = credits_in(ws, tonumber(F['c:w']), cr.a, cr.ro == 1,
  tonumber(F['c:s']) or 0, tonumber(F['c:p']) or 0, tonumber(F['c:d']) or 0)
local held = 0
local holds = redis.call('HGETALL', HOLDS)
for i = 2, #holds, 2 do
  local hold = cjson.decode(holds[i])
  if (tonumber(hold.exp) or 0) > now then held = held + (tonumber(hold.cp) or 0) + (tonumber(hold.cb) or 0) end
end
local credits = {period_left(cr.a, spent) or false, purchased, debt, held, we}

-- Rate limits: {name, requests admitted now, when the cell is empty (ms)}.
local rates = {}
for _, r in ipairs(spec.r) do
  local tat = gcra_tat(F['r:' .. r[1]], now)
  rates[#rates + 1] = {r[1], math.max(0, math.min(r[3], gcra_available(tat, now, r[2], r[3]))), tat}
end

-- Pay-as-you-go: {meter, units billed this month, window start, window end}, decide.lua's `o:<meter>|<window>`.
local payg = {}
local ms, me = window_of('m', now, bounds, bp_s, bp_e)
for _, m in ipairs(spec.pg or {}) do
  payg[#payg + 1] = {m, tonumber(F['o:' .. m .. '|' .. ms]) or 0, ms, me}
end

return {now, limits, credits, rates, payg}
