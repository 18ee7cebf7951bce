#!lua flags=no-writes,allow-cross-slot-keys
-- Redis Cluster only (stores/redis_cluster_store.py): a merchant's nightly statistics, read on the merchant's node
-- in the same pipeline as the card's read (read_features.lua), from that node's copy of the snapshot index.
-- KEYS[1]: any key in the merchant's slot (routes the call); the keys read are computed here, all on this node.
-- ARGV: prefix, index suffix (this node's copy: p:w1:index<suffix>, p:w1:cutoffs<suffix>), ts, arrival_ms, now_ms,
--   merchant_tag (stores/online_snapshots.py `entity_tag`), merchant groups "g1,g2"
-- Returns, flat: cut-off, the merchant's statistics ("<group>:<stat>"/value flat list) for each night that serves
-- a merchant group at this arrival (the same walk as read_features.lua), newest first; an expired night ends it.
local p, suffix = ARGV[1], ARGV[2]
local ts, arrival, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tag = ARGV[6]
local want, nwant = {}, 0
for g in string.gmatch(ARGV[7], '[^,]+') do
  want[g] = true
  nwant = nwant + 1
end
local out = {}
local candidates = redis.call('ZREVRANGEBYSCORE', p .. ':w1:cutoffs' .. suffix, ts, '-inf', 'LIMIT', 0, 64)
for _, c in ipairs(candidates) do
  if nwant == 0 then break end
  local entry = redis.call('HGET', p .. ':w1:index' .. suffix, c)
  if entry then
    local _, _, snap, published, expires, held = string.find(entry, '^([^|]*)|([^|]*)|([^|]*)|?(.*)$')
    if tonumber(published) <= arrival then
      if held == '' then break end
      local mine = false
      for g in string.gmatch(held, '[^,]+') do
        if want[g] then
          want[g] = nil
          nwant = nwant - 1
          mine = true
        end
      end
      local e = tonumber(expires)
      if e > 0 and e <= now then break end
      if mine then
        out[#out + 1] = c
        out[#out + 1] = redis.call('HGETALL', p .. ':snap:' .. snap .. ':' .. tag)
      end
    end
  end
end
return out
