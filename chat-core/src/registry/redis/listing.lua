-- ARGV: prefix, the sorted set to list ('online' or 'room:{room}'). Returns the version the
-- listing is as of, then the users in name order.
local out = {redis.call('GET', p .. ':version') or '0'}
for _, user in ipairs(redis.call('ZRANGE', p .. ':' .. ARGV[2], 0, -1)) do
  table.insert(out, user)
end
return out
