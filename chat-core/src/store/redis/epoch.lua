-- The store's epoch, made once: a Redis that lost its data (restarted without persistence) makes
-- a new one on first use, because its ids start again.
--
-- KEYS[1] the epoch; ARGV[1] a fresh one, used if there is none
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
