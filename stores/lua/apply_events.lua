-- Apply a batch of window events to the online store, idempotently, in one round trip.
-- ARGV: prefix, allowed_lateness_ms, retention_ms, ttl_s, window_ms, now_ms, now_us, events
-- events: one JSON array of [card, txn_id, ts, cents], the numbers as decimal strings (one argument: packing
-- 4 per event costs the client more than the whole script costs Redis). Numbers travel as strings and are handed to
-- redis.call as strings: Redis 7.0 formats every Lua number argument with printf("%.17g"), which was ~15% of the
-- script's time.
-- Keys per card (prefix p):
--   p:w:<card>  ZSET  score = ts, member = "seq|cents|flag|txn_id"  (flag A = aggregated, L = late)
--   p:e:<card>  HASH  txn_id -> member                               (idempotency: a txn_id is applied once)
--   p:c:<card>  HASH  newest, last_seq, oldest, trimmed (events with ts below it may be gone), n10m, sum10m,
--                     win_lo (the latest aggregate, as of the newest event, and its oldest counted ts), updated, exp_at
-- seq is the card's arrival position: strictly increasing per card, max(previous + 1, the worker's clock in us).
-- It survives a recreated topic, a changed partition count and an emptied Redis (the clock keeps counting), and
-- seq // 1000 is the arrival time in ms (what snapshot visibility is judged against).
-- The lateness horizon is min(newest, now) - lateness: an event stamped ahead of the worker's clock cannot push
-- a card's horizon into the future.
-- Returns, flat, per event: status, seq. status 0 applied, 1 late, 2 duplicate of an applied event,
-- 3 duplicate of a late event; seq is the one assigned, or for a duplicate the stored one.
local p = ARGV[1]
local lateness = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local ttl_s = ARGV[4]
local ttl = tonumber(ttl_s)
local window = tonumber(ARGV[5])
local now_ms = tonumber(ARGV[6])
local now_s = string.format('%d', math.floor(now_ms / 1000))
local now = tonumber(now_s)
local now_us = tonumber(ARGV[7])
local events = cjson.decode(ARGV[8])
local fmt, find, call = string.format, string.find, redis.call
local out = {}
local touched = {}
local state = {}

-- Count one aggregated event (ts t, cents as a string) in the card's latest aggregate.
local function count_in(st, t, cents)
  st.n = st.n + 1; st.sum = st.sum + tonumber(cents)
  if (not st.win_lo) or t < st.win_lo then st.win_lo = t end
end

-- The fields of a stored member, by position (the txn_id is last and may hold any character, '|' included).
local function fields(member)
  local _, _, seq, cents, flag = find(member, '^([^|]*)|([^|]*)|([^|]*)|')
  return seq, cents, flag
end

local function horizon(st)
  if not st.newest then return nil end
  return math.min(st.newest, now_ms)
end

for i = 1, #events do
  local e = events[i]
  local card, txn, ts_s, cents = e[1], e[2], e[3], e[4]
  local ts = tonumber(ts_s)
  local ek = p .. ':e:' .. card
  local st = state[card]
  if not st then
    local c = call('HMGET', p .. ':c:' .. card, 'newest', 'last_seq', 'oldest', 'exp_at', 'n10m', 'sum10m', 'win_lo',
      'trimmed')
    st = {newest_s = c[1], newest = tonumber(c[1]), last_seq = tonumber(c[2]) or 0,
          oldest_s = c[3], oldest = tonumber(c[3]), exp_at_s = c[4], exp_at = tonumber(c[4]),
          n = tonumber(c[5]) or 0, sum = tonumber(c[6]) or 0, win_lo = tonumber(c[7]), trimmed = tonumber(c[8]),
          counted = {}}
    st.base_newest = st.newest
    -- A state written before win_lo existed: its aggregate is recomputed from the window once.
    st.unknown = st.newest ~= nil and not c[7]
    state[card] = st
    touched[#touched + 1] = card
    local h = horizon(st)
    if h and ts - retention > h and call('HEXISTS', ek, txn) == 0 then
      -- The card was idle for longer than the retention: all it has stored is older than the cutoff this event
      -- sets, so drop it in one call instead of trimming it record by record below (replayed history meeting
      -- live traffic does this for every card at once). TTLs are set again when the keys are written.
      call('DEL', ek, p .. ':w:' .. card)
      st.trimmed = math.max(st.trimmed or 0, ts - retention)
      st.oldest, st.oldest_s, st.exp_at = nil, nil, nil
      st.n, st.sum, st.win_lo, st.unknown = 0, 0, nil, false
    end
  end
  local seq = math.max(st.last_seq + 1, now_us)
  local seq_s = fmt('%d', seq)
  local flag = 'A'
  local h = horizon(st)
  if h and ts < h - lateness then flag = 'L' end
  local member = seq_s .. '|' .. cents .. '|' .. flag .. '|' .. txn
  -- HSETNX is the idempotency check and the record in one call: 0 means this txn_id was seen before.
  if call('HSETNX', ek, txn, member) == 0 then
    local prev_seq, _, prev_flag = fields(call('HGET', ek, txn))
    out[2 * i - 1] = (prev_flag == 'L') and 3 or 2
    out[2 * i] = tonumber(prev_seq)
  else
    call('ZADD', p .. ':w:' .. card, ts_s, member)
    if (not st.oldest) or ts < st.oldest then st.oldest = ts; st.oldest_s = ts_s end
    if flag == 'A' then
      out[2 * i - 1] = 0
      if (not st.newest) or ts > st.newest then st.newest = ts; st.newest_s = ts_s end
      if ts >= st.newest - window then
        -- Counted in the latest aggregate (as of newest); what a later newest pushes out is settled below.
        count_in(st, ts, cents)
        st.counted[#st.counted + 1] = ts; st.counted[#st.counted + 1] = cents
      end
    else
      out[2 * i - 1] = 1
    end
    out[2 * i] = seq
    st.last_seq = seq
    st.changed = true
  end
end

for _, card in ipairs(touched) do
  local st = state[card]
  local wk, ek, ck = p .. ':w:' .. card, p .. ':e:' .. card, p .. ':c:' .. card
  if st.changed then
    local h = horizon(st)
    if h and st.oldest and st.oldest < h - retention then
      -- Events older than the horizon - retention can no longer count for any on-time event: drop them
      -- together with their idempotency records, and remember where the store's memory of this card starts.
      local cut = h - retention
      local cutoff = '(' .. fmt('%d', cut)
      local old = call('ZRANGEBYSCORE', wk, '-inf', cutoff)
      for j = 1, #old, 500 do
        local ids = {}
        for k = j, math.min(j + 499, #old) do
          local _, _, id = find(old[k], '^[^|]*|[^|]*|[^|]*|(.*)$')
          ids[#ids + 1] = id
        end
        call('HDEL', ek, unpack(ids))
      end
      call('ZREMRANGEBYSCORE', wk, '-inf', cutoff)
      st.trimmed = math.max(st.trimmed or 0, cut)
      local first = call('ZRANGE', wk, 0, 0, 'WITHSCORES')
      st.oldest_s = first[2]
      st.oldest = tonumber(first[2])
    end
    -- The latest aggregate, as of the newest event, for inspection (`velocity features get`): the aggregated
    -- events with ts in [newest - window, newest]. It is kept incrementally with the oldest counted ts (win_lo);
    -- the window is read back only when a counted event from an earlier batch has left it.
    local lo = st.newest and st.newest - window
    if lo and (st.unknown or (st.win_lo and st.win_lo < lo)) then
      st.n, st.sum, st.win_lo = 0, 0, nil
      if st.unknown or (st.base_newest and st.base_newest >= lo) then
        local live = call('ZRANGEBYSCORE', wk, fmt('%d', lo), st.newest_s, 'WITHSCORES')
        for j = 1, #live, 2 do
          local _, c, f = fields(live[j])
          if f == 'A' then count_in(st, tonumber(live[j + 1]), c) end
        end
      else
        -- Everything counted before this batch is older than lo: only this batch's counted events can remain.
        local counted = st.counted
        for j = 1, #counted, 2 do
          if counted[j] >= lo then count_in(st, counted[j], counted[j + 1]) end
        end
      end
    end
    -- TTLs are refreshed when half used up, not on every batch: three fewer calls per card per batch.
    local refresh = (not st.exp_at) or st.exp_at - now < ttl / 2
    if refresh then st.exp_at_s = fmt('%d', now + ttl) end
    call('HSET', ck, 'newest', st.newest_s or '', 'last_seq', fmt('%d', st.last_seq), 'oldest', st.oldest_s or '',
      'n10m', fmt('%d', st.n), 'sum10m', fmt('%d', st.sum), 'win_lo', st.win_lo and fmt('%d', st.win_lo) or '',
      'trimmed', st.trimmed and fmt('%d', st.trimmed) or '', 'updated', now_s, 'exp_at', st.exp_at_s)
    if refresh then
      call('EXPIRE', wk, ttl_s)
      call('EXPIRE', ek, ttl_s)
      call('EXPIRE', ck, ttl_s)
    end
  end
end
return out
