#!lua flags=no-writes,allow-cross-slot-keys
-- Everything one score needs, in one round trip: the card's window events, and the card's and the merchant's
-- nightly snapshot groups.
-- ARGV: prefix, card, txn_id, ts, window_ms, arrival_ms, now_ms, card_tag, merchant_tag, batch groups, index suffix
--   txn_id: '' reads the windows without a transaction of the card's own (inspection)
--   arrival_ms: when the transaction reached the store, for one it has not seen (a stored one's is its seq // 1000)
--   window_ms: the longest stream window declared (each group folds its own out of these members)
--   card_tag, merchant_tag: the entities' parts of their snapshot key names (stores/online_snapshots.py
--   `entity_tag`); merchant_tag '' reads no merchant
--   batch groups: the declared nightly groups to resolve, "g1,g2,..."
--   index suffix: '' on a single node; under Redis Cluster this node's copy of the index (stores/redis_cluster_store.py)
-- KEYS: none on a single node; under Redis Cluster the card's hash, which routes the call to the card's node. The
-- keys read are computed here: all of them live on that node (the card's keys share its hash tag, the index copy is
-- this node's, the merchant is read here only when it lives here), hence the flag allow-cross-slot-keys.
-- Keys: see apply_events.lua (p:card:{<card>} holds the card's state and its idempotency records, p:win:{<card>} its
-- window events) and stores/online_snapshots.py (p:w1:index, p:w1:cutoffs, p:snap:<snap_id>:<tag>).
-- Returns: { stored record of txn_id ("seq|cents|flag|ts") or false,
--            window members with ts in [t - window, t] as a flat member/score list,
--            the cut-off of the latest visible night or false,
--            the nights serving the groups, newest first, each { cut-off, "g1,g2" (the groups it serves),
--              the card's statistics ("<group>:<stat>"/value flat list; empty: in none of its windows) or false,
--              the merchant's (the same) or false },
--            the ts used, where the card's stored events start (events below may be trimmed) or false,
--            1 when a group's night has expired from the store (its values are unknown here) else 0 }
-- Each group is served by the night with the latest cut-off <= t among those published at or before the arrival
-- that hold it (one nightly run publishes all its groups together, so that is normally one night for all).
-- The walk stops at the first expired night: older ones are superseded and expired too. A group no night holds
-- is not an error (a night without it: NaN, as before any snapshot).
local p, card, txn = ARGV[1], ARGV[2], ARGV[3]
local ts, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local arrival, now = tonumber(ARGV[6]), tonumber(ARGV[7])
local card_tag, merchant_tag = ARGV[8], ARGV[9]
local suffix = ARGV[11] or ''
local got = redis.call('HMGET', p .. ':card:{' .. card .. '}', '', txn)
local state, stored = got[1], got[2]
if txn == '' then stored = false end
if stored then
  local _, _, seq, t = string.find(stored, '^([^|]*)|[^|]*|[^|]*|(.*)$')
  ts = tonumber(t)
  arrival = math.floor(tonumber(seq) / 1000)
end
local members = redis.call('ZRANGEBYSCORE', p .. ':win:{' .. card .. '}', ts - window, ts, 'WITHSCORES')
local trimmed = false
if state then
  local _, _, t = string.find(state, '^[^|]*|[^|]*|[^|]*|([^|]*)$')
  if t and t ~= '' then trimmed = t end
end
local want, nwant = {}, 0
for g in string.gmatch(ARGV[10], '[^,]+') do
  want[g] = true
  nwant = nwant + 1
end
local latest, nights, expired = false, {}, 0
local candidates = redis.call('ZREVRANGEBYSCORE', p .. ':w1:cutoffs' .. suffix, ts, '-inf', 'LIMIT', 0, 64)
for _, c in ipairs(candidates) do
  if nwant == 0 then break end
  local entry = redis.call('HGET', p .. ':w1:index' .. suffix, c)
  if entry then
    local _, _, snap, published, expires, held = string.find(entry, '^([^|]*)|([^|]*)|([^|]*)|?(.*)$')
    if tonumber(published) <= arrival then
      if not latest then latest = c end
      -- An entry from before groups were recorded (older key layout): what it holds is unknown here.
      if held == '' then
        expired = 1
        break
      end
      local mine = {}
      for g in string.gmatch(held, '[^,]+') do
        if want[g] then
          want[g] = nil
          nwant = nwant - 1
          mine[#mine + 1] = g
        end
      end
      local e = tonumber(expires)
      local dead = e > 0 and e <= now
      if #mine > 0 then
        local cstats, mstats = false, false
        if dead then
          expired = 1
        else
          local base = p .. ':snap:' .. snap .. ':'
          cstats = redis.call('HGETALL', base .. card_tag)
          if merchant_tag ~= '' then mstats = redis.call('HGETALL', base .. merchant_tag) end
        end
        nights[#nights + 1] = {c, table.concat(mine, ','), cstats, mstats}
      end
      if dead then break end
    end
  end
end
return {stored or false, members, latest, nights, string.format('%d', ts), trimmed, expired}
