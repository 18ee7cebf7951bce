#!lua flags=allow-cross-slot-keys
-- Restore archived window events into the online store (`velocity features rebuild`), merging with whatever a
-- running worker wrote meanwhile; one round trip per chunk of events.
-- ARGV: prefix, ttl_s, events, cuts
-- KEYS: none on a single node; under Redis Cluster one card's hash (routes the call): the events are those of the
-- cards this node owns (stores/redis_cluster_store.py), hence the flag allow-cross-slot-keys.
-- events: one flat JSON array card, txn_id, ts, cents, flag, seq, card, ..., all as decimal strings; flag A
-- (aggregated) or L (late); seq is the arrival position the worker assigned and archived.
-- Writes the same two keys per card as apply_events.lua (see there for their layout):
--   p:win:{<card>}   ZSET  score = ts, member = "seq|cents|flag|txn_id"
--   p:card:{<card>}  HASH  txn_id -> "seq|cents|flag|ts";  "" -> "last_seq|newest|oldest|trimmed"
-- A txn_id the hash already holds is left as it is (idempotent: rerunning a rebuild changes nothing). The card's
-- state is merged: last_seq and newest are maxima (so the next arrival's seq stays above every restored one),
-- oldest a minimum.
-- cuts: JSON object card -> the event time below which the rebuild left that card's archived events out (beyond
-- the retention): the card's `trimmed` becomes at least that, so a read reaching back further says so.
-- Returns the number of events written (those not already present).
local p = ARGV[1]
local ttl_s = ARGV[2]
local ev = cjson.decode(ARGV[3])
local cuts = cjson.decode(ARGV[4])
local find, call = string.find, redis.call
local written = 0

-- Events grouped by card, in the given order.
local order, by_card = {}, {}
for i = 1, #ev / 6 do
  local card = ev[6 * i - 5]
  local list = by_card[card]
  if not list then list = {}; by_card[card] = list; order[#order + 1] = card end
  list[#list + 1] = i
end

local function bigger(a, a_s, b, b_s)
  if not a or (b and b > a) then return b, b_s end
  return a, a_s
end

for c = 1, #order do
  local card = order[c]
  local hk, wk = p .. ':card:{' .. card .. '}', p .. ':win:{' .. card .. '}'
  local list = by_card[card]
  local fields = {''}
  for k = 1, #list do fields[k + 1] = ev[6 * list[k] - 4] end
  local got = call('HMGET', hk, unpack(fields))
  local last_seq, last_seq_s, newest, newest_s, oldest, oldest_s, trimmed, trimmed_s
  if got[1] then
    local _, _, a, b, o, t = find(got[1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    last_seq, last_seq_s = tonumber(a), a
    newest, newest_s = tonumber(b), b
    oldest, oldest_s = tonumber(o), o
    trimmed, trimmed_s = tonumber(t), t
  end
  local cut = cuts[card]
  if cut then trimmed, trimmed_s = bigger(trimmed, trimmed_s, tonumber(cut), cut) end
  local zadd, hset = {}, {}
  for k = 1, #list do
    local i = list[k]
    local txn, ts_s, cents, flag, seq_s = ev[6 * i - 4], ev[6 * i - 3], ev[6 * i - 2], ev[6 * i - 1], ev[6 * i]
    if not got[k + 1] then
      got[k + 1] = true -- a txn_id twice in one call is written once
      local ts, seq = tonumber(ts_s), tonumber(seq_s)
      zadd[#zadd + 1] = ts_s; zadd[#zadd + 1] = seq_s .. '|' .. cents .. '|' .. flag .. '|' .. txn
      hset[#hset + 1] = txn; hset[#hset + 1] = seq_s .. '|' .. cents .. '|' .. flag .. '|' .. ts_s
      last_seq, last_seq_s = bigger(last_seq, last_seq_s, seq, seq_s)
      if flag == 'A' then newest, newest_s = bigger(newest, newest_s, ts, ts_s) end
      if not oldest or ts < oldest then oldest, oldest_s = ts, ts_s end
      written = written + 1
    end
  end
  if #zadd > 0 then
    call('ZADD', wk, unpack(zadd))
    hset[#hset + 1] = ''
    hset[#hset + 1] = (last_seq_s or '') .. '|' .. (newest_s or '') .. '|' .. (oldest_s or '') .. '|' ..
        (trimmed_s or '')
    call('HSET', hk, unpack(hset))
    call('EXPIRE', hk, ttl_s)
    call('EXPIRE', wk, ttl_s)
  end
end
return written
