-- ARGV: prefix, room. Ends the pending member-count announcement and returns the registry version
-- and the room's member count, in one step: every change counted before the release is in it.
redis.call('DEL', p .. ':count-claim:' .. ARGV[2])
return {redis.call('GET', p .. ':version') or '0', tostring(redis.call('ZCARD', p .. ':room:' .. ARGV[2]))}
