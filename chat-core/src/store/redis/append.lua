-- Appends a message to a conversation, or finds the earlier copy of a retry, in one atomic step:
-- the id is the conversation's counter plus one, the message goes into the conversation's stream
-- under that id, and the ref is remembered; so ids are dense, and visible in id order.
--
-- KEYS[1] the conversation's counter, KEYS[2] its stream, KEYS[3] the ref's key
-- ARGV: from, to ('' for a room), body, ts, dedup window (ms), retention, has ref ('1'/'0'),
--       direct ('1'/'0'), the store's key prefix, the conversation's key, the oldest ts kept
local counter, stream, refkey = KEYS[1], KEYS[2], KEYS[3]
local from, to, body, ts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local window, retention = tonumber(ARGV[5]), ARGV[6]
-- No window: no ref is remembered, and nothing is a retry.
local has_ref, direct = ARGV[7] == '1' and window > 0, ARGV[8] == '1'

if has_ref then
  local earlier = redis.call('GET', refkey)
  if earlier then
    local space = string.find(earlier, ' ', 1, true)
    local id = string.sub(earlier, 1, space - 1)
    local first_ts = string.sub(earlier, space + 1)
    if tonumber(first_ts) + window > tonumber(ts) then
      local entries = redis.call('XRANGE', stream, id .. '-0', id .. '-0')
      if #entries > 0 then
        local fields = entries[1][2]
        return {'dup', id, fields[2], fields[4], fields[6], fields[8]}
      end
      -- Retention dropped the original; the retry carries the same content.
      return {'dup', id, from, to, body, first_ts}
    end
  end
end

local id = tostring(redis.call('INCR', counter))
redis.call('XADD', stream, 'MAXLEN', retention, id .. '-0', 'f', from, 't', to, 'b', body, 'ts', ts)
forget_older_than(stream, tonumber(ARGV[11]))
if has_ref then
  redis.call('SET', refkey, id .. ' ' .. ts, 'PX', window)
end
if direct then
  local prefix, conversation = ARGV[9], ARGV[10]
  local recency = redis.call('INCR', prefix .. ':appends')
  redis.call('ZADD', prefix .. ':inbox:' .. from, recency, to)
  redis.call('ZADD', prefix .. ':inbox:' .. to, recency, from)
  redis.call('HSET', prefix .. ':dm:' .. from, to, conversation)
  redis.call('HSET', prefix .. ':dm:' .. to, from, conversation)
end
return {'new', id, from, to, body, ts}
