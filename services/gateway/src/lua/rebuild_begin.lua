-- Starts rebuilding one stock bucket's admission state from an inventory
-- snapshot that arrives in pieces (proto/README.md, "Known limits": Redis is a cache):
-- takes the bucket's rebuild lease and clears what the snapshot replaces. The
-- pieces follow (rebuild_part.lua), then rebuild.lua makes the state ready.
-- Until then `ready` is missing, so admissions answer NOT_READY and events park.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 ready, 2 held, 3 inflight, 4 admitted, 5 applied, 6 rebuilding
-- ARGV: 1 rebuild token, 2 lease (ms)
-- Returns READY (present: nothing to rebuild), BUSY (another rebuild holds the
-- lease) or BEGUN.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'READY'
end
local holder = redis.call('GET', KEYS[6])
if holder and holder ~= ARGV[1] then
  return 'BUSY'
end
redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 'BEGUN'
