-- The API keys revoked after sequence number ARGV[1] (-1: none wanted, only the current number), and the
-- epoch of this master (lib/epoch.lua), read in the same script: a loss between the two is never missed.
-- KEYS: as revoke.lua. Answers {current sequence, 'ok' | 'reset', epoch, key ids...}: 'reset' when the
-- caller cannot know what it missed (Redis lost the feed, or it kept fewer than were revoked since), so it
-- must forget every key it trusts.
--#include epoch
local at = epoch()
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
if since < 0 or n == since then return {n, 'ok', at} end
if n < since then return {n, 'reset', at} end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #oldest == 0 or tonumber(oldest[2]) > since + 1 then return {n, 'reset', at} end
local reply = {n, 'ok', at}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf')) do reply[#reply + 1] = id end
return reply
