-- Shared by the registry's scripts. ARGV[1] is always the registry's key prefix.
--
-- Keys: {p}:version (the edge counter), {p}:nodes (node -> lease end, ms), {p}:node:{node} (its
-- connections), {p}:conn:{conn} (hash: node, user), {p}:conn-rooms:{conn}, {p}:user:{user} (the
-- user's connections), {p}:online (users, all score 0, so ordered by name), {p}:room:{room}
-- (members, likewise), {p}:member:{room}:{user} (the user's connections in the room),
-- {p}:count-claim:{room} (a pending member-count announcement, with a TTL).
local p = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function next_version()
  return tostring(redis.call('INCR', p .. ':version'))
end

-- An edge as scripts return it: 'version count', the count of the set after the change.
local function edge_of(set)
  return next_version() .. ' ' .. redis.call('ZCARD', set)
end

-- Takes a connection out of a room; the edge ('version count') when it was the user's last there.
local function leave_room(room, user, conn)
  redis.call('SREM', p .. ':conn-rooms:' .. conn, room)
  local member = p .. ':member:' .. room .. ':' .. user
  if redis.call('SREM', member, conn) == 1 and redis.call('SCARD', member) == 0 then
    local set = p .. ':room:' .. room
    redis.call('ZREM', set, user)
    return edge_of(set)
  end
  return nil
end

-- Removes a connection and everything it holds, appending the edges it crossed to `out` as
-- 'L', room, user, 'version count' and 'O', user, version.
local function remove_connection(conn, out)
  local info = redis.call('HMGET', p .. ':conn:' .. conn, 'node', 'user')
  local node, user = info[1], info[2]
  if not node then
    return
  end
  for _, room in ipairs(redis.call('SMEMBERS', p .. ':conn-rooms:' .. conn)) do
    local version = leave_room(room, user, conn)
    if version then
      table.insert(out, 'L')
      table.insert(out, room)
      table.insert(out, user)
      table.insert(out, version)
    end
  end
  redis.call('DEL', p .. ':conn:' .. conn, p .. ':conn-rooms:' .. conn)
  redis.call('SREM', p .. ':node:' .. node, conn)
  local connections = p .. ':user:' .. user
  if redis.call('SREM', connections, conn) == 1 and redis.call('SCARD', connections) == 0 then
    redis.call('ZREM', p .. ':online', user)
    table.insert(out, 'O')
    table.insert(out, user)
    table.insert(out, next_version())
  end
end
