-- Moves a read position forward, never back. Ids are compared as decimal strings, so that any
-- u64 a client sends keeps its exact value (Lua numbers are doubles).
--
-- KEYS[1] the user's read positions; ARGV: the conversation's key, the id read up to
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return false
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
if greater(ARGV[2], current) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return ARGV[2]
end
return current
