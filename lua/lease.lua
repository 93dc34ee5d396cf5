-- A lease on KEYS[1] (SET NX PX, renewed by its holder). ARGV: 1 holder, 2 lifetime in ms (0 gives it
-- back). Answers 1 while ARGV[1] holds the lease, 0 otherwise.
--#include args
local ttl = whole_arg(2, 0)
text_arg(1)
local holder = redis.call('GET', KEYS[1])
if ttl == 0 then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
