-- ARGV: prefix, room, claim TTL in ms. Returns 1 when the caller now holds the room's pending
-- member-count announcement, 0 when someone else does.
if redis.call('SET', p .. ':count-claim:' .. ARGV[2], '1', 'NX', 'PX', ARGV[3]) then
  return 1
end
return 0
