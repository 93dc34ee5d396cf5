-- The published catalog's version, announced to every gateway process (they poll it about once a second).
-- KEYS[1] the announcement (a hash; field `v` the version), ARGV[1] a version just published.
-- Raised, never lowered: two publishers whose announcements arrive out of order leave the newer one.
-- Answers the version announced now, as a string.
--#include args
local version = whole_arg(1, 1)
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0
if version > current then
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
  return ARGV[1]
end
return tostring(current)
