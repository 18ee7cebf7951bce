-- Everything one score needs, in one round trip.
-- ARGV: prefix, card, txn_id, ts, window_ms
-- Returns: { stored member of txn_id or false,
--            window members with ts in [t - window, t] as a flat member/score list,
--            1-week snapshot cutoff (latest <= t) or false, its count or false, its summed cents or false }
local p, card, txn = ARGV[1], ARGV[2], ARGV[3]
local ts, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local wk = p .. ':w:' .. card
local stored = redis.call('HGET', p .. ':e:' .. card, txn)
if stored then
  local score = redis.call('ZSCORE', wk, stored)
  if score then ts = tonumber(score) end
end
local members = redis.call('ZRANGEBYSCORE', wk, ts - window, ts, 'WITHSCORES')
local cutoff, n1w, s1w = false, false, false
local latest = redis.call('ZREVRANGEBYSCORE', p .. ':w1:cutoffs', ts, '-inf', 'LIMIT', 0, 1)
if latest[1] then
  cutoff = latest[1]
  local snap = redis.call('HGET', p .. ':w1:index', cutoff)
  if snap then
    local v = redis.call('HMGET', p .. ':w1:' .. snap .. ':' .. card, 'n', 's')
    n1w, s1w = v[1] or '0', v[2] or '0'
  else
    cutoff = false
  end
end
return {stored or false, members, cutoff, n1w, s1w, tostring(ts)}
