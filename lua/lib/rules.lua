-- The rules decide.lua and status.lua share (included by `--#include rules`): the window of a period,
-- the credit period's rollover and debt, the GCRA cell. Times in ms.

-- The window [start, end) that contains now, for a period code: m, w, d (candidate calendar windows in
-- `bounds`, seconds), bc (the billing period bp_s..bp_e; a month without one), s<seconds>.
local function window_of(p, now, bounds, bp_s, bp_e)
  if p == 'bc' then
    if bp_s and bp_e and bp_e > bp_s and now >= bp_s then
      if now < bp_e then return bp_s, bp_e end
      -- Renewal not confirmed yet: extend by the period's own length until it is.
      local len = bp_e - bp_s
      local k = math.floor((now - bp_e) / len)
      return bp_e + k * len, bp_e + (k + 1) * len
    end
    p = 'm'
  end
  local b = bounds[p]
  if b then
    local s = now / 1000
    if s < b[2] then return b[1] * 1000, b[2] * 1000 end
    if s < b[3] then return b[2] * 1000, b[3] * 1000 end
    return b[3] * 1000, b[4] * 1000
  end
  local d = tonumber(string.sub(p, 2)) * 1000
  local start = now - now % d
  return start, start + d
end

-- The credits (spent of the allowance, purchased, debt) in window ws, saved in window cw (nil: never):
-- a new window rolls the unspent allowance over into purchased (when the plan says so) and pays the
-- debt from the new allowance first. Answers them and whether the window is new.
local function credits_in(ws, cw, allowance, rollover, spent, purchased, debt)
  if cw == ws then return spent, purchased, debt, false end
  if rollover and allowance > 0 and cw then
    local left = allowance - spent
    if left > 0 then purchased = purchased + left end
  end
  spent = 0
  if debt > 0 and allowance > 0 then
    local pay = math.min(debt, allowance)
    spent, debt = pay, debt - pay
  end
  return spent, purchased, debt, true
end

-- What is left of the allowance in a period (nil: unlimited).
local function period_left(allowance, spent)
  if allowance < 0 then return nil end
  return math.max(0, allowance - spent)
end

-- GCRA: the cell's theoretical arrival time as of now, and how many requests it admits now.
local function gcra_tat(saved, now)
  local tat = tonumber(saved) or now
  if tat < now then tat = now end
  return tat
end

local function gcra_available(tat, now, interval, burst)
  return math.floor((now - (tat - burst * interval)) / interval)
end
