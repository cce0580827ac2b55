-- ARGV: prefix, room, user, connection. Returns the edge ('version count'), '' when none crossed, or
-- an error when the connection is not registered.
local room, user, conn = ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', p .. ':conn:' .. conn, 'user') ~= user then
  return redis.error_reply('connection ' .. conn .. ' of ' .. user .. ' is not registered')
end
redis.call('SADD', p .. ':conn-rooms:' .. conn, room)
local member = p .. ':member:' .. room .. ':' .. user
if redis.call('SADD', member, conn) == 1 and redis.call('SCARD', member) == 1 then
  local set = p .. ':room:' .. room
  redis.call('ZADD', set, 0, user)
  return edge_of(set)
end
return ''
