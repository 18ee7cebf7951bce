-- Apply a batch of window events to the online store, idempotently, in one round trip.
-- ARGV: prefix, allowed_lateness_ms, retention_ms, ttl_s, window_ms, then 5 per event: card, txn_id, ts, seq, cents
-- Keys per card (prefix p):
--   p:w:<card>  ZSET  score = ts, member = "seq|cents|flag|txn_id"  (flag A = aggregated, L = late)
--   p:e:<card>  HASH  txn_id -> member                               (idempotency: a txn_id is applied once)
--   p:c:<card>  HASH  newest, last_seq, n10m, sum10m (as of the newest event), updated
-- Returns one status per event: 0 applied, 1 late, 2 duplicate of an applied event, 3 duplicate of a late event,
-- 4 redelivery (stream position already passed) whose record was already trimmed.
local p = ARGV[1]
local lateness = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local n = (#ARGV - 5) / 5
local status = {}
local touched = {}
local state = {}

for i = 0, n - 1 do
  local b = 6 + i * 5
  local card, txn = ARGV[b], ARGV[b + 1]
  local ts, seq, cents = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4]
  local ek = p .. ':e:' .. card
  local st = state[card]
  if not st then
    local c = redis.call('HMGET', p .. ':c:' .. card, 'newest', 'last_seq')
    st = {newest = tonumber(c[1]), last_seq = tonumber(c[2])}
    state[card] = st
    touched[#touched + 1] = card
  end
  local prev = redis.call('HGET', ek, txn)
  if prev then
    if string.find(prev, '|L|', 1, true) then status[#status + 1] = 3 else status[#status + 1] = 2 end
  elseif st.last_seq and seq <= st.last_seq then
    status[#status + 1] = 4
  else
    local flag = 'A'
    if st.newest and ts < st.newest - lateness then flag = 'L' end
    local member = seq .. '|' .. cents .. '|' .. flag .. '|' .. txn
    redis.call('ZADD', p .. ':w:' .. card, ts, member)
    redis.call('HSET', ek, txn, member)
    if flag == 'A' then
      status[#status + 1] = 0
      if (not st.newest) or ts > st.newest then st.newest = ts end
    else
      status[#status + 1] = 1
    end
    st.last_seq = seq
  end
end

for _, card in ipairs(touched) do
  local st = state[card]
  local wk, ek, ck = p .. ':w:' .. card, p .. ':e:' .. card, p .. ':c:' .. card
  if st.newest then
    -- Events older than newest - retention can no longer count for any on-time event: drop them.
    local cutoff = st.newest - retention
    local oldest = redis.call('ZRANGE', wk, 0, 0, 'WITHSCORES')
    if oldest[2] and tonumber(oldest[2]) < cutoff then
      local old = redis.call('ZRANGEBYSCORE', wk, '-inf', '(' .. cutoff)
      for j = 1, #old, 500 do
        local ids = {}
        for k = j, math.min(j + 499, #old) do
          local m = old[k]
          local _, _, id = string.find(m, '^[^|]*|[^|]*|[^|]*|(.*)$')
          ids[#ids + 1] = id
        end
        redis.call('HDEL', ek, unpack(ids))
      end
      redis.call('ZREMRANGEBYSCORE', wk, '-inf', '(' .. cutoff)
    end
    -- The latest aggregate, as of the newest event, for inspection (`velocity features get`).
    local cnt, sum = 0, 0
    local live = redis.call('ZRANGEBYSCORE', wk, st.newest - window, st.newest)
    for _, m in ipairs(live) do
      local _, _, c, f = string.find(m, '^[^|]*|([^|]*)|([^|]*)|')
      if f == 'A' then cnt = cnt + 1; sum = sum + tonumber(c) end
    end
    redis.call('HSET', ck, 'newest', st.newest, 'last_seq', st.last_seq or -1, 'n10m', cnt, 'sum10m', sum,
      'updated', redis.call('TIME')[1])
  elseif st.last_seq then
    redis.call('HSET', ck, 'last_seq', st.last_seq)
  end
  redis.call('EXPIRE', wk, ttl)
  redis.call('EXPIRE', ek, ttl)
  redis.call('EXPIRE', ck, ttl)
end
return status
