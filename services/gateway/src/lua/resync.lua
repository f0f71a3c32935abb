-- Raises an item's tokens to what PostgreSQL can still sell when nothing is in
-- flight. Needed because a SOLD_OUT rejection of a multi-unit order keeps all
-- its tokens consumed even if Redis was over by fewer units, which can leave
-- units on sale in PostgreSQL that Redis no longer offers. Never lowers tokens:
-- PostgreSQL judges every order anyway.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 admitted
-- ARGV: 1 the tokens this bucket should offer at least: PostgreSQL's stock
--       remaining (read just before this call) less what the item's other
--       buckets offer (the gateway checked none has anything in flight)
-- Returns the number of tokens added.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HLEN', KEYS[3]) > 0 then
  return 0
end
local remaining = tonumber(ARGV[1])
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if remaining > tokens then
  redis.call('SET', KEYS[2], remaining)
  return remaining - tokens
end
return 0
