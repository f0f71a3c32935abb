-- Rebuilds an item's admission state from an inventory snapshot, unless another
-- gateway got there first, then applies the events parked meanwhile that the
-- snapshot does not contain (README, "Known limits": Redis is a cache).
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 held, 4 inflight, 5 admitted, 6 applied, 7 parked, 8 idem
-- ARGV: 1 item version, 2 stock remaining, 3 holdings count n,
--       then n triples: user, quantity held, in-flight order id ('' if none),
--       then a count m and m pairs: idem field (user\nkey), value (order|quantity)
--       of every key inventory has recorded (kept where Redis still has one)
-- Returns 1 if rebuilt, 0 if the state was present already.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local version, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local user, held, inflight = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if held > 0 then
    redis.call('HSET', KEYS[3], user, held)
  end
  if inflight ~= '' then
    redis.call('HSET', KEYS[4], user, inflight)
  end
  i = i + 3
end
local keys = tonumber(ARGV[i])
i = i + 1
for _ = 1, keys do
  redis.call('HSETNX', KEYS[8], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local parked = redis.call('HGETALL', KEYS[7])
for j = 1, #parked, 2 do
  local mark = parked[j]
  local order = string.match(mark, '^(.*):[A-Z_]+$')
  local fields = {}
  for field in string.gmatch(parked[j + 1] .. '\n', '([^\n]*)\n') do
    fields[#fields + 1] = field
  end
  local user, quantity, status = fields[1], tonumber(fields[2]), fields[3]
  local units, event_version = tonumber(fields[5]), tonumber(fields[6])
  redis.call('SADD', KEYS[6], mark)
  if redis.call('HGET', KEYS[4], user) == order then
    redis.call('HDEL', KEYS[4], user)
  end
  if event_version > version and (status == 'REJECTED' or status == 'REFUNDED') and units > 0 then
    tokens = tokens + units
    if redis.call('HINCRBY', KEYS[3], user, -quantity) <= 0 then
      redis.call('HDEL', KEYS[3], user)
    end
  end
end
redis.call('DEL', KEYS[7])
redis.call('SET', KEYS[2], tokens)
redis.call('HSET', KEYS[1], 'version', version)
return 1
