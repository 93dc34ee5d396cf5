-- Drop pending events the record holds: from the head, at most ARGV[1] of them, each at or before the
-- mark of the last one recorded (ARGV[2] its seq, ARGV[3] its time in ms). Events a concurrent ack
-- dropped first are not there any more; the ones after the mark stay. KEYS: 1 pending events list.
--#include args
local count, seq, at = whole_arg(1, 0), whole_arg(2), whole_arg(3)
local dropped = 0
while dropped < count do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local e = cjson.decode(head)
  if e.seq > seq or e.at > at then break end
  redis.call('LPOP', KEYS[1])
  dropped = dropped + 1
end
return dropped
