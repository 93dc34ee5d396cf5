-- Arguments are checked before a script's first write (included by `--#include args`), so a script never
-- fails half-way: a bad one is an error reply naming it, and nothing was written. Python bounds what it
-- sends (gateway/bounds.py); these are the last line, for a caller that did not.
local MAX_INT = 9007199254740991  -- 2^53 - 1: every number Redis, Lua and JSON clients hold exactly

local function bad_arg(i, what)
  error('argument ' .. i .. ' is not ' .. what .. ': ' .. string.sub(tostring(ARGV[i]), 1, 40))
end

-- ARGV[i] as a whole number within [low, high] (default ±(2^53 - 1)); with `blank`, "" answers nil.
local function whole_arg(i, low, high, blank)
  local v = ARGV[i]
  if blank and v == '' then return nil end
  local n = tonumber(v)
  low, high = low or -MAX_INT, high or MAX_INT
  if not n or n ~= math.floor(n) or n < low or n > high then  -- NaN fails n == floor(n)
    bad_arg(i, string.format('an integer from %.0f to %.0f', low, high))
  end
  return n
end

-- ARGV[i] as a string, one of the `allowed` (a set) when given.
local function text_arg(i, allowed)
  local v = ARGV[i]
  if type(v) ~= 'string' or (allowed and not allowed[v]) then bad_arg(i, 'one of the values the protocol names') end
  return v
end

-- ARGV[i] as a JSON object or array.
local function json_arg(i)
  local ok, v = pcall(cjson.decode, text_arg(i))
  if not ok or type(v) ~= 'table' then bad_arg(i, 'a JSON object') end
  return v
end

-- ARGV[i] as the calendar bounds (gateway/engine Engine._calendar): "m:<4 integers>;w:<4>;d:<4>", the candidate
-- windows {previous start, start, next start, next end} (Unix seconds) of the month, the week and the day,
-- as window_of reads them (bounds[code]). A code is read when first asked for (a decision needs one or two of
-- the three; each number read costs a strtod); `eager` reads all three now, for a script that asks after
-- its first write.
local BOUND = ':(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+)'
local function bounds_arg(i, eager)
  local text = text_arg(i)
  local bounds = setmetatable({}, {__index = function(known, code)
    if code ~= 'm' and code ~= 'w' and code ~= 'd' then return nil end
    local a, b, c, d = string.match(text, code .. BOUND)
    if not d then bad_arg(i, 'calendar bounds "m:<4 integers>;w:<4>;d:<4>" with ' .. code) end
    local found = {tonumber(a), tonumber(b), tonumber(c), tonumber(d)}
    rawset(known, code, found)
    return found
  end})
  if eager then local _ = bounds.m, bounds.w, bounds.d end
  return bounds
end

-- A counter `field` of hash `key` plus `delta`, kept within ±(2^53 - 1): HINCRBY fails past 2^63 (and on a
-- value it cannot read as an integer), after the writes before it.
local function add_to(key, field, delta)
  local n = (tonumber(redis.call('HGET', key, field)) or 0) + delta
  if n > MAX_INT then n = MAX_INT elseif n < -MAX_INT then n = -MAX_INT end
  redis.call('HSET', key, field, n)
  return n
end
