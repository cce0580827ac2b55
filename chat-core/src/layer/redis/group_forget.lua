-- Takes this node out of a group, unless it was added again since it found itself without
-- members there (each add gives the node a new, larger score).
--
-- KEYS[1] the group's nodes; ARGV: this node, the score of the add that is now void.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
