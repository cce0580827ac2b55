-- ARGV: prefix, node, lease (ms). Returns 1 when the lease existed (renewed), 0 when made anew.
local existed = redis.call('ZSCORE', p .. ':nodes', ARGV[2])
redis.call('ZADD', p .. ':nodes', now_ms() + tonumber(ARGV[3]), ARGV[2])
if existed then
  return 1
end
return 0
