#!lua name=geomatch_v1
-- geomatch's atomic steps, as Redis Functions (replicated with the data and kept across a
-- failover, unlike the EVAL script cache). Every function is idempotent: the client
-- retries a call whose reply it lost.
--
-- A privacy cell is one string: its members back to back, each
--   [id length: 1 byte][id][last seen: 6 bytes LE ms][time to live: 4 bytes LE ms][flags: 1 byte]
-- (the in-memory bucket encoding, see nearby/bucket.rs), in no particular order: readers
-- sort, so no comparison here depends on the server's locale. A member's "fields" are its
-- 11 bytes after the id.

local FIELDS = 11

-- Where `user`'s member is in cell string `b`: its first and last byte (1-based), or nil.
local function find(b, user)
  local pos, n = 1, #b
  while pos <= n do
    local len = string.byte(b, pos)
    local stop = pos + len + FIELDS
    if string.sub(b, pos + 1, pos + len) == user then
      return pos, stop
    end
    pos = stop + 1
  end
  return nil
end

-- The member's last-seen and time-to-live, from its first byte.
local function times(b, start)
  local len = string.byte(b, start)
  return struct.unpack('<I6I4', b, start + 1 + len)
end

-- Writes cell string `b` back, or drops the key (and the cell from its coarse cell's
-- occupancy) once empty.
local function store(bucket, occupancy, cell, b)
  if #b == 0 then
    redis.call('DEL', bucket)
    redis.call('SREM', occupancy, cell)
  else
    redis.call('SET', bucket, b)
  end
end

-- An expiry entry names its coarse cell, privacy cell and user: "coarse/cell|user".
local function entry(coarse, cell, user)
  return coarse .. '/' .. cell .. '|' .. user
end

-- gm_put(bucket, occupancy, expiry; user, fields, coarse, cell, expires_at_ms)
-- Puts a member in its privacy cell unless the cell already holds a newer ping of the same
-- user (last write wins); returns 1 when written, 0 when a newer one was kept.
redis.register_function('gm_put', function(keys, args)
  local user, fields, coarse, cell, expires = args[1], args[2], args[3], args[4], args[5]
  local b = redis.call('GET', keys[1]) or ''
  local member = string.char(#user) .. user .. fields
  local first, last = find(b, user)
  if first then
    if times(b, first) > struct.unpack('<I6', fields) then return 0 end
    b = string.sub(b, 1, first - 1) .. member .. string.sub(b, last + 1)
  else
    b = b .. member
  end
  redis.call('SET', keys[1], b)
  redis.call('SADD', keys[2], cell)
  redis.call('ZADD', keys[3], expires, entry(coarse, cell, user))
  return 1
end)

-- gm_del(bucket, occupancy, expiry; user, coarse, cell, not_after_ms)
-- Takes a member out of its privacy cell if its ping is not newer than not_after_ms ('' =
-- any); drops the cell from its coarse cell's occupancy once empty. Returns the removed
-- member's fields, or false.
redis.register_function('gm_del', function(keys, args)
  local user, coarse, cell, not_after = args[1], args[2], args[3], args[4]
  local b = redis.call('GET', keys[1])
  if not b then return false end
  local first, last = find(b, user)
  if not first then return false end
  if not_after ~= '' and times(b, first) > tonumber(not_after) then return false end
  local fields = string.sub(b, last - FIELDS + 1, last)
  store(keys[1], keys[2], cell, string.sub(b, 1, first - 1) .. string.sub(b, last + 1))
  redis.call('ZREM', keys[3], entry(coarse, cell, user))
  return fields
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
-- Removes up to `limit` members of this tag whose ping expired by now_ms (a member pinged
-- again meanwhile has a later score and stays). Returns the number removed. (The bucket
-- and occupancy keys of an entry are the prefixes followed by its cells; they share the
-- expiry key's hash tag.)
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
    local b = redis.call('GET', bucket)
    if b then
      local first, last = find(b, user)
      if first then
        local seen, ttl = times(b, first)
        if seen + ttl <= now then
          store(bucket, args[4] .. coarse, cell, string.sub(b, 1, first - 1) .. string.sub(b, last + 1))
          removed = removed + 1
        end
      end
    end
    redis.call('ZREM', keys[1], e)
  end
  return removed
end)

-- gm_lease(lease; replica, hold_ms) -> 1 when `replica` holds the lease (taken or renewed
-- for hold_ms), 0 when another replica does.
redis.register_function('gm_lease', function(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder and holder ~= args[1] then return 0 end
  redis.call('SET', keys[1], args[1], 'PX', args[2])
  return 1
end)

-- gm_rate(bucket; burst, per_minute, now_ms) -> 0 when a call is allowed (a token taken),
-- else the ms until the next one is. A token bucket per user and call, shared by every
-- replica; it expires once full again, so idle users cost nothing.
redis.register_function('gm_rate', function(keys, args)
  local burst, per_min, now = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
  local held = redis.call('HMGET', keys[1], 'k', 'at')
  local tokens = burst
  if held[1] then
    local elapsed = math.max(0, now - tonumber(held[2]))
    tokens = math.min(burst, tonumber(held[1]) + elapsed * per_min / 60000)
  end
  if tokens >= 1 then
    redis.call('HSET', keys[1], 'k', tokens - 1, 'at', now)
    local refill_ms = (burst - tokens + 1) * 60000 / math.max(per_min, 1)
    redis.call('PEXPIRE', keys[1], math.ceil(refill_ms) + 1000)
    return 0
  end
  if per_min <= 0 then return 4294967295 end
  return math.ceil((1 - tokens) * 60000 / per_min)
end)
