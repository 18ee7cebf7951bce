-- Apply a batch of window events to the online store, idempotently, in one round trip.
-- ARGV: prefix, allowed_lateness_ms, retention_ms, ttl_s, window_ms, now_s, events
-- events: one JSON array of [card, txn_id, ts, seq, cents] (one argument: packing 5 per event costs the client more
-- than the whole script costs Redis).
-- Keys per card (prefix p):
--   p:w:<card>  ZSET  score = ts, member = "seq|cents|flag|txn_id"  (flag A = aggregated, L = late)
--   p:e:<card>  HASH  txn_id -> member                               (idempotency: a txn_id is applied once)
--   p:c:<card>  HASH  newest, last_seq, oldest, n10m, sum10m (as of the newest event), updated, exp_at
-- Returns one status per event: 0 applied, 1 late, 2 duplicate of an applied event, 3 duplicate of a late event,
-- 4 redelivery (stream position already passed) whose record was already trimmed.
local p = ARGV[1]
local lateness = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local events = cjson.decode(ARGV[7])
local status = {}
local touched = {}
local state = {}

for i = 1, #events do
  local e = events[i]
  local card, txn, ts, seq = e[1], e[2], e[3], e[4]
  local cents = string.format('%d', e[5])
  local ek = p .. ':e:' .. card
  local st = state[card]
  if not st then
    local c = redis.call('HMGET', p .. ':c:' .. card, 'newest', 'last_seq', 'oldest', 'exp_at')
    st = {newest = tonumber(c[1]), last_seq = tonumber(c[2]), oldest = tonumber(c[3]), exp_at = tonumber(c[4])}
    state[card] = st
    touched[#touched + 1] = card
  end
  if st.last_seq and seq <= st.last_seq then
    -- A redelivered message (its stream position was already applied): report what it was, change nothing.
    local prev = redis.call('HGET', ek, txn)
    if not prev then status[#status + 1] = 4
    elseif string.find(prev, '|L|', 1, true) then status[#status + 1] = 3
    else status[#status + 1] = 2 end
  else
    local flag = 'A'
    if st.newest and ts < st.newest - lateness then flag = 'L' end
    local member = string.format('%d', seq) .. '|' .. cents .. '|' .. flag .. '|' .. txn
    -- HSETNX is the idempotency check and the record in one call: 0 means this txn_id was seen before.
    if redis.call('HSETNX', ek, txn, member) == 0 then
      local prev = redis.call('HGET', ek, txn)
      if string.find(prev, '|L|', 1, true) then status[#status + 1] = 3 else status[#status + 1] = 2 end
    else
      redis.call('ZADD', p .. ':w:' .. card, ts, member)
      if (not st.oldest) or ts < st.oldest then st.oldest = ts end
      if flag == 'A' then
        status[#status + 1] = 0
        if (not st.newest) or ts > st.newest then st.newest = ts end
      else
        status[#status + 1] = 1
      end
    end
    st.last_seq = seq
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
      local cutoff = st.newest - retention
      local old = redis.call('ZRANGEBYSCORE', wk, '-inf', '(' .. cutoff)
      for j = 1, #old, 500 do
        local ids = {}
        for k = j, math.min(j + 499, #old) do
          local _, _, id = string.find(old[k], '^[^|]*|[^|]*|[^|]*|(.*)$')
          ids[#ids + 1] = id
        end
        redis.call('HDEL', ek, unpack(ids))
      end
      redis.call('ZREMRANGEBYSCORE', wk, '-inf', '(' .. cutoff)
      local first = redis.call('ZRANGE', wk, 0, 0, 'WITHSCORES')
      st.oldest = tonumber(first[2])
    end
    -- The latest aggregate, as of the newest event, for inspection (`velocity features get`).
    local cnt, sum = 0, 0
    if st.newest then
      local live = redis.call('ZRANGEBYSCORE', wk, st.newest - window, st.newest)
      for _, m in ipairs(live) do
        local _, _, c, f = string.find(m, '^[^|]*|([^|]*)|([^|]*)|')
        if f == 'A' then cnt = cnt + 1; sum = sum + tonumber(c) end
      end
    end
    -- TTLs are refreshed when half used up, not on every batch: three fewer calls per card per batch.
    local refresh = (not st.exp_at) or st.exp_at - now < ttl / 2
    if refresh then st.exp_at = now + ttl end
    redis.call('HSET', ck, 'newest', st.newest or '', 'last_seq', st.last_seq, 'oldest', st.oldest or '',
      'n10m', cnt, 'sum10m', sum, 'updated', now, 'exp_at', st.exp_at)
    if refresh then
      redis.call('EXPIRE', wk, ttl)
      redis.call('EXPIRE', ek, ttl)
      redis.call('EXPIRE', ck, ttl)
    end
  end
end
return status
