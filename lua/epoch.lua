-- This master's epoch (DESIGN §5): its run id, which changes on every restart, and its replication id,
-- which changes on every promotion (a master demoted, resynced and promoted again keeps its run id but
-- holds what its replacement had). Either changing means Redis may have lost data.
-- KEYS: none, or a key of the slot whose master is asked (Redis Cluster routes the call by it).
-- Answers "" where scripts cannot call INFO (the embedded emulation: it lives and dies with its process).
local server, replication = redis.pcall('INFO', 'server'), redis.pcall('INFO', 'replication')
if type(server) ~= 'string' or type(replication) ~= 'string' then return '' end
return (string.match(server, 'run_id:(%x+)') or '') .. ':' .. (string.match(replication, 'master_replid:(%x+)') or '')
