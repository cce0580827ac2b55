-- Shared by the store's scripts.

-- Drops a conversation's oldest messages sent before `oldest` (ms; 0 keeps everything): a
-- prefix of the stream, since messages are in id order, which is time order.
local function forget_older_than(stream, oldest)
  if oldest <= 0 then
    return
  end
  while true do
    local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
    if #entries == 0 then
      return
    end
    for _, entry in ipairs(entries) do
      if tonumber(entry[2][8]) >= oldest then
        return
      end
      redis.call('XDEL', stream, entry[1])
    end
  end
end
