-- A page of a conversation, oldest first, read together with the conversation's newest id.
--
-- KEYS[1] the conversation's counter, KEYS[2] its stream
-- ARGV: 'before' or 'after', the bound ('' for the newest, with 'before'), the limit, the
--       oldest ts kept
-- Returns: newest id, more (1/0), then id, from, to, body, ts for each message.
forget_older_than(KEYS[2], tonumber(ARGV[4]))
local last = redis.call('GET', KEYS[1]) or '0'
local limit = tonumber(ARGV[3])
local entries
if ARGV[1] == 'after' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', limit + 1)
elseif ARGV[2] == '0' then
  entries = {}
else
  local upper = '+'
  if ARGV[2] ~= '' then
    upper = '(' .. ARGV[2] .. '-0'
  end
  entries = redis.call('XREVRANGE', KEYS[2], upper, '-', 'COUNT', limit + 1)
end
local more = '0'
if #entries > limit then
  more = '1'
  table.remove(entries)
end
local out = {last, more}
local first, final, step = 1, #entries, 1
if ARGV[1] ~= 'after' then
  first, final, step = #entries, 1, -1
end
for i = first, final, step do
  local entry = entries[i]
  local fields = entry[2]
  table.insert(out, string.sub(entry[1], 1, -3))
  table.insert(out, fields[2])
  table.insert(out, fields[4])
  table.insert(out, fields[6])
  table.insert(out, fields[8])
end
return out
