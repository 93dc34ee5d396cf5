-- Publish one revoked API key to every gateway process (they poll with revocations.lua).
-- KEYS: 1 sequence counter, 2 sorted set of revoked key ids scored by sequence. ARGV: 1 key id, 2 how many to keep.
-- Answers the revocation's sequence number.
local n = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], n, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
return n
