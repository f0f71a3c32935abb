-- Claims the right to publish an unrecorded admission again, for every gateway
-- at once: an order is republished after the grace, then after twice the grace,
-- four times, up to MAX_FACTOR times, never on every reconciler pass of every
-- gateway. A queue that lags behind (the order is queued, not lost) is thus not
-- sent its whole backlog again and again while it catches up.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 republished (hash: order id -> "attempts:next allowed at ms"), 2 admitted
-- ARGV: 1 order id, 2 now (unix ms), 3 grace (ms), 4 max factor
-- Returns 1 when this caller may publish now, 0 when another publish is recent.
local now = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local attempts = 0
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry then
  local sep = string.find(entry, ':', 1, true)
  attempts = tonumber(string.sub(entry, 1, sep - 1))
  if now < tonumber(string.sub(entry, sep + 1)) then
    return 0
  end
end
local factor = math.min(2 ^ attempts, tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], ARGV[1], (attempts + 1) .. ':' .. string.format('%d', now + grace * factor))
-- Created after the sale ended: expire with the item's other keys.
if redis.call('PTTL', KEYS[1]) == -1 then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
return 1
