-- Applies a final order state decided by PostgreSQL to the item's admission
-- state, at most once per (order, status) (services/DESIGN.md, "The purchase path", step 5).
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 tokens, 3 held, 4 inflight, 5 admitted, 6 applied, 7 parked
-- ARGV: 1 order id, 2 user, 3 quantity, 4 status, 5 reject reason,
--       6 units released by PostgreSQL, 7 item version after the change
-- Returns PARKED (no admission state: kept for the rebuild), DUPLICATE (applied
-- before), UNCHANGED (nothing to apply, not marked), or APPLIED.
local order, user, status, reason = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local quantity, units, version = tonumber(ARGV[3]), tonumber(ARGV[6]), tonumber(ARGV[7])
local mark = order .. ':' .. status
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- Two copies of one event may differ only in their version (the reconciler's
  -- replay says 0): the parked copy keeps the highest, which the rebuild needs.
  local parked = redis.call('HGET', KEYS[7], mark)
  local parked_version = parked and tonumber(string.match(parked, '\n(%d+)$')) or -1
  if version > parked_version then
    redis.call('HSET', KEYS[7], mark, table.concat({user, ARGV[3], status, reason, ARGV[6], ARGV[7]}, '\n'))
  end
  return 'PARKED'
end
if redis.call('SISMEMBER', KEYS[6], mark) == 1 then
  return 'DUPLICATE'
end
-- A final order is not in flight, whatever generation marked it.
if redis.call('HGET', KEYS[4], user) == order then
  redis.call('HDEL', KEYS[4], user)
end
local base = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
-- The admission record exists only if this generation of the state admitted
-- the order, i.e. its tokens and held count were taken here.
local admitted = redis.call('HDEL', KEYS[5], order) == 1
local give_tokens, drop_held = 0, 0
if status == 'REJECTED' then
  if admitted then
    -- Undo our own admission. PostgreSQL's SOLD_OUT means Redis counted a unit
    -- PostgreSQL did not have: keep that token consumed, the count is now right.
    drop_held = quantity
    if reason ~= 'SOLD_OUT' then give_tokens = quantity end
  elseif version > base then
    -- Admitted before the state was rebuilt and changed after the snapshot.
    give_tokens = units
    if units > 0 then drop_held = quantity end
  end
elseif status == 'REFUNDED' then
  if admitted or version > base then
    give_tokens = units
    drop_held = quantity
  end
end
-- The mark says "this event's effects are in the state". An event that changed
-- nothing leaves no mark: the reconciler replays a final state with version 0,
-- which can only undo an admission of this generation, and marking it would
-- turn the genuine event (with its real version) into a DUPLICATE that never
-- gives its units back. Unmarked, a later copy of the same event changes
-- nothing either, unless it carries a version the state has not seen.
if status ~= 'CONFIRMED' and not admitted and give_tokens == 0 and drop_held == 0 then
  return 'UNCHANGED'
end
redis.call('SADD', KEYS[6], mark)
-- CONFIRMED: the admission's effects stand.
if give_tokens > 0 then
  redis.call('INCRBY', KEYS[2], give_tokens)
end
if drop_held > 0 and redis.call('HINCRBY', KEYS[3], user, -drop_held) <= 0 then
  redis.call('HDEL', KEYS[3], user)
end
return 'APPLIED'
