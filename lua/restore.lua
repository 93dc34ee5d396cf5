-- Put back a billable's state from the record, unless Redis already holds it (a concurrent
-- restore, or a decision that raced ahead): the live state always wins. KEYS: 1 state hash.
-- ARGV: field, value, field, value, ...
if redis.call('HEXISTS', KEYS[1], 'hyd') == 1 then return 0 end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
redis.call('HSET', KEYS[1], 'hyd', 1)
return 1
