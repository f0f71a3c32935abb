-- Closes a loan in the lending bucket's journal, once: with ARGV[2] = 1 the
-- units come back to this bucket (the borrower never had them), with 0 the
-- borrower has them. A lender whose state is missing takes nothing back: its
-- rebuild counts every unit PostgreSQL has left.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 lent
-- ARGV: 1 loan id, 2 repay (1 or 0)
-- Returns the units given back to this bucket.
local entry = redis.call('HGET', KEYS[3], ARGV[1])
if not entry then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[2] ~= '1' or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local units = tonumber(string.match(entry, '^[^\n]*\n(%d+)\n'))
redis.call('INCRBY', KEYS[2], units)
return units
