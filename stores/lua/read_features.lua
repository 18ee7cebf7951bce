-- Everything one score needs, in one round trip.
-- ARGV: prefix, card, txn_id, ts, window_ms, arrival_ms, now_ms
--   txn_id: '' reads the windows without a transaction of the card's own (inspection)
--   arrival_ms: when the transaction reached the store, for one it has not seen (a stored one's is its seq // 1000)
-- window_ms: the longest stream window declared (each group folds its own out of these members)
-- Keys: see apply_events.lua (p:card:<card> holds the card's state and its idempotency records, p:win:<card> its
-- window events).
-- Returns: { stored record of txn_id ("seq|cents|flag|ts") or false,
--            window members with ts in [t - window, t] as a flat member/score list,
--            the batch snapshot's cut-off or false, the card's statistics in it as a flat field/value list
--            (empty: the card had no transactions in that window) or false,
--            the ts used, where the card's stored events start (events below may be trimmed) or false,
--            1 when the chosen snapshot has expired from the store (its values are unknown here) else 0 }
-- The snapshot is the one with the latest cut-off <= t among those published at or before the arrival.
local p, card, txn = ARGV[1], ARGV[2], ARGV[3]
local ts, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local arrival, now = tonumber(ARGV[6]), tonumber(ARGV[7])
local got = redis.call('HMGET', p .. ':card:' .. card, '', txn)
local state, stored = got[1], got[2]
if txn == '' then stored = false end
if stored then
  local _, _, seq, t = string.find(stored, '^([^|]*)|[^|]*|[^|]*|(.*)$')
  ts = tonumber(t)
  arrival = math.floor(tonumber(seq) / 1000)
end
local members = redis.call('ZRANGEBYSCORE', p .. ':win:' .. card, ts - window, ts, 'WITHSCORES')
local trimmed = false
if state then
  local _, _, t = string.find(state, '^[^|]*|[^|]*|[^|]*|([^|]*)$')
  if t and t ~= '' then trimmed = t end
end
local cutoff, stats, expired = false, false, 0
local candidates = redis.call('ZREVRANGEBYSCORE', p .. ':w1:cutoffs', ts, '-inf', 'LIMIT', 0, 64)
for _, c in ipairs(candidates) do
  local entry = redis.call('HGET', p .. ':w1:index', c)
  if entry then
    local _, _, snap, published, expires = string.find(entry, '^([^|]*)|([^|]*)|([^|]*)$')
    if tonumber(published) <= arrival then
      cutoff = c
      local e = tonumber(expires)
      if e > 0 and e <= now then
        expired = 1
      else
        stats = redis.call('HGETALL', p .. ':w1:' .. snap .. ':' .. card)
      end
      break
    end
  end
end
return {stored or false, members, cutoff, stats, string.format('%d', ts), trimmed, expired}
