-- Publish one revoked API key to every gateway process (they poll with revocations.lua).
-- KEYS: 1 sequence counter, 2 sorted set of revoked key ids scored by sequence. ARGV: 1 key id, 2 how many to keep.
-- Answers the revocation's sequence number.
--#include args
local id, keep = text_arg(1), whole_arg(2, 1)
local n = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], n, id)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(keep + 1))
return n
