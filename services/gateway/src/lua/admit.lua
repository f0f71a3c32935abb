-- Admits or refuses one purchase attempt, atomically (services/DESIGN.md, "The purchase path", step 2),
-- in the buyer's stock bucket. Every key is hash-tagged by bucket ({ITEM} or
-- {ITEM/B}) so the script runs on Redis Cluster.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready (a hash: the state's version, the admissions count), 2 tokens, 3 held, 4 inflight, 5 idem, 6 admitted, 7 received
-- ARGV: 1 user, 2 quantity, 3 per-user limit, 4 idempotency key, 5 new order id,
--       6 now (unix ms, for the reconciler),
--       7 loans n, then n pairs: loan id, units another bucket lent this one
--       for this attempt (lend.lua), each credited first, at most once
-- Returns {outcome, detail}:
--   NOT_READY                  the item's admission state is missing: rebuild it first
--   DUPLICATE, "<order>|<qty>" this buyer used this key before
--   IN_PROGRESS, order         the buyer has an unsettled order for this item
--   LIMIT_REACHED
--   SOLD_OUT                   no unit left in this bucket
--   NOT_ENOUGH_STOCK, units    fewer units left than asked for (but some)
--   RESERVED, tokens left      tokens taken; the order is in flight
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_READY', ''}
end
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  if redis.call('SADD', KEYS[7], ARGV[i]) == 1 then
    redis.call('INCRBY', KEYS[2], tonumber(ARGV[i + 1]))
  end
  i = i + 2
end
local user, order = ARGV[1], ARGV[5]
local quantity, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
-- User ids never contain control characters, so a newline separates safely.
local idem_field = user .. '\n' .. ARGV[4]
local prior = redis.call('HGET', KEYS[5], idem_field)
if prior then
  return {'DUPLICATE', prior}
end
local current = redis.call('HGET', KEYS[4], user)
if current then
  return {'IN_PROGRESS', current}
end
local held = tonumber(redis.call('HGET', KEYS[3], user) or '0')
if held + quantity > limit then
  return {'LIMIT_REACHED', ''}
end
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if tokens <= 0 then
  return {'SOLD_OUT', ''}
end
-- A request for more than is left is no sign that nothing is: the units stay
-- on offer to smaller requests, and the buyer learns how many there are.
if tokens < quantity then
  return {'NOT_ENOUGH_STOCK', tostring(tokens)}
end
redis.call('DECRBY', KEYS[2], quantity)
redis.call('HINCRBY', KEYS[3], user, quantity)
redis.call('HSET', KEYS[4], user, order)
redis.call('HSET', KEYS[5], idem_field, order .. '|' .. ARGV[2])
-- Counts admissions, so a gateway's copy of the key holders can tell it is stale.
redis.call('HINCRBY', KEYS[1], 'admissions', 1)
-- user, quantity, admitted-at, key: enough to release it if it is never placed.
redis.call('HSET', KEYS[6], order, table.concat({user, ARGV[2], ARGV[6], ARGV[4]}, '\n'))
return {'RESERVED', tostring(tokens - quantity)}
