-- Publishes a group message once to every other node that has members in the group: Redis work
-- in proportion to those nodes, not to the members. A node that no longer listens (PUBLISH
-- reached nobody: it died, or its subscription is being re-made and it will register again) is
-- taken out of the group.
--
-- KEYS[1] the group's nodes; ARGV: this node, the node topic prefix, the payload.
-- Returns how many nodes got it.
local sent = 0
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if node ~= ARGV[1] then
    if redis.call('PUBLISH', ARGV[2] .. node, ARGV[3]) == 0 then
      redis.call('ZREM', KEYS[1], node)
    else
      sent = sent + 1
    end
  end
end
return sent
