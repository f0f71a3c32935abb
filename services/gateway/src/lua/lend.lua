-- Lends units of this stock bucket to a bucket of the same item that has too
-- few, for one purchase attempt there (services/DESIGN.md, "Hot items: stock
-- buckets"): as many as it has, up to the units asked, so that an attempt can
-- gather what it needs from several lenders.
-- The loan is journaled here until the borrower is known to have the units
-- (admit.lua's credit, or receive.lua from the reconciler's sweep), so a
-- gateway that dies between the two scripts strands nothing.
-- Idempotent per loan id: a Redis Cluster client sends a command again when a
-- dropped connection lost its reply, and the second run must not take the
-- units twice while the journal records them once.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 lent
-- ARGV: 1 loan id, 2 units wanted, 3 borrower bucket, 4 now (unix ms)
-- Returns {NOT_READY, 0} (this bucket's state is missing) or {LENT, units lent}
-- (0: this bucket is dry).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_READY', 0}
end
local earlier = redis.call('HGET', KEYS[3], ARGV[1])
if earlier then
  return {'LENT', tonumber(string.match(earlier, '^[^\n]*\n(%d+)\n'))}
end
local units = math.min(tonumber(ARGV[2]), tonumber(redis.call('GET', KEYS[2]) or '0'))
if units <= 0 then
  return {'LENT', 0}
end
redis.call('DECRBY', KEYS[2], units)
redis.call('HSET', KEYS[3], ARGV[1], table.concat({ARGV[3], tostring(units), ARGV[4]}, '\n'))
return {'LENT', units}
