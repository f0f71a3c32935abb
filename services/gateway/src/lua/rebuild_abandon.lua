-- Gives up a rebuild's lease (its snapshot could not be read whole), so the
-- next attempt need not wait for the lease to expire. The bucket stays not
-- ready; whatever the pieces wrote is cleared by the next rebuild_begin.lua.
-- Key types and value encodings: services/DESIGN.md, "Redis keys".
-- KEYS: 1 rebuilding
-- ARGV: 1 rebuild token
-- Returns 1 if the lease was this rebuild's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
