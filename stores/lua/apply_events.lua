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
-- With ARGV[8] (window_ms > 0, the stream scorer's): { that flat list, per card in order of first appearance its
-- window members with ts in [lowest ts - window_ms, highest ts] of its events here (a duplicate's stored ts), read
-- after its writes, as a flat member/score list (read_features.lua's), per event its stored record
-- "seq|cents|flag|ts" for a duplicate, else false }: what the scorer folds, so nothing is read back per event.
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
local want_w = tonumber(ARGV[8] or '0') or 0 -- > 0: also return the windows (see Returns)
local wins, recs = {}, {}

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

local fields, zadd, hset = {''}, {}, {'', false} -- reused buffers (explicit lengths): no tables per card
for c = 1, #order do
  local card = order[c]
  local hk, wk = p .. ':card:{' .. card .. '}', p .. ':win:{' .. card .. '}'
  local i, nf = head[card], 1
  while i do
    nf = nf + 1; fields[nf] = ev[4 * i - 2]
    i = nxt[i]
  end
  -- One call: the card's state and the stored record of each of its txn_ids in this batch.
  local got = many('HMGET', hk, fields, nf)
  local last_seq, last_seq_s, newest, newest_s, oldest, oldest_s, trimmed, trimmed_s = 0
  local refresh = true
  if got[1] then
    local _, _, a, b, o, t = find(got[1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    last_seq = tonumber(a) or 0
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
    call('DEL', hk, wk)
    trimmed = math.max(trimmed or 0, first_ts - retention); trimmed_s = fmt('%d', trimmed)
    oldest, oldest_s, refresh = nil, nil, true
    dropped = true
  end
  local nz, nh = 0, 2 -- hset[1], hset[2]: the state, set below
  local pending -- txn_id -> record, for a txn_id repeated within this batch (created when one may be)
  if nf > 2 then pending = {} end
  local new_oldest, new_oldest_s
  local lo, hi -- the card's event times here (a duplicate's stored one), for the windows returned
  local j = 1
  i = head[card]
  while i do
    j = j + 1
    local txn, ts_s, cents = ev[4 * i - 2], ev[4 * i - 1], ev[4 * i]
    local rec = (pending and pending[txn]) or (not dropped and got[j])
    if rec then
      local _, _, prev_seq, prev_flag, prev_ts = find(rec, '^([^|]*)|[^|]*|([^|]*)|(.*)$')
      out[2 * i - 1] = (prev_flag == 'L') and 3 or 2
      out[2 * i] = tonumber(prev_seq)
      if want_w > 0 then
        recs[i] = rec
        local t = tonumber(prev_ts)
        if (not lo) or t < lo then lo = t end
        if (not hi) or t > hi then hi = t end
      end
    else
      local ts = tonumber(ts_s)
      if want_w > 0 then
        recs[i] = false
        if (not lo) or ts < lo then lo = ts end
        if (not hi) or ts > hi then hi = ts end
      end
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
  if want_w > 0 then wins[c] = call('ZRANGEBYSCORE', wk, fmt('%d', lo - want_w), fmt('%d', hi), 'WITHSCORES') end
end
if want_w > 0 then return {out, wins, recs} end
return out
