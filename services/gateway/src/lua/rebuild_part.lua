-- Writes one piece of an inventory snapshot into a bucket being rebuilt, under
-- the rebuild's lease (rebuild_begin.lua), and extends the lease.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 rebuilding, 2 held, 3 inflight, 4 idem
-- ARGV: 1 rebuild token, 2 lease (ms), 3 holdings count n,
--       then n triples: user, quantity held (0: none), in-flight order id ('' if none),
--       then a count m and m pairs: idem field (user\nkey), value (order|quantity)
--       of keys inventory has recorded (kept where Redis still has one)
-- Returns 1, or 0 when the lease is lost (expired, or taken over): stop.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local user, held, inflight = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if held > 0 then
    redis.call('HSET', KEYS[2], user, held)
  end
  if inflight ~= '' then
    redis.call('HSET', KEYS[3], user, inflight)
  end
  i = i + 3
end
local keys = tonumber(ARGV[i])
i = i + 1
for _ = 1, keys do
  redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return 1
