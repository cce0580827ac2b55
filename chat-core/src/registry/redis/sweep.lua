-- ARGV: prefix. Removes every connection of every node whose lease has ended; returns the edges
-- crossed. Atomic, so each edge is reported to exactly one sweeping node.
local out = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', p .. ':nodes', '-inf', now_ms())) do
  redis.call('ZREM', p .. ':nodes', node)
  for _, conn in ipairs(redis.call('SMEMBERS', p .. ':node:' .. node)) do
    remove_connection(conn, out)
  end
  redis.call('DEL', p .. ':node:' .. node)
end
return out
