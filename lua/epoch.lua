-- This master's epoch (lib/epoch.lua); with ARGV[1] = 'age', {epoch, the seconds it has lasted at least}.
-- KEYS: none, or a key of the slot whose master is asked (Redis Cluster routes the call by it).
--#include epoch
local id, age = epoch()
if ARGV[1] == 'age' then return {id, age} end
return id
