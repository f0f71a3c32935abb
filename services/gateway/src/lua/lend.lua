-- Lends units of this stock bucket to a dry bucket of the same item, for one
-- purchase attempt there (services/DESIGN.md, "Hot items: stock buckets").
-- The loan is journaled here until the borrower is known to have the units
-- (admit.lua's credit, or receive.lua from the reconciler's sweep), so a
-- gateway that dies between the two scripts strands nothing.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 lent
-- ARGV: 1 loan id, 2 units, 3 borrower bucket, 4 now (unix ms)
-- Returns NOT_READY (this bucket's state is missing), DRY, or LENT.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'NOT_READY'
end
local units = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') < units then
  return 'DRY'
end
redis.call('DECRBY', KEYS[2], units)
redis.call('HSET', KEYS[3], ARGV[1], table.concat({ARGV[3], ARGV[2], ARGV[4]}, '\n'))
return 'LENT'
