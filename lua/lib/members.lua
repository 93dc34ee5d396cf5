-- A billable's members (a team, a key) decided with it in the same script (included by `--#include members`):
-- each level below the root has its own state hash (KEYS[4], KEYS[5], nearest member first, under the
-- root's hash tag) and its own terms: a rate limit, credits per period, limits. The protocol is
-- gateway/budgets.py (MemberSpec); the root's own decision is decide.lua's, unchanged.
-- Needs rules (window_of, gcra_*) and args (bad_arg, add_to).

-- The members argument: "" for none, else a JSON list of levels
-- {id, lv (the level's word: "key" or "team"), r = {interval ms, burst, window s} or absent,
--  c = {allowance, period code} or absent, l = {name = {to, period code ("" for a cap)}}}.
local function members_arg(i, key_count)
  local text = ARGV[i]
  if (text == nil or text == '') and key_count == 3 then return {} end
  if type(text) ~= 'string' then bad_arg(i, 'a JSON list of member levels') end
  local ok, levels = pcall(cjson.decode, text)
  if not ok or type(levels) ~= 'table' or #levels ~= key_count - 3 then
    bad_arg(i, 'a JSON list of member levels, one per key after the third')
  end
  for _, m in ipairs(levels) do
    if type(m.id) ~= 'string' or type(m.lv) ~= 'string' then bad_arg(i, 'member levels with an id and a level') end
    if m.r and (type(m.r[1]) ~= 'number' or type(m.r[2]) ~= 'number') then bad_arg(i, 'a member rate {interval, burst, window}') end
    if m.c and (type(m.c[1]) ~= 'number' or type(m.c[2]) ~= 'string') then bad_arg(i, 'member credits {allowance, period}') end
    if m.l and type(m.l) ~= 'table' then bad_arg(i, 'member limits {name = {to, period}}') end
  end
  return levels
end

-- The usage history's counters (gateway/state/fields.py): requests, units, credits, would-be denials in shadow.
local USAGE_COUNTERS = {'qr:', 'qu:', 'qc:', 'qs:'}

-- The rest is made only for a call with member levels: a script makes a closure per call for every
-- function it defines, and most decisions and settles have none (`members_lib()` makes them once).
local function members_lib()
  -- Every member level against its own terms, as if the request were admitted. `cost`: the credits the
  -- request costs; `limits`: the root spec's limits (lib/spec.lua: [1] name, [3] units). Answers what
  -- decide.lua folds in: violations, policies as after an admission and as before it (what a denial shows), the
  -- writes of each level, and the hold (what settle gives back at each level).
  local function members_decide(levels, now, bounds, cost, limits, window)
    local out = {violations = {}, after = {}, before = {}, writes = {}, hold = {}}
    for i, m in ipairs(levels) do
      local key = KEYS[3 + i]
      local lv = m.lv
      local fields = {}
      if m.r then fields[#fields + 1] = 'r:rate' end
      if m.c then fields[#fields + 1] = 'c:w'; fields[#fields + 1] = 'c:s' end
      for _, l in ipairs(limits) do
        if m.l and m.l[l[1]] then fields[#fields + 1] = 'u:' .. l[1]; fields[#fields + 1] = 'w:' .. l[1] end
      end
      local F = {}
      if #fields > 0 then
        local values = redis.call('HMGET', key, unpack(fields))
        for j, f in ipairs(fields) do F[f] = values[j] end
      end
      local writes = {}
      local held = {id = m.id, c = 0, w = 0, l = {}}
      local function set(f, v) writes[#writes + 1] = f; writes[#writes + 1] = v end
      local function policy(after, before) out.after[#out.after + 1] = after; out.before[#out.before + 1] = before end
      local function violate(v) out.violations[#out.violations + 1] = v end

      if m.r then
        local interval, burst, w = m.r[1], m.r[2], m.r[3]
        local name = lv .. '-rate'
        local tat = gcra_tat(F['r:rate'], now)
        local new_tat = tat + interval
        local allow_at = new_tat - burst * interval
        local was = {name, 'rate', burst, w, math.max(0, gcra_available(tat, now, interval, burst)), math.max(0, math.ceil((tat - now) / 1000))}
        if allow_at > now then
          violate({name, 'rate', math.max(1, math.ceil((allow_at - now) / 1000)), false, false, false, false})
          policy(was, was)
        else
          set('r:rate', new_tat)
          policy({name, 'rate', burst, w, math.max(0, gcra_available(new_tat, now, interval, burst)),
            math.max(0, math.ceil((new_tat - now) / 1000))}, was)
        end
      end

      for _, l in ipairs(limits) do
        local term = m.l and m.l[l[1]]
        if term then
          local to, p = term[1], term[2]
          local name = lv .. '-' .. l[1]
          local usage = tonumber(F['u:' .. l[1]]) or 0
          local ws, we = 0, nil
          if p ~= '' then
            ws, we = window(p)
            if tonumber(F['w:' .. l[1]]) ~= ws then usage = 0; set('w:' .. l[1], ws) end
          end
          local kind = p == '' and 'cap' or 'allow'
          local reset, w = false, false
          if we then reset = math.max(1, math.ceil((we - now) / 1000)); w = math.floor((we - ws) / 1000) end
          local was = {name, kind, to, w, math.max(0, to - usage), reset}
          if usage + l[3] > to then
            violate({name, l[3] > to and 'size' or kind, p ~= '' and reset or false, usage, to, l[3], false})
            policy(was, was)
          else
            set('u:' .. l[1], usage + l[3])
            held.l[#held.l + 1] = {l[1], l[3], ws}
            policy({name, kind, to, w, to - usage - l[3], reset}, was)
          end
        end
      end

      if m.c then
        local allowance, p = m.c[1], m.c[2]
        local name = lv .. '-credits'
        local ws, we = window(p)
        local spent = tonumber(F['c:s']) or 0
        if tonumber(F['c:w']) ~= ws then spent = 0; set('c:w', ws) end
        local reset = math.max(1, math.ceil((we - now) / 1000))
        local w = math.floor((we - ws) / 1000)
        local left = math.max(0, allowance - spent)
        local was = {name, 'allow', allowance, w, left, reset}
        if cost > 0 and cost > left then
          violate({name, 'credits', reset, spent, allowance, cost, left})
          policy(was, was)
        else
          set('c:s', spent + cost)
          held.c, held.w = cost, ws
          policy({name, 'allow', allowance, w, left - cost, reset}, was)
        end
      end
      out.writes[i] = writes
      out.hold[i] = held
    end
    return out
  end

  -- The usage history of the `count` member levels (KEYS[4] on) changes as its root's did: `counted` holds
  -- the root's changes, in USAGE_COUNTERS' order, under `usage_key`. (A key after them is not a level's:
  -- decide.lua's idempotency record.)
  local function members_usage(count, usage_key, counted)
    for i = 1, count do
      for j, prefix in ipairs(USAGE_COUNTERS) do
        if counted[j] ~= 0 then add_to(KEYS[3 + i], prefix .. usage_key, counted[j]) end
      end
    end
  end

  -- An admission's writes at every member level, and its usage history (as the root's: `counted`). The
  -- root's hash names each member hash (`mb:<id>`: its key), so that snapshot.lua finds them for the record
  -- and a restore puts them back with the root.
  local function members_commit(levels, decided, usage_key, counted)
    for i = 1, #levels do
      local writes = decided.writes[i]
      if #writes > 0 then redis.call('HSET', KEYS[3 + i], unpack(writes)) end
      redis.call('HSET', KEYS[1], 'mb:' .. levels[i].id, KEYS[3 + i])
    end
    members_usage(#levels, usage_key, counted)
  end

  -- settle.lua's give-back at every member level, from the hold's `m` (decoded, one entry per KEYS[4..]):
  -- limit units back when `back`, and the credits moved to what is owed (`owed` nil keeps them); the usage
  -- history changed as the root's (`counted`, under `usage_key`).
  local function members_settle(held, back, owed, usage_key, counted)
    members_usage(#held, usage_key, counted)
    for i, m in ipairs(held) do
      local key = KEYS[3 + i]
      if back then
        for _, l in ipairs(m.l or {}) do
          local n, units, ws = l[1], l[2], l[3]
          if ws == 0 or tonumber(redis.call('HGET', key, 'w:' .. n)) == ws then
            local usage = math.max(0, (tonumber(redis.call('HGET', key, 'u:' .. n)) or 0) - units)
            redis.call('HSET', key, 'u:' .. n, usage)
          end
        end
      end
      if owed and owed ~= m.c and (m.w or 0) ~= 0 and tonumber(redis.call('HGET', key, 'c:w')) == m.w then
        local spent = math.max(0, (tonumber(redis.call('HGET', key, 'c:s')) or 0) + owed - m.c)
        redis.call('HSET', key, 'c:s', spent)
      end
    end
  end

  -- A persistent cap released at every member level that counts it as a cap.
  local function members_release(limit, units)
    for i = 4, #KEYS do
      local usage = tonumber(redis.call('HGET', KEYS[i], 'u:' .. limit))
      if usage and redis.call('HEXISTS', KEYS[i], 'w:' .. limit) == 0 then
        redis.call('HSET', KEYS[i], 'u:' .. limit, math.max(0, usage - units))
      end
    end
  end

  return {decide = members_decide, commit = members_commit, settle = members_settle, release = members_release}
end
