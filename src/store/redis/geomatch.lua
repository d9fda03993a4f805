#!lua name=geomatch_v1
-- geomatch's atomic steps, as Redis Functions (replicated with the data and kept across a
-- failover, unlike the EVAL script cache). Every function is idempotent: the client
-- retries a call whose reply it lost.
--
-- A member's value is its fields without the id (see nearby/bucket.rs): last seen, 6 bytes
-- little-endian ms; time to live, u32 LE ms; flags, 1 byte.

local function seen_of(value)
  if not value or #value ~= 11 then return -1 end
  return struct.unpack('<I6', value)
end

-- An expiry entry names its coarse cell, privacy cell and user: "coarse/cell|user".
local function entry(coarse, cell, user)
  return coarse .. '/' .. cell .. '|' .. user
end

-- gm_put(bucket, occupancy, expiry; user, value, coarse, cell, expires_at_ms)
-- Puts a member in its privacy cell unless the cell already holds a newer ping of the same
-- user (last write wins); returns 1 when written, 0 when a newer one was kept.
redis.register_function('gm_put', function(keys, args)
  local user, value, coarse, cell, expires = args[1], args[2], args[3], args[4], args[5]
  if seen_of(redis.call('HGET', keys[1], user)) > seen_of(value) then
    return 0
  end
  redis.call('HSET', keys[1], user, value)
  redis.call('SADD', keys[2], cell)
  redis.call('ZADD', keys[3], expires, entry(coarse, cell, user))
  return 1
end)

-- gm_del(bucket, occupancy, expiry; user, coarse, cell, not_after_ms)
-- Takes a member out of its privacy cell if its ping is not newer than not_after_ms ('' =
-- any); drops the cell from its coarse cell's occupancy once empty. Returns the removed
-- value, or false.
redis.register_function('gm_del', function(keys, args)
  local user, coarse, cell, not_after = args[1], args[2], args[3], args[4]
  local value = redis.call('HGET', keys[1], user)
  if not value then return false end
  if not_after ~= '' and seen_of(value) > tonumber(not_after) then return false end
  redis.call('HDEL', keys[1], user)
  if redis.call('HLEN', keys[1]) == 0 then
    redis.call('SREM', keys[2], cell)
  end
  redis.call('ZREM', keys[3], entry(coarse, cell, user))
  return value
end)

-- gm_user(user; cell, seen_ms, ttl_ms)
-- Records where a user is, unless a newer ping is recorded already; the record lives as
-- long as the ping (a relative time to live: the store's clock need not be the caller's).
-- Returns the cell the user was recorded in before ('' when none), or false when this
-- ping is the older one.
redis.register_function('gm_user', function(keys, args)
  local cell, seen, ttl = args[1], tonumber(args[2]), args[3]
  local old = redis.call('HMGET', keys[1], 'c', 't')
  if old[2] and tonumber(old[2]) > seen then return false end
  redis.call('HSET', keys[1], 'c', cell, 't', args[2])
  redis.call('PEXPIRE', keys[1], ttl)
  return old[1] or ''
end)

-- gm_forget(user;) -> the cell the user was recorded in ('' when none); forgets the record.
redis.register_function('gm_forget', function(keys, args)
  local cell = redis.call('HGET', keys[1], 'c')
  redis.call('DEL', keys[1])
  return cell or ''
end)

-- gm_expire(expiry; now_ms, limit, bucket_prefix, occupancy_prefix)
-- (the bucket and occupancy keys of an entry are the prefixes followed by its cells; they
-- share the expiry key's hash tag)
-- Removes up to `limit` members of this tag whose ping expired by now_ms (a member pinged
-- again meanwhile has a later score and stays). Returns the number removed.
redis.register_function('gm_expire', function(keys, args)
  local now, limit = tonumber(args[1]), tonumber(args[2])
  local due = redis.call('ZRANGEBYSCORE', keys[1], '-inf', now, 'LIMIT', 0, limit)
  local removed = 0
  for _, e in ipairs(due) do
    local slash = string.find(e, '/', 1, true)
    local bar = string.find(e, '|', 1, true)
    local coarse = string.sub(e, 1, slash - 1)
    local cell, user = string.sub(e, slash + 1, bar - 1), string.sub(e, bar + 1)
    local bucket = args[3] .. cell
    local value = redis.call('HGET', bucket, user)
    if value then
      local expired = #value ~= 11
      if not expired then
        local seen, ttl = struct.unpack('<I6I4', value)
        expired = seen + ttl <= now
      end
      if expired then
        redis.call('HDEL', bucket, user)
        if redis.call('HLEN', bucket) == 0 then
          redis.call('SREM', args[4] .. coarse, cell)
        end
        removed = removed + 1
      end
    end
    redis.call('ZREM', keys[1], e)
  end
  return removed
end)
