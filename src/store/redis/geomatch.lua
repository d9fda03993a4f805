#!lua name=geomatch_v1
-- geomatch's atomic steps, as Redis Functions (replicated with the data and kept across a
-- failover, unlike the EVAL script cache). A call may run twice: the Cluster client
-- retries one whose connection dropped after it was sent (geomatch's own direct path to a
-- slot's master never does; see store/redis/direct.rs). People Nearby's functions answer
-- such a second run as the first did (gm_user, gm_forget, gm_ping) or change nothing more
-- by it (gm_put, gm_del, gm_mark, gm_expire, gm_lease; a watch may be told a change
-- twice). Shake's
-- steps answer a second run as the first (gm_sh_enter and gm_sh_leave know each call by
-- name, gm_sh_reserve knows its own reservation) or change nothing more by it. gm_rate
-- run twice takes two tokens.
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

-- Tells the replicas watching this tag about a change: `kind` 'P' (the member is now in
-- `cell`), 'D' (it left `cell`) or 'M' (it moved from `cell`), then the cell, '|' and the
-- member as stored ('M': the new cell, '|' and the new member). `mode` is
-- 'S' (sharded pub/sub, a Cluster: the channel shares the tag's slot), 'P' (one server)
-- or '' (nobody is told).
local function tell(mode, channel, kind, cell, member)
  if mode == 'S' then
    redis.call('SPUBLISH', channel, kind .. cell .. '|' .. member)
  elseif mode == 'P' then
    redis.call('PUBLISH', channel, kind .. cell .. '|' .. member)
  end
end

-- An expiry entry names a privacy cell and its coarse cell: "coarse/cell", scored no later
-- than the earliest expiry of the cell's members (one entry per cell, not per user: a
-- ZSET entry costs the store ~150 bytes). A store written by an earlier build also holds
-- entries of one user, "coarse/cell|user"; the sweep still reads those.
local function entry(coarse, cell)
  return coarse .. '/' .. cell
end

-- Writes `member` into cell string `b` (in place of the user's member at first..last, if
-- any) for gm_put and gm_ping, whose keys and args 3-7 are alike (coarse, cell,
-- expires_at_ms, mode, channel), and tells the change.
local function place(keys, args, b, first, last, member)
  local coarse, cell, expires = args[3], args[4], args[5]
  local occupied = #b > 0
  if first then
    b = string.sub(b, 1, first - 1) .. member .. string.sub(b, last + 1)
  else
    b = b .. member
  end
  redis.call('SET', keys[1], b)
  -- A cell holding members is in its coarse cell's occupancy already (`store` keeps it so).
  if not occupied then redis.call('SADD', keys[2], cell) end
  -- The cell's expiry entry only ever moves earlier here (LT; a new one is added): a
  -- member pinging again, or one joining that expires later, leaves it where it is, so a
  -- ping mostly costs no skiplist update and nothing to replicate. The sweep finds such an
  -- entry due too early, and moves it to the earliest real expiry in the cell (gm_expire).
  redis.call('ZADD', keys[3], 'LT', expires, entry(coarse, cell))
  tell(args[6], args[7], 'P', cell, member)
end

-- gm_put(bucket, occupancy, expiry; user, fields, coarse, cell, expires_at_ms, mode, channel)
-- Puts a member in its privacy cell unless the cell already holds a newer ping of the same
-- user (last write wins); returns 1 when written, 0 when a newer one was kept.
redis.register_function('gm_put', function(keys, args)
  local user, fields = args[1], args[2]
  local b = redis.call('GET', keys[1]) or ''
  local first, last = find(b, user)
  if first and times(b, first) > struct.unpack('<I6', fields) then return 0 end
  place(keys, args, b, first, last, string.char(#user) .. user .. fields)
  return 1
end)

-- A ping's member carries, in its flags' top five bits, a mark: 1 + (its record's epoch
-- mod 31), the epoch being (seen ms) // epoch_ms of the ping that last wrote the user's
-- record naming this cell (gm_mark, after that record was written), 0 for none. While the
-- mark is of the epoch of a newer ping or the one before, that record names this cell and
-- lives on past any ping made in those two epochs (its time to live is the ping's plus two
-- epochs, see store/redis/nearby.rs): such a ping needs no record write (gm_ping).
local function mark_of(seen, epoch_ms)
  return 1 + math.floor(seen / epoch_ms) % 31
end

-- Whether a member marked `mark` whose ping was seen at `prev` (with time to live
-- `prev_ttl`) lets a ping seen at `seen` with time to live `ttl` skip its record write.
local function marked_for(mark, prev, prev_ttl, seen, ttl, epoch_ms)
  if mark == 0 or ttl > prev_ttl or seen - prev >= 16 * epoch_ms then return false end
  return mark == mark_of(seen, epoch_ms) or mark == mark_of(seen - epoch_ms, epoch_ms)
end

-- gm_ping(bucket, occupancy, expiry; user, fields, coarse, cell, expires_at_ms, mode,
--         channel, epoch_ms)
-- gm_put that also says whether the user's record needs writing: returns 2 when the cell
-- held the user already, marked for this ping (see above): the member is replaced, keeps
-- its mark, and the record is left as it is; 1 when written unmarked (the caller writes
-- the record, then marks it); 0 when a newer ping of the user is kept. The second run of
-- a call answers 2 or 1 and changes nothing more.
redis.register_function('gm_ping', function(keys, args)
  local user, fields, epoch_ms = args[1], args[2], tonumber(args[8])
  local b = redis.call('GET', keys[1]) or ''
  local first, last = find(b, user)
  local seen, ttl = struct.unpack('<I6I4', fields)
  local flags = string.byte(fields, FIELDS) % 8
  local answer = 1
  if first then
    local prev, prev_ttl = times(b, first)
    if prev > seen then return 0 end
    local mark = math.floor(string.byte(b, last) / 8)
    if marked_for(mark, prev, prev_ttl, seen, ttl, epoch_ms) then
      flags = flags + mark * 8
      answer = 2
    end
  end
  place(keys, args, b, first, last,
    string.char(#user) .. user .. string.sub(fields, 1, FIELDS - 1) .. string.char(flags))
  return answer
end)

-- gm_mark(bucket; user, seen_ms, epoch_ms) -> 1 when the user's member in this cell is the
-- ping seen at seen_ms, now marked as recorded (see above); 0 when it is not there (a
-- newer ping replaced or moved it).
redis.register_function('gm_mark', function(keys, args)
  local user, seen, epoch_ms = args[1], tonumber(args[2]), tonumber(args[3])
  local b = redis.call('GET', keys[1])
  if not b then return 0 end
  local first, last = find(b, user)
  if not first or times(b, first) ~= seen then return 0 end
  local flags = string.byte(b, last) % 8 + mark_of(seen, epoch_ms) * 8
  redis.call('SETRANGE', keys[1], last - 1, string.char(flags))
  return 1
end)

-- gm_del(bucket, occupancy, expiry; user, coarse, cell, not_after_ms, mode, channel, moved_to
--        [, 'newer'])
-- Takes a member out of its privacy cell if its ping is not newer than not_after_ms ('' =
-- any); drops the cell from its coarse cell's occupancy once empty. Returns the removed
-- member's fields, or false; with 'newer', a member kept for being newer is answered as
-- {its fields}. A member kept for being newer loses its mark (see gm_ping).
redis.register_function('gm_del', function(keys, args)
  local user, coarse, cell, not_after = args[1], args[2], args[3], args[4]
  local b = redis.call('GET', keys[1])
  if not b then return false end
  local first, last = find(b, user)
  if not first then return false end
  local fields = string.sub(b, last - FIELDS + 1, last)
  if not_after ~= '' and times(b, first) > tonumber(not_after) then
    -- Kept for being newer, so the user's record may not name this cell: the member's
    -- next ping writes the record again (its mark goes).
    local flags = string.byte(b, last)
    if flags >= 8 then redis.call('SETRANGE', keys[1], last - 1, string.char(flags % 8)) end
    if args[8] == 'newer' then return {fields} end
    return false
  end
  -- A member that moved ('M': the user's newer ping is in another cell, given as
  -- "cell|member") is told as the move, so a watch never mistakes it for a LEAVE.
  if args[7] and args[7] ~= '' then
    tell(args[5], args[6], 'M', cell, args[7])
  else
    tell(args[5], args[6], 'D', cell, string.sub(b, first, last))
  end
  b = string.sub(b, 1, first - 1) .. string.sub(b, last + 1)
  store(keys[1], keys[2], cell, b)
  -- The cell's expiry entry stays while others are in it (its score is still no later
  -- than theirs; the sweep moves it on).
  if #b == 0 then redis.call('ZREM', keys[3], entry(coarse, cell)) end
  return fields
end)

-- gm_user(user; cell, seen_ms, ttl_ms [, 'p'])
-- Records where a user is, unless a newer ping is recorded already; the record lives as
-- long as ttl_ms (a relative time to live: the store's clock need not be the caller's).
-- Returns the cell the user was recorded in before ('' when none), or false when this
-- ping is the older one. Run again for the same ping (a call retried after its reply was
-- lost), it answers as the first run did: the record keeps the cell it replaced ('p').
-- With 'p', the answer is {that cell, also}: `also` is the cell recorded before that one
-- when this ping moves the user ('' otherwise), which a failed move may have left a copy
-- in, and pings to it may have kept fresh without writing the record (gm_ping).
redis.register_function('gm_user', function(keys, args)
  local cell, seen, ttl = args[1], tonumber(args[2]), args[3]
  local old = redis.call('HMGET', keys[1], 'c', 't', 'p', 'f')
  local function answer(before, also)
    if args[4] == 'p' then return {before, also or ''} end
    return before
  end
  if old[1] == cell and old[2] == args[2] then
    -- This ping again, or another of the same cell and millisecond: the record lives as
    -- long as the later asks.
    redis.call('PEXPIRE', keys[1], ttl)
    return answer(old[3] or '')
  end
  if old[2] and tonumber(old[2]) > seen then return false end
  -- 'p' is the cell the user was in before this one: a ping from the same cell keeps it,
  -- so that a clear (and this ping run again) still finds a copy a failed move left there.
  local before = old[1] or ''
  if old[1] == cell then before = old[3] or '' end
  redis.call('HSET', keys[1], 'c', cell, 't', args[2], 'p', before)
  if old[4] then redis.call('HDEL', keys[1], 'f') end
  redis.call('PEXPIRE', keys[1], ttl)
  if old[1] ~= cell then return answer(old[1] or '', old[3]) end
  return answer(old[1] or '')
end)

-- gm_forget(user; [now_ms]) -> the cell the user was recorded in ('' when none); forgets
-- it. For a call run again (retried after its reply was lost) the record keeps, for
-- FORGOTTEN_MS and without a current cell, the forgotten cell ('f'), the cell before it
-- ('p') and the last seen time ('t', or the clear's now_ms when later): the second run
-- answers the same, the caller still empties both cells of what is not newer than 't',
-- and a ping older than the forgotten one (or than the clear) stays refused.
local FORGOTTEN_MS = 10000
redis.register_function('gm_forget', function(keys, args)
  local rec = redis.call('HMGET', keys[1], 'c', 'f', 'p', 't')
  if rec[1] then
    local t = tonumber(rec[4]) or 0
    if args[1] and tonumber(args[1]) and tonumber(args[1]) > t then t = tonumber(args[1]) end
    redis.call('DEL', keys[1])
    redis.call('HSET', keys[1], 'f', rec[1], 'p', rec[3] or '', 't', string.format('%.0f', t))
    redis.call('PEXPIRE', keys[1], FORGOTTEN_MS)
    return rec[1]
  end
  return rec[2] or ''
end)

-- gm_expire(expiry; now_ms, limit, bucket_prefix, occupancy_prefix, mode, channel)
-- Handles up to `limit` due entries of this tag: removes the members of each due cell
-- whose ping expired by now_ms, and moves the cell's entry on to the earliest expiry of
-- the members left (gm_put leaves it early when members ping again), or drops it with the
-- last member. Returns {removed, due}: the members removed and the entries handled (at
-- most `limit`; fewer means none is due any more). (The bucket and occupancy keys of an
-- entry are the prefixes followed by its cells; they share the expiry key's hash tag.)
redis.register_function('gm_expire', function(keys, args)
  local now, limit = tonumber(args[1]), tonumber(args[2])
  local due = redis.call('ZRANGEBYSCORE', keys[1], '-inf', now, 'LIMIT', 0, limit)
  local removed = 0
  for _, e in ipairs(due) do
    local slash = string.find(e, '/', 1, true)
    local bar = string.find(e, '|', 1, true)
    local coarse = string.sub(e, 1, slash - 1)
    local cell = string.sub(e, slash + 1, (bar or 0) - 1)
    local bucket = args[3] .. cell
    local b = redis.call('GET', bucket) or ''
    -- An entry of one user (an earlier build's) looks at that member only.
    local only = bar and string.sub(e, bar + 1)
    -- The bucket less its expired members, as the runs of members kept.
    local kept, from, next_due, gone = {}, 1, nil, 0
    local pos, n = 1, #b
    while pos <= n do
      local len = string.byte(b, pos)
      local stop = pos + len + FIELDS
      local seen, ttl = struct.unpack('<I6I4', b, pos + 1 + len)
      local mine = not only or string.sub(b, pos + 1, pos + len) == only
      if mine and seen + ttl <= now then
        tell(args[5], args[6], 'D', cell, string.sub(b, pos, stop))
        kept[#kept + 1] = string.sub(b, from, pos - 1)
        from = stop + 1
        gone = gone + 1
      elseif mine and (not next_due or seen + ttl < next_due) then
        next_due = seen + ttl
      end
      pos = stop + 1
    end
    if gone > 0 then
      kept[#kept + 1] = string.sub(b, from)
      store(bucket, args[4] .. coarse, cell, table.concat(kept))
      removed = removed + gone
    end
    if next_due then
      redis.call('ZADD', keys[1], next_due, e)
    else
      redis.call('ZREM', keys[1], e)
    end
  end
  return {removed, #due}
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
-- replica; it expires once full again, so idle users cost nothing. It runs even when the
-- store is full ('allow-oom': a few bytes per caller), so a store that refuses new pings
-- still serves searches.
local function rate(keys, args)
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
end
redis.register_function{function_name = 'gm_rate', callback = rate, flags = {'allow-oom'}}

-- Shake. A shake's state is a HASH in its user's slot, gm1:sh:{user}:s:<shake id>:
--   st  W waiting, R reserving a partner, M matched, N no match
--   dl  deadline (unix ms)          k, e  its waiting-index key and member
--   x   excluded user ids, each [length: 1 byte][id]
--   r   replicas to wake, space-separated   n  callers waiting on it
--   M:  p partner, d distance band, mid match id, t tier
--   R:  ri intended partner, rk its state key, rm proposed match id, rd distance band,
--       rt tier, rx expiry (unix ms)
-- The user's current shake id is gm1:sh:{user}:p. A waiting shake is listed in the waiting
-- index of its bucket (a ZSET in its tag, member -> deadline); a listing only helps others
-- find it, the state decides. Two shakes in different slots pair by reserve (the claimer's
-- own state) -> claim (the partner's) -> commit or revert (the claimer's): a claim decides
-- the partner's outcome in one step, and a reservation never outlives its expiry, since
-- anyone may resolve it through gm_sh_abort.

local function excluded(x, user)
  local pos, n = 1, #x
  while pos <= n do
    local len = string.byte(x, pos)
    if string.sub(x, pos + 1, pos + len) == user then return true end
    pos = pos + 1 + len
  end
  return false
end

-- Where `name` is in the space-separated `list` (nil or empty for none), as a position in
-- ' ' .. list .. ' ' (the space before it), or nil.
local function named(list, name)
  return string.find(' ' .. (list or '') .. ' ', ' ' .. name .. ' ', 1, true)
end

local RESERVATION = {'ri', 'rk', 'rm', 'rd', 'rt', 'rx'}

local function done(state)
  return {'done', unpack(redis.call('HMGET', state, 'st', 'p', 'd', 'mid', 't'))}
end

-- gm_sh_enter(pointer, state; id, now_ms, deadline_ms, index_key, member, excludes,
--             replica, keep_ms, state_prefix, call)
-- Starts a shake, or joins it when the id is the user's current one. Returns
--   {'done', st, p, d, mid, t}   a finished shake of this id (a retry);
--   {'join'}                     it is still open: wait for it;
--   {'busy'}                     the user's previous shake is reserving a partner: retry;
--   {'new', r, k, e}             started; r/k/e name a waiting shake it superseded.
-- `call` names this call (unique per replica and call): run again for the same call (a
-- retry after a lost reply), it answers as the first run did and counts no new caller.
-- The state keeps the starting call ('c0', with what it superseded: 'sr', 'sk', 'se') and
-- the calls waiting on it ('cs', space-separated).
redis.register_function('gm_sh_enter', function(keys, args)
  local ptr, state = keys[1], keys[2]
  local id, now, replica, call = args[1], tonumber(args[2]), args[7], args[10]
  local cur = redis.call('HMGET', state, 'st', 'dl', 'r', 'c0', 'cs', 'sr', 'sk', 'se')
  if cur[1] then
    if cur[1] == 'W' and tonumber(cur[2]) <= now then
      redis.call('HSET', state, 'st', 'N')
      return done(state)
    end
    if cur[1] == 'M' or cur[1] == 'N' then return done(state) end
    if call and call == cur[4] then
      if cur[6] then return {'new', cur[6], cur[7], cur[8]} end
      return {'new'}
    end
    if call and named(cur[5], call) then
      return {'join'}
    end
    if not named(cur[3], replica) then
      redis.call('HSET', state, 'r', cur[3] .. ' ' .. replica)
    end
    if call then redis.call('HSET', state, 'cs', (cur[5] or '') .. ' ' .. call) end
    redis.call('HINCRBY', state, 'n', 1)
    return {'join'}
  end
  local result = {'new'}
  local old = redis.call('GET', ptr)
  if old and old ~= id then
    local olds = args[9] .. old
    local o = redis.call('HMGET', olds, 'st', 'r', 'k', 'e')
    if o[1] == 'R' then return {'busy'} end
    if o[1] == 'W' then
      redis.call('HSET', olds, 'st', 'N')
      result = {'new', o[2], o[3], o[4]}
    end
  end
  redis.call('SET', ptr, id, 'PX', args[8])
  redis.call('HSET', state, 'st', 'W', 'dl', args[3], 'k', args[4], 'e', args[5], 'x', args[6],
    'r', replica, 'n', 1)
  if call then
    redis.call('HSET', state, 'c0', call, 'cs', call)
    if result[2] then redis.call('HSET', state, 'sr', result[2], 'sk', result[3], 'se', result[4]) end
  end
  redis.call('PEXPIRE', state, args[8])
  return result
end)

-- gm_sh_reserve(state; partner, partner_state, mid, band, tier, expires_ms, now_ms)
-- Reserves a waiting shake for a claim on `partner`, so nobody else can claim it meanwhile.
-- Returns {'ok'}, {'done', ...} when it has an outcome already, or {'gone'}.
redis.register_function('gm_sh_reserve', function(keys, args)
  local s = redis.call('HMGET', keys[1], 'st', 'dl')
  if s[1] == 'W' then
    if tonumber(s[2]) <= tonumber(args[7]) then return {'gone'} end
    redis.call('HSET', keys[1], 'st', 'R', 'ri', args[1], 'rk', args[2], 'rm', args[3],
      'rd', args[4], 'rt', args[5], 'rx', args[6])
    return {'ok'}
  end
  if s[1] == 'M' or s[1] == 'N' then return done(keys[1]) end
  if s[1] == 'R' then
    -- This very reservation, made by a first run whose reply was lost.
    local r = redis.call('HMGET', keys[1], 'ri', 'rm')
    if r[1] == args[1] and r[2] == args[3] then return {'ok'} end
    return {'busy'}
  end
  return {'gone'}
end)

-- gm_sh_claim(state, tombstone; claimer, mid, band, tier, now_ms)
-- Pairs a waiting shake with `claimer`. Two shakes claiming each other at once agree on
-- the lower of their proposals. Returns {'ok', mid, band, tier, replicas} (also for a
-- repeated claim), {'busy'} while it reserves another partner, or {'gone'}.
redis.register_function('gm_sh_claim', function(keys, args)
  if redis.call('EXISTS', keys[2]) == 1 then return {'gone'} end
  local claimer, mid, band, tier = args[1], args[2], args[3], args[4]
  local s = redis.call('HMGET', keys[1], 'st', 'dl', 'x', 'ri', 'rm', 'rd', 'rt', 'p', 'mid',
    'd', 't', 'r')
  if s[1] == 'M' then
    if s[8] == claimer then return {'ok', s[9], s[10], s[11], s[12]} end
    return {'gone'}
  end
  if s[1] == 'W' or (s[1] == 'R' and s[4] == claimer) then
    if tonumber(s[2]) <= tonumber(args[5]) or excluded(s[3], claimer) then return {'gone'} end
    if s[1] == 'R' and s[5] < mid then mid, band, tier = s[5], s[6], s[7] end
    redis.call('HSET', keys[1], 'st', 'M', 'p', claimer, 'd', band, 'mid', mid, 't', tier)
    redis.call('HDEL', keys[1], unpack(RESERVATION))
    return {'ok', mid, band, tier, s[12]}
  end
  if s[1] == 'R' then return {'busy'} end
  return {'gone'}
end)

-- gm_sh_commit(state; partner, mid, band, tier) -> {'ok', replicas} once the reserved
-- shake is matched with `partner`, else {'conflict', st}.
redis.register_function('gm_sh_commit', function(keys, args)
  local s = redis.call('HMGET', keys[1], 'st', 'ri', 'p', 'r')
  if s[1] == 'R' and s[2] == args[1] then
    redis.call('HSET', keys[1], 'st', 'M', 'p', args[1], 'mid', args[2], 'd', args[3],
      't', args[4])
    redis.call('HDEL', keys[1], unpack(RESERVATION))
    return {'ok', s[4]}
  end
  if s[1] == 'M' and s[3] == args[1] then return {'ok', s[4]} end
  return {'conflict', s[1] or ''}
end)

-- gm_sh_revert(state;) -> {'ok'} when a reservation is undone (waiting again), else
-- {'done', ...} or {'gone'}.
redis.register_function('gm_sh_revert', function(keys, args)
  local st = redis.call('HGET', keys[1], 'st')
  if st == 'R' then
    redis.call('HSET', keys[1], 'st', 'W')
    redis.call('HDEL', keys[1], unpack(RESERVATION))
    return {'ok'}
  end
  if st == 'M' or st == 'N' then return done(keys[1]) end
  return {'gone'}
end)

-- gm_sh_abort(state, tombstone; claimer, keep_ms)
-- Settles a claim whose claimer may have died: {'claimed', mid, band, tier} when the shake
-- is matched with `claimer`, else {'aborted'}, after which no claim of that proposal lands.
redis.register_function('gm_sh_abort', function(keys, args)
  local s = redis.call('HMGET', keys[1], 'st', 'p', 'mid', 'd', 't')
  if s[1] == 'M' and s[2] == args[1] then return {'claimed', s[3], s[4], s[5]} end
  redis.call('SET', keys[2], '1', 'PX', args[2])
  return {'aborted'}
end)

-- gm_sh_leave(pointer, state; id, call)
-- A caller (`call`, as it entered) stops waiting. The last one withdraws a shake still
-- waiting: it is forgotten (a retry starts afresh) and {'withdrawn', k, e} names its
-- listing. Else {'done', ...} when it has an outcome, or {'left'}. Run again for the same
-- call, it counts no second leave (the calls that left are kept in 'cl'). A repeated last
-- leave finds the shake forgotten and answers {'left'}: its listing stays in the waiting
-- index until its deadline, where a scan finds the state gone.
redis.register_function('gm_sh_leave', function(keys, args)
  local s = redis.call('HMGET', keys[2], 'st', 'cs', 'cl')
  local st, call = s[1], args[2]
  if not st then return {'left'} end
  if st == 'M' or st == 'N' then return done(keys[2]) end
  if call then
    local at = named(s[2], call)
    if at then
      local callers = ' ' .. s[2] .. ' '
      local rest = string.sub(callers, 1, at) .. string.sub(callers, at + #call + 2)
      redis.call('HSET', keys[2], 'cs', string.match(rest, '^%s*(.-)%s*$'),
        'cl', (s[3] or '') .. ' ' .. call)
    elseif named(s[3], call) then
      -- This call left already: a second run.
      return {'left'}
    end
    -- Else a call that entered through an older library, which kept no names: counted
    -- as before.
  end
  local n = redis.call('HINCRBY', keys[2], 'n', -1)
  if n <= 0 and st == 'W' then
    local listing = redis.call('HMGET', keys[2], 'k', 'e')
    redis.call('DEL', keys[2])
    if redis.call('GET', keys[1]) == args[1] then redis.call('DEL', keys[1]) end
    return {'withdrawn', listing[1], listing[2]}
  end
  return {'left'}
end)

-- gm_sh_expire(state; now_ms) -> {'expired', k, e} when a waiting shake's window has
-- passed (NO_MATCH, kept for retries), {'done', ...} when it has an outcome, {'busy'}
-- while it reserves, {'wait'} before its deadline, {'gone'} when unknown.
redis.register_function('gm_sh_expire', function(keys, args)
  local s = redis.call('HMGET', keys[1], 'st', 'dl', 'k', 'e')
  if not s[1] then return {'gone'} end
  if s[1] == 'M' or s[1] == 'N' then return done(keys[1]) end
  if s[1] == 'R' then return {'busy'} end
  if tonumber(s[2]) > tonumber(args[1]) then return {'wait'} end
  redis.call('HSET', keys[1], 'st', 'N')
  return {'expired', s[3], s[4]}
end)

-- gm_sh_scan(index...; now_ms, add (0 = none, else which key), member, deadline_ms, keep_ms)
-- Drops listings past their deadline, lists the caller's shake under keys[add], then
-- returns every listing of the keys (all in one tag). Listing and scanning in one step is
-- what makes two simultaneous shakes find each other: the later scan sees the earlier.
redis.register_function('gm_sh_scan', function(keys, args)
  local now, add = tonumber(args[1]), tonumber(args[2])
  local out = {}
  for i, k in ipairs(keys) do
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    if i == add then
      redis.call('ZADD', k, args[4], args[3])
      redis.call('PEXPIRE', k, args[5])
    end
    for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do out[#out + 1] = m end
  end
  return out
end)
