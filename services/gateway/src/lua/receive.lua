-- Credits a loan's units to the borrowing bucket unless it has them already:
-- the reconciler's sweep of a loan whose attempt never came back to close it.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 received
-- ARGV: 1 loan id, 2 units
-- Returns NOT_READY (the borrower's state is missing: repay the lender instead),
-- RECEIVED (credited now) or ALREADY (credited before).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'NOT_READY'
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  return 'ALREADY'
end
redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]))
return 'RECEIVED'
