-- A user's direct conversations, most recent first: the partner, the newest id, and (unless
-- ARGV[1] is 'heads') the read position and the partner's messages after it.
--
-- KEYS[1] the user's inbox (partners by recency), KEYS[2] partner -> conversation key,
-- KEYS[3] the user's read positions; ARGV: 'heads' or 'inbox', the oldest ts kept
local heads_only = ARGV[1] == 'heads'
local out = {}
for _, partner in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local conversation = redis.call('HGET', KEYS[2], partner)
  if conversation then
    table.insert(out, partner)
    table.insert(out, redis.call('GET', conversation .. ':n') or '0')
    if not heads_only then
      forget_older_than(conversation .. ':s', tonumber(ARGV[2]))
      local read = redis.call('HGET', KEYS[3], conversation) or '0'
      local unread = 0
      for _, entry in ipairs(redis.call('XRANGE', conversation .. ':s', '(' .. read .. '-0', '+')) do
        if entry[2][2] == partner then
          unread = unread + 1
        end
      end
      table.insert(out, read)
      table.insert(out, tostring(unread))
    end
  end
end
return out
