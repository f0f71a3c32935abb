-- Undoes an admission whose OrderPlaced certainly never reached the broker (no
-- connection, or the broker refused it), so the units go back on sale and the
-- buyer's retry with the same idempotency key starts afresh.
-- Idempotent: does nothing unless the order's admission record is present.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 tokens, 2 held, 3 inflight, 4 idem, 5 admitted
-- ARGV: 1 order id, 2 user, 3 idempotency key
local record = redis.call('HGET', KEYS[5], ARGV[1])
if not record then
  return 0
end
local quantity = tonumber(string.match(record, '^[^\n]*\n(%d+)\n'))
redis.call('INCRBY', KEYS[1], quantity)
if redis.call('HINCRBY', KEYS[2], ARGV[2], -quantity) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[2])
end
local idem_field = ARGV[2] .. '\n' .. ARGV[3]
local idem = redis.call('HGET', KEYS[4], idem_field)
if idem and string.sub(idem, 1, #ARGV[1]) == ARGV[1] then
  redis.call('HDEL', KEYS[4], idem_field)
end
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
