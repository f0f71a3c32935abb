-- Finishes rebuilding a bucket's admission state from an inventory snapshot
-- whose pieces are written (rebuild_begin.lua, rebuild_part.lua): applies the
-- events parked meanwhile that the snapshot does not contain, sets the tokens
-- and makes the state ready (proto/README.md, "Known limits": Redis is a cache).
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 held, 4 inflight, 5 applied, 6 parked, 7 rebuilding
-- ARGV: 1 rebuild token, 2 item version, 3 stock tokens for this bucket
-- Returns 1 if rebuilt, 0 if the lease was lost (nothing changed).
if redis.call('GET', KEYS[7]) ~= ARGV[1] then
  return 0
end
local version, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local parked = redis.call('HGETALL', KEYS[6])
for j = 1, #parked, 2 do
  local mark = parked[j]
  local order = string.match(mark, '^(.*):[A-Z_]+$')
  local fields = {}
  for field in string.gmatch(parked[j + 1] .. '\n', '([^\n]*)\n') do
    fields[#fields + 1] = field
  end
  local user, quantity, status = fields[1], tonumber(fields[2]), fields[3]
  local units, event_version = tonumber(fields[5]), tonumber(fields[6])
  redis.call('SADD', KEYS[5], mark)
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
redis.call('DEL', KEYS[6], KEYS[7])
redis.call('SET', KEYS[2], tokens)
redis.call('HSET', KEYS[1], 'version', version)
return 1
