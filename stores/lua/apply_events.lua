#!lua flags=allow-cross-slot-keys
-- Apply a batch of window events to the online store, idempotently, in one round trip.
-- ARGV: prefix, allowed_lateness_ms, retention_ms, ttl_s, now_ms, now_us, events
-- events: one flat JSON array card, txn_id, ts, cents, card, ..., the numbers as decimal strings (one argument:
-- packing 4 per event costs the client more than the whole script costs Redis). Numbers travel as strings and are
-- handed to redis.call as strings: Redis 7.0 formats every Lua number argument with printf("%.17g"), which was ~15%
-- of the script's time.
-- Under Redis Cluster one call holds the cards of one node, routed by KEYS[1] (one card's hash;
-- stores/redis_cluster_store.py); the keys are computed here, hence the flag. The card key sits in a hash tag.
-- Two keys per card (prefix p), written with three calls per card per batch (HMGET, ZADD, HSET), however many of
-- its events the batch holds:
--   p:win:{<card>} ZSET  score = ts, member = "seq|cents|flag|txn_id"  (flag A = aggregated, L = late): the window
--                        events every declared stream window is folded from (read_features.lua)
--   p:card:{<card>} HASH  txn_id -> "seq|cents|flag|ts"  (idempotency: a txn_id is applied once; the read of a stored
--                        transaction takes its seq and ts from here)
--                        "" -> "last_seq|newest|oldest|trimmed"  (the card's state; a txn_id is never empty)
--     newest: the newest aggregated ts (lateness horizon); oldest: no stored event is older (a lower bound);
--     trimmed: events with ts below it may be gone. Under 64 bytes, so a small card's hash stays a listpack.
-- TTLs: both keys get ttl_s at the card's first write of each ttl_s/2 period of the worker's clock (the period of
-- the previous write is that of last_seq, in us), so they outlive the last write by at least ttl_s/2 without an
-- EXPIRE per batch.
-- Nothing here serves inspection only: `velocity features get` shows what the read script folds.
-- seq is the card's arrival position: strictly increasing per card, max(previous + 1, the worker's clock in us).
-- It survives a recreated topic, a changed partition count and an emptied Redis (the clock keeps counting), and
-- seq // 1000 is the arrival time in ms (what snapshot visibility is judged against).
-- The lateness horizon is min(newest, now) - lateness: an event stamped ahead of the worker's clock cannot push
-- a card's horizon into the future.
-- Retention: events older than horizon - retention are dropped with their idempotency records once the oldest
-- stored event is retention/8 past that cut (so a card is trimmed at most once per retention/8 of event time,
-- not on every batch), and a card idle for longer than the retention drops everything with one DEL.
-- Returns, flat, per event: status, seq. status 0 applied, 1 late, 2 duplicate of an applied event,
-- 3 duplicate of a late event; seq is the one assigned, or for a duplicate the stored one.
-- With ARGV[8] (the stream scorer's: window lengths in ms, comma-separated, e.g. "600000,60000"): { that flat list,
-- per event its window statistics, per event its stored record "seq|cents|flag|ts" for a duplicate, else false }.
-- An event's statistics are SPEC section 4's fold (featurestore/windows.py `window_aggregate`) as of its own arrival,
-- read after its card's writes: { newest, then per window count, sum, min, max in cents }, over the event itself
-- plus the card's on-time members that arrived before it (seq below its seq; a card's seqs are unique, so that also
-- leaves the event itself out) with ts in [t - window, t]; newest is the largest such member ts within the longest
-- window, false when none counts (what the scorer's feature ages use). t, seq and cents are a duplicate's stored
-- ones. tests/test_stream_reads.py checks them against the read script's reply folded by the scorer in Python.
-- Cost: a quiet card's window (few members: most cards, most of the time) is read afresh for each event, one
-- ZRANGEBYSCORE. A busy card (BUSY members or more in its longest window around the batch's events, or BUSY of its
-- events in the batch) does not re-read each new event's members: p:agg:{<card>} (a STRING, written in this mode
-- only, for busy cards) keeps the members' statistics as of the card's last arrival:
-- "windows|seq|zcard|t|newest|count|sum|min|max|nmin|nmax|..." (nmin/nmax: how many members hold the min/max).
-- The next arrival at t' >= t moves each window by the members entering (t, t'] and leaving [t - w, t' - w) (the
-- last member holding the minimum or maximum leaving makes that window be re-read); an arrival before t, a
-- duplicate, a changed card (its seq or member count not the recorded ones: another writer, a scoring-off batch, a
-- rebuild, a merge) or a trim re-reads [t - longest, t]. So a busy card costs a few members per event, not its
-- whole window. For a quiet card the cache cost more than it saved (reading, checking, formatting and writing it
-- back: 87 against 48 us of Redis CPU per event at seed scale, bench/RESULTS.md). ARGV[9]: BUSY (default 32; tests
-- set it low).
local p = ARGV[1]
local lateness = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local ttl_s = ARGV[4]
local half = tonumber(ttl_s) / 2
local now_ms = tonumber(ARGV[5])
local period = math.floor(now_ms / 1000 / half)
local now_us_s = ARGV[6]
local now_us = tonumber(now_us_s)
local ev = cjson.decode(ARGV[7]) -- flat: card, txn_id, ts, cents, card, ...
local slack = math.floor(retention / 8)
local fmt, find, call, unpack, min = string.format, string.find, redis.call, unpack, math.min
local CHUNK = 1000 -- arguments per unpack (Lua's C stack holds ~8000); even, so pairs stay whole
local out = {}
local spec = ARGV[8] or ''
local wins, nw, wmax = {}, 0, 0 -- the windows to compute statistics for (see Returns)
for w in string.gmatch(spec, '%d+') do
  nw = nw + 1; wins[nw] = tonumber(w)
  if wins[nw] > wmax then wmax = wins[nw] end
end
local stats, recs = {}, {}
local et, es, ec = {}, {}, {} -- per event: ts, seq, cents of the record it is scored as (nw > 0)

-- A command over one key and the first n arguments of a buffer, in bounded calls; a table reply is joined.
local function many(cmd, key, args, n)
  if n <= CHUNK then return call(cmd, key, unpack(args, 1, n)) end
  local got = {}
  for j = 1, n, CHUNK do
    local r = call(cmd, key, unpack(args, j, min(j + CHUNK - 1, n)))
    if type(r) == 'table' then for _, v in ipairs(r) do got[#got + 1] = v end end
  end
  return got
end

-- Events by card, in arrival order within each card (cards are independent: one pass per card). Each card's
-- events are a chain through nxt (no table per card).
local order, head, tail, nxt = {}, {}, {}, {}
for i = 1, #ev / 4 do
  local card = ev[4 * i - 3]
  if ev[4 * i - 2] == '' then return redis.error_reply('empty txn_id') end -- before anything is written
  local t = tail[card]
  if t then nxt[t] = i else head[card] = i; order[#order + 1] = card end
  tail[card] = i
end

-- Window statistics (nw > 0): st holds per window w, at 6w-5 .. 6w, count, sum, min, max, and how many members
-- hold the min and the max (min/max nil when empty): a member leaving that held the min (max) makes the window be
-- re-read only when no other member holds it, so tied amounts cost nothing.
local S = 6
-- A card whose longest window (around its events of the batch) holds at least BUSY members, or with BUSY events
-- in the batch, keeps the cache; a quieter one is read afresh (see Cost). ARGV[9] overrides the default.
local BUSY = tonumber(ARGV[9] or '') or 32
-- The on-time members of wk with ts in [lo, hi] (an exclusive bound is given as '(' .. n) that arrived before seq
-- s, as {ts, cents} pairs in ts order.
local function members(wk, lo, hi, s)
  local r = call('ZRANGEBYSCORE', wk, lo, hi, 'WITHSCORES')
  local out, n = {}, 0
  for k = 1, #r, 2 do
    local _, _, sq, c, f = find(r[k], '^(%d+)|([^|]*)|(.)')
    if f ~= 'L' and tonumber(sq) < s then
      out[n + 1] = tonumber(r[k + 1]); out[n + 2] = tonumber(c); n = n + 2
    end
  end
  return out, n
end

local function empty(st, w)
  local o = S * w - 5
  st[o], st[o + 1], st[o + 2], st[o + 3], st[o + 4], st[o + 5] = 0, 0, nil, nil, 0, 0
end

local function put(st, w, y) -- one member into window w
  local o = S * w - 5
  st[o], st[o + 1] = st[o] + 1, st[o + 1] + y
  local mn, mx = st[o + 2], st[o + 3]
  if not mn or y < mn then st[o + 2], st[o + 4] = y, 1 elseif y == mn then st[o + 4] = st[o + 4] + 1 end
  if not mx or y > mx then st[o + 3], st[o + 5] = y, 1 elseif y == mx then st[o + 5] = st[o + 5] + 1 end
end

local function reread(wk, st, w, t, s) -- window w of [t - w, t] from scratch
  empty(st, w)
  local m, n = members(wk, fmt('%d', t - wins[w]), fmt('%d', t), s)
  for k = 1, n, 2 do put(st, w, m[k + 1]) end
end

-- The members' statistics for an event at (t, seq s): from scratch, or moved on from the cache C = {t, st, newest}
-- of the card's previous arrival (nil: none usable). Returns st, newest. `bound`: no on-time member that arrived
-- before s has a ts above it (nil: not known); below t - wmax, no window of the event holds a member, so none is
-- read (most events of a quiet card: its previous event is more than the longest window before).
local function window_stats(wk, t, s, C, bound)
  local st, newest = {}, nil
  if not C or t < C.t then
    for w = 1, nw do empty(st, w) end
    if bound and bound < t - wmax then return st, nil end
    local m, n = members(wk, fmt('%d', t - wmax), fmt('%d', t), s)
    for k = 1, n, 2 do
      local ts, y = m[k], m[k + 1]
      newest = ts -- ts order: the last one is the newest
      for w = 1, nw do if ts >= t - wins[w] then put(st, w, y) end end
    end
    return st, newest
  end
  local tc = C.t
  for k = 1, S * nw do st[k] = C.st[k] end
  newest = C.newest
  if t == tc then return st, newest end
  local add, na = members(wk, '(' .. fmt('%d', tc), fmt('%d', t), s)
  for w = 1, nw do
    local lo, o = t - wins[w], S * w - 5
    if lo > tc then -- the whole window is new: it is all in (tc, t]
      empty(st, w)
      for k = 1, na, 2 do if add[k] >= lo then put(st, w, add[k + 1]) end end
    else
      local gone, ng = members(wk, fmt('%d', tc - wins[w]), '(' .. fmt('%d', lo), s)
      local dirty = false
      for k = 2, ng, 2 do
        local y = gone[k]
        st[o], st[o + 1] = st[o] - 1, st[o + 1] - y
        if y == st[o + 2] then st[o + 4] = st[o + 4] - 1; dirty = dirty or st[o + 4] == 0 end
        if y == st[o + 3] then st[o + 5] = st[o + 5] - 1; dirty = dirty or st[o + 5] == 0 end
      end
      if dirty then
        reread(wk, st, w, t, s)
      else
        for k = 1, na, 2 do put(st, w, add[k + 1]) end
      end
    end
  end
  for k = 1, na, 2 do if add[k] >= t - wmax then newest = add[k] end end
  if newest and newest < t - wmax then newest = nil end
  return st, newest
end

local function cache_of(v, last_seq_s, zcard) -- the card's cache, when it is this spec's and the card's state
  local _, e, vs, seq, zc, t, nt = find(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)')
  if vs ~= spec or seq ~= last_seq_s or tonumber(zc) ~= zcard then return nil end
  local st, k = {}, 0
  for x in string.gmatch(string.sub(v, e + 1), '[^|]+') do
    k = k + 1
    st[k] = tonumber(x) -- 'n' (an empty window's min/max) -> nil
  end
  if k ~= S * nw then return nil end
  return {t = tonumber(t), st = st, newest = tonumber(nt)}
end

local function cache_text(C, s, zcard)
  local parts = {spec, fmt('%d', s), fmt('%d', zcard), fmt('%d', C.t), C.newest and fmt('%d', C.newest) or 'n'}
  for k = 1, S * nw do parts[5 + k] = C.st[k] and fmt('%d', C.st[k]) or 'n' end
  return table.concat(parts, '|')
end

local fields, zadd, hset = {''}, {}, {'', false} -- reused buffers (explicit lengths): no tables per card
for c = 1, #order do
  local card = order[c]
  local hk, wk, ak = p .. ':card:{' .. card .. '}', p .. ':win:{' .. card .. '}', p .. ':agg:{' .. card .. '}'
  local i, nf = head[card], 1
  local lo_t, hi_t -- the span of the card's event times in this batch (nw > 0: is its window busy?)
  while i do
    nf = nf + 1; fields[nf] = ev[4 * i - 2]
    if nw > 0 then
      local x = tonumber(ev[4 * i - 1])
      if not lo_t or x < lo_t then lo_t = x end
      if not hi_t or x > hi_t then hi_t = x end
    end
    i = nxt[i]
  end
  -- A busy card's statistics move on from its cache; a quiet one's are read afresh (see Cost).
  local busy = nw > 0 and nf - 1 >= BUSY
  -- One call: the card's state and the stored record of each of its txn_ids in this batch.
  local got = many('HMGET', hk, fields, nf)
  local last_seq, last_seq_s, newest, newest_s, oldest, oldest_s, trimmed, trimmed_s = 0
  local refresh = true
  local cached -- the card's p:agg cache text and its state then (nw > 0)
  if got[1] then
    local _, _, a, b, o, t = find(got[1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    last_seq = tonumber(a) or 0
    if nw > 0 then
      local zcard = call('ZCARD', wk)
      busy = busy or (zcard >= BUSY and call('ZCOUNT', wk, lo_t - wmax, hi_t) >= BUSY)
      if busy then cached = {call('GET', ak), a, zcard} end
    end
    newest, newest_s = tonumber(b), b
    oldest, oldest_s = tonumber(o), o
    trimmed, trimmed_s = tonumber(t), t
    refresh = math.floor(last_seq / 1e6 / half) ~= period
  end
  local first_ts = tonumber(ev[4 * head[card] - 1])
  local dropped = false
  if newest and first_ts - retention > min(newest, now_ms) and not got[2] then
    -- The card was idle for longer than the retention: all it has stored is older than the cutoff this event
    -- sets, so drop it in one call instead of trimming it record by record (replayed history meeting live
    -- traffic does this for every card at once). TTLs are set again below.
    call('DEL', hk, wk, ak)
    cached = nil
    trimmed = math.max(trimmed or 0, first_ts - retention); trimmed_s = fmt('%d', trimmed)
    oldest, oldest_s, refresh = nil, nil, true
    dropped = true
  end
  -- The card's newest on-time event time before this batch (the state keeps it as the maximum over its on-time
  -- members, here and in restore_events.lua and the key rotation): nil when not known (no state, or just dropped).
  local stored_newest = (got[1] and not dropped) and newest or nil
  local nz, nh = 0, 2 -- hset[1], hset[2]: the state, set below
  local pending -- txn_id -> record, for a txn_id repeated within this batch (created when one may be)
  if nf > 2 then pending = {} end
  local new_oldest, new_oldest_s
  local j = 1
  i = head[card]
  while i do
    j = j + 1
    local txn, ts_s, cents = ev[4 * i - 2], ev[4 * i - 1], ev[4 * i]
    local rec = (pending and pending[txn]) or (not dropped and got[j])
    if rec then
      local _, _, prev_seq, prev_cents, prev_flag, prev_ts = find(rec, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
      out[2 * i - 1] = (prev_flag == 'L') and 3 or 2
      out[2 * i] = tonumber(prev_seq)
      if nw > 0 then
        recs[i] = rec
        et[i], es[i], ec[i] = tonumber(prev_ts), tonumber(prev_seq), tonumber(prev_cents)
      end
    else
      local ts = tonumber(ts_s)
      if nw > 0 then recs[i] = false end
      local seq, seq_s = last_seq + 1, nil
      if now_us >= seq then seq, seq_s = now_us, now_us_s else seq_s = fmt('%d', seq) end
      local flag = 'A'
      if newest and ts < min(newest, now_ms) - lateness then flag = 'L' end
      local head_s = seq_s .. '|' .. cents .. '|' .. flag .. '|'
      rec = head_s .. ts_s
      zadd[nz + 1] = ts_s; zadd[nz + 2] = head_s .. txn; nz = nz + 2
      hset[nh + 1] = txn; hset[nh + 2] = rec; nh = nh + 2
      if pending then pending[txn] = rec end
      if (not new_oldest) or ts < new_oldest then new_oldest, new_oldest_s = ts, ts_s end
      if flag == 'A' then
        out[2 * i - 1] = 0
        if (not newest) or ts > newest then newest, newest_s = ts, ts_s end
      else
        out[2 * i - 1] = 1
      end
      out[2 * i] = seq
      if nw > 0 then et[i], es[i], ec[i] = ts, seq, tonumber(cents) end
      last_seq, last_seq_s = seq, seq_s
    end
    i = nxt[i]
  end
  if nz > 0 then
    local h = min(newest, now_ms)
    if oldest and oldest < h - retention - slack then
      -- Events older than the horizon - retention can no longer count for any on-time event: drop them
      -- together with their idempotency records, and remember where the store's memory of this card starts.
      local cut = h - retention
      local cutoff = '(' .. fmt('%d', cut)
      local old = call('ZRANGEBYSCORE', wk, '-inf', cutoff)
      if #old > 0 then
        local ids = {}
        for k = 1, #old do
          local _, _, id = find(old[k], '^[^|]*|[^|]*|[^|]*|(.*)$')
          ids[k] = id
        end
        many('HDEL', hk, ids, #ids)
        call('ZREMRANGEBYSCORE', wk, '-inf', cutoff)
        cached = nil -- members left: the cache's counts may hold them
      end
      trimmed = math.max(trimmed or 0, cut); trimmed_s = fmt('%d', trimmed)
      oldest, oldest_s = cut, fmt('%d', cut) -- what is left is at or after the cut
    end
    if (not oldest) or new_oldest < oldest then oldest, oldest_s = new_oldest, new_oldest_s end
    many('ZADD', wk, zadd, nz)
    hset[2] = last_seq_s .. '|' .. newest_s .. '|' .. oldest_s .. '|' .. (trimmed_s or '')
    many('HSET', hk, hset, nh)
    if refresh then
      call('EXPIRE', hk, ttl_s)
      call('EXPIRE', wk, ttl_s)
    end
  end
  if nw > 0 then
    local C = cached and cached[1] and cache_of(cached[1], cached[2], cached[3]) -- as of the card's last arrival
    local moved, last = false, nil
    -- Above the ts of every on-time member that arrived before the event at hand: the stored ones, then this
    -- batch's on-time events as they go (a duplicate's members arrived before its stored seq: fewer still).
    local bound = stored_newest
    i = head[card]
    while i do
      local t, s, x = et[i], es[i], ec[i]
      local st, nwst
      if recs[i] then -- a duplicate: as of its stored arrival; the cache is not its predecessor's
        st, nwst = window_stats(wk, t, s, nil, bound)
      else
        st, nwst = window_stats(wk, t, s, C, bound)
        if busy then
          -- The cache for the next arrival: these members, plus this event where it counts for others.
          local next_st = {}
          for k = 1, S * nw do next_st[k] = st[k] end
          local n_newest = nwst
          if out[2 * i - 1] == 0 then
            for w = 1, nw do put(next_st, w, x) end
            n_newest = t
          end
          C = {t = t, st = next_st, newest = n_newest}
          moved, last = true, s
        end
      end
      local o = {nwst or false}
      for w = 1, nw do
        local q, r = S * w - 5, 4 * w - 3
        o[r + 1], o[r + 2] = st[q] + 1, st[q + 1] + x
        o[r + 3] = (st[q + 2] and st[q + 2] < x) and st[q + 2] or x
        o[r + 4] = (st[q + 3] and st[q + 3] > x) and st[q + 3] or x
      end
      stats[i] = o
      if bound and out[2 * i - 1] == 0 and t > bound then bound = t end
      i = nxt[i]
    end
    if moved then call('SET', ak, cache_text(C, last, call('ZCARD', wk)), 'EX', ttl_s) end
  end
end
if nw > 0 then return {out, stats, recs} end
return out
