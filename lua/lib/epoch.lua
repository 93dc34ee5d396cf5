-- This master's epoch (DESIGN §5): its run id, which changes on every restart, and its replication id,
-- which changes on every promotion (a master demoted, resynced and promoted again keeps its run id but
-- holds what its replacement had). Either changing means Redis may have lost data.
-- `epoch()` answers it and the seconds it has lasted at least: the run id began with the server
-- (uptime_in_seconds), and so did the replication id while none replaced it since (second_repl_offset
-- is -1); after a promotion INFO does not tell when it began, so 0. Where scripts cannot call INFO (the
-- embedded emulation: it lives and dies with its process) it answers "", 0.
local function epoch()
  local server, replication = redis.pcall('INFO', 'server'), redis.pcall('INFO', 'replication')
  if type(server) ~= 'string' or type(replication) ~= 'string' then return '', 0 end
  local id = (string.match(server, 'run_id:(%x+)') or '') .. ':' .. (string.match(replication, 'master_replid:(%x+)') or '')
  local age = 0
  if string.match(replication, 'second_repl_offset:(%-?%d+)') == '-1' then
    -- Whole seconds from a start time cut to its second: up to 1 s more than the true age, so less that.
    age = math.max(0, tonumber(string.match(server, 'uptime_in_seconds:(%d+)') or '0') - 1)
  end
  return id, age
end
