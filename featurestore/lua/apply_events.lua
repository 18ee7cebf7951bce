-- Apply a batch of window events to the online store, idempotently, in one round trip.
-- ARGV: prefix, allowed_lateness_ms, retention_ms, ttl_s, window_ms, now_s, events
-- events: one JSON array of [card, txn_id, ts, seq, cents], the numbers as decimal strings (one argument: packing
-- 5 per event costs the client more than the whole script costs Redis). Numbers travel as strings and are handed to
-- redis.call as strings: Redis 7.0 formats every Lua number argument with printf("%.17g"), which was ~15% of the
-- script's time.
-- Keys per card (prefix p):
--   p:w:<card>  ZSET  score = ts, member = "seq|cents|flag|txn_id"  (flag A = aggregated, L = late)
--   p:e:<card>  HASH  txn_id -> member                               (idempotency: a txn_id is applied once)
--   p:c:<card>  HASH  newest, last_seq, oldest, n10m, sum10m, win_lo (the latest aggregate, as of the newest event,
--                     and its oldest counted ts), updated, exp_at
-- Returns one status per event: 0 applied, 1 late, 2 duplicate of an applied event, 3 duplicate of a late event,
-- 4 redelivery (stream position already passed) whose record was already trimmed.
local p = ARGV[1]
local lateness = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local ttl_s = ARGV[4]
local ttl = tonumber(ttl_s)
local window = tonumber(ARGV[5])
local now_s = ARGV[6]
local now = tonumber(now_s)
local events = cjson.decode(ARGV[7])
local fmt, find, call = string.format, string.find, redis.call
local status = {}
local touched = {}
local state = {}

-- Count one aggregated event (ts t, cents as a string) in the card's latest aggregate.
local function count_in(st, t, cents)
  st.n = st.n + 1; st.sum = st.sum + tonumber(cents)
  if (not st.win_lo) or t < st.win_lo then st.win_lo = t end
end

for i = 1, #events do
  local e = events[i]
  local card, txn, ts_s, seq_s, cents = e[1], e[2], e[3], e[4], e[5]
  local ts, seq = tonumber(ts_s), tonumber(seq_s)
  local ek = p .. ':e:' .. card
  local st = state[card]
  if not st then
    local c = call('HMGET', p .. ':c:' .. card, 'newest', 'last_seq', 'oldest', 'exp_at', 'n10m', 'sum10m', 'win_lo')
    st = {newest_s = c[1], newest = tonumber(c[1]), last_seq_s = c[2], last_seq = tonumber(c[2]),
          oldest_s = c[3], oldest = tonumber(c[3]), exp_at_s = c[4], exp_at = tonumber(c[4]),
          n = tonumber(c[5]) or 0, sum = tonumber(c[6]) or 0, win_lo = tonumber(c[7]), counted = {}}
    st.base_newest = st.newest
    -- A state written before win_lo existed: its aggregate is recomputed from the window once.
    st.unknown = st.newest ~= nil and not c[7]
    state[card] = st
    touched[#touched + 1] = card
    if st.newest and ts - retention > st.newest and seq > st.last_seq then
      -- The card was idle for longer than the retention: all it has stored is older than the cutoff this event
      -- sets, so drop it in one call instead of trimming it record by record below (replayed history meeting
      -- live traffic does this for every card at once). TTLs are set again when the keys are written.
      call('DEL', ek, p .. ':w:' .. card)
      st.oldest, st.oldest_s, st.exp_at = nil, nil, nil
      st.n, st.sum, st.win_lo, st.unknown = 0, 0, nil, false
    end
  end
  if st.last_seq and seq <= st.last_seq then
    -- A redelivered message (its stream position was already applied): report what it was, change nothing.
    local prev = call('HGET', ek, txn)
    if not prev then status[i] = 4
    elseif find(prev, '|L|', 1, true) then status[i] = 3
    else status[i] = 2 end
  else
    local flag = 'A'
    if st.newest and ts < st.newest - lateness then flag = 'L' end
    local member = seq_s .. '|' .. cents .. '|' .. flag .. '|' .. txn
    -- HSETNX is the idempotency check and the record in one call: 0 means this txn_id was seen before.
    if call('HSETNX', ek, txn, member) == 0 then
      local prev = call('HGET', ek, txn)
      if find(prev, '|L|', 1, true) then status[i] = 3 else status[i] = 2 end
    else
      call('ZADD', p .. ':w:' .. card, ts_s, member)
      if (not st.oldest) or ts < st.oldest then st.oldest = ts; st.oldest_s = ts_s end
      if flag == 'A' then
        status[i] = 0
        if (not st.newest) or ts > st.newest then st.newest = ts; st.newest_s = ts_s end
        if ts >= st.newest - window then
          -- Counted in the latest aggregate (as of newest); what a later newest pushes out is settled below.
          count_in(st, ts, cents)
          st.counted[#st.counted + 1] = ts; st.counted[#st.counted + 1] = cents
        end
      else
        status[i] = 1
      end
    end
    st.last_seq = seq; st.last_seq_s = seq_s
    st.changed = true
  end
end

for _, card in ipairs(touched) do
  local st = state[card]
  local wk, ek, ck = p .. ':w:' .. card, p .. ':e:' .. card, p .. ':c:' .. card
  if st.changed then
    if st.newest and st.oldest and st.oldest < st.newest - retention then
      -- Events older than newest - retention can no longer count for any on-time event: drop them
      -- together with their idempotency records.
      local cutoff = '(' .. fmt('%d', st.newest - retention)
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
          local _, _, c, f = find(live[j], '^[^|]*|([^|]*)|([^|]*)|')
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
    call('HSET', ck, 'newest', st.newest_s or '', 'last_seq', st.last_seq_s, 'oldest', st.oldest_s or '',
      'n10m', fmt('%d', st.n), 'sum10m', fmt('%d', st.sum), 'win_lo', st.win_lo and fmt('%d', st.win_lo) or '',
      'updated', now_s, 'exp_at', st.exp_at_s)
    if refresh then
      call('EXPIRE', wk, ttl_s)
      call('EXPIRE', ek, ttl_s)
      call('EXPIRE', ck, ttl_s)
    end
  end
end
return status
