-- Put back a billable's state from the record. Fields Redis already holds are live and win (a change
-- made while the state was missing, or a concurrent restore). KEYS: 1 state hash.
-- ARGV: field, value, field, value, ...
if redis.call('HEXISTS', KEYS[1], 'hyd') == 1 then return 0 end
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'hyd', 1)
return 1
