-- ARGV: prefix, the sorted set to list ('online' or 'room:{room}'), the name to list after ('' for
-- the start), the most names to return. Returns the version the listing is as of, the set's size,
-- then up to limit + 1 names in name order (one more than asked says whether more follow).
local set = p .. ':' .. ARGV[2]
local from = '-'
if ARGV[3] ~= '' then
  from = '(' .. ARGV[3]
end
local out = {redis.call('GET', p .. ':version') or '0', tostring(redis.call('ZCARD', set))}
for _, user in ipairs(redis.call('ZRANGEBYLEX', set, from, '+', 'LIMIT', 0, tonumber(ARGV[4]) + 1)) do
  table.insert(out, user)
end
return out
