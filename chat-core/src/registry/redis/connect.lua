-- ARGV: prefix, node, user, connection. Returns the edge ('version count'), '' when none crossed, or
-- an error when the node holds no lease.
local node, user, conn = ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', p .. ':nodes', node) then
  return redis.error_reply('node ' .. node .. ' holds no lease')
end
if redis.call('EXISTS', p .. ':conn:' .. conn) == 1 then
  return ''
end
redis.call('HSET', p .. ':conn:' .. conn, 'node', node, 'user', user)
redis.call('SADD', p .. ':node:' .. node, conn)
local connections = p .. ':user:' .. user
redis.call('SADD', connections, conn)
if redis.call('SCARD', connections) == 1 then
  redis.call('ZADD', p .. ':online', 0, user)
  return edge_of(p .. ':online')
end
return ''
