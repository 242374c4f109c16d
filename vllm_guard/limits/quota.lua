-- One tenant's buckets, reservations and concurrency leases, shared by guard replicas.
-- The same arithmetic as vllm_guard/core/quota.py (TokenBucket, TenantQuota), run
-- atomically in Redis on Redis's own clock.
--
-- KEYS[1] hash  buckets: "<dim>:l" level, "<dim>:r" reserved, "<dim>:u" updated (s)
-- KEYS[2] hash  open reservations: id -> tokens, and id .. "#" -> the dimensions it was
--               charged on (a reload, or a replica with another file, may pass others)
-- KEYS[3] zset  concurrency leases: id -> expiry (s, Redis time)
-- ARGV: op, id, tokens, lease_s, max_concurrent (-1: none), n, then n times
--       (dimension, capacity, rate per s, "r" for the requests dimension or "t"), then
--       optionally n levels for buckets Redis does not have (else they start full)
-- op: check | reserve | top_up | settle (tokens = used; id "!" + id: never sent) | renew
--     | catchup (below) | overdraw (reserve whatever the buckets say: into debt, past the
--     concurrency limit; shadow mode) | overdraw_top_up (top up into debt if the buckets
--     could pay within lease_s seconds, which this op reads as that wait)
-- Returns {granted 0/1, refusing dimension or "", retry_after_s, in_flight, level...};
-- numbers as strings (Lua numbers would be truncated to integers on the way out).

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local op, id = ARGV[1], ARGV[2]
local tokens, lease_s, max_conc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local KEEP_MS = 2 * 86400 * 1000  -- longer than the slowest bucket (a day) takes to refill

local function num(x) return string.format('%.17g', x) end

if op == 'renew' then  -- ARGV[7..]: the ids this replica still runs
  for i = 7, #ARGV do redis.call('ZADD', KEYS[3], 'XX', now + lease_s, ARGV[i]) end
  return {1, '', '0', '0'}
end

local dims = {}
local fresh = false  -- a bucket Redis does not have yet
for i = 0, n - 1 do
  local b = 7 + i * 4
  local d = {name = ARGV[b], cap = tonumber(ARGV[b + 1]), rate = tonumber(ARGV[b + 2]),
             per_request = ARGV[b + 3] == 'r'}
  local v = redis.call('HMGET', KEYS[1], d.name .. ':l', d.name .. ':r', d.name .. ':u')
  -- A new bucket starts full, or where the caller says (a Redis that lost its data)
  fresh = fresh or not v[1]
  d.level = tonumber(v[1]) or tonumber(ARGV[7 + n * 4 + i]) or d.cap
  d.reserved = tonumber(v[2]) or 0
  local updated = tonumber(v[3]) or now
  -- A lowered limit clips (level and holds fit the capacity), never refills
  d.level = math.min(d.level, d.cap - d.reserved)
  if now > updated then
    d.level = math.max(d.level, math.min(d.cap - d.reserved, d.level + (now - updated) * d.rate))
  end
  dims[#dims + 1] = d
end

local function settle(d, reserved, used)
  d.reserved = math.max(0, d.reserved - reserved)
  d.level = d.level + reserved - used
end

local by_name, names = {}, {}
for _, d in ipairs(dims) do
  by_name[d.name] = d
  names[#names + 1] = d.name
end
local charged_on = table.concat(names, ',')

-- End reservation `rid` of `held` tokens that used `req_used` requests and `tok_used`
-- tokens, on the dimensions it was charged on: those the caller passed settle as above;
-- any other (the caller's limits differ from the ones it was made under) gets its hold
-- back and its use taken directly on the stored fields.
local function release(rid, held, req_used, tok_used)
  local recorded = redis.call('HGET', KEYS[2], rid .. '#') or charged_on
  for name in string.gmatch(recorded, '[^,]+') do
    local per_request = name == 'requests_per_minute'
    local cost = per_request and 1 or held
    local used = per_request and req_used or tok_used
    local d = by_name[name]
    if d then
      settle(d, cost, used)
    else
      local v = redis.call('HMGET', KEYS[1], name .. ':l', name .. ':r')
      if v[2] then
        redis.call('HSET', KEYS[1], name .. ':l', num(tonumber(v[1]) + cost - used),
                   name .. ':r', num(math.max(0, tonumber(v[2]) - cost)))
      end
    end
  end
  redis.call('HDEL', KEYS[2], rid, rid .. '#')
  redis.call('ZREM', KEYS[3], rid)
end

local function record(rid, held)
  redis.call('HSET', KEYS[2], rid, num(held), rid .. '#', charged_on)
  redis.call('ZADD', KEYS[3], now + lease_s, rid)
end

-- Leases of replicas that stopped renewing: their requests count as having used all
-- they reserved (nobody can say less), and their concurrency frees.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, gone in ipairs(expired) do
  local held = tonumber(redis.call('HGET', KEYS[2], gone) or '0')
  release(gone, held, 1, held)
end

local function cost_of(d, amount)
  if d.per_request then return 1 end
  return amount
end

local function refusal(amount, token_dims_only)
  local worst, wait = '', 0
  for _, d in ipairs(dims) do
    if not (token_dims_only and d.per_request) then
      local cost = cost_of(d, amount)
      local w = 0
      if cost > d.cap then w = math.huge
      elseif cost > d.level then w = (cost - d.level) / d.rate end
      if w > wait then worst, wait = d.name, w end
    end
  end
  return worst, wait
end

local granted, worst, wait = 0, '', 0
if op == 'check' or op == 'reserve' or op == 'overdraw' then
  if op ~= 'check' and redis.call('HEXISTS', KEYS[2], id) == 1 then
    granted = 1  -- a retried reserve whose first answer was lost: charged once
  else
    worst, wait = refusal(tokens, false)
    if worst == '' and max_conc >= 0 and redis.call('ZCARD', KEYS[3]) >= max_conc then
      worst = 'max_concurrent'
    end
    if op == 'overdraw' or (worst == '' and op == 'reserve') then
      for _, d in ipairs(dims) do
        local cost = cost_of(d, tokens)
        d.level = d.level - cost
        d.reserved = d.reserved + cost
      end
      record(id, tokens)
      granted = 1
    end
  end
elseif op == 'top_up' or op == 'overdraw_top_up' then
  -- Only on the dimensions it was charged on (else the caller reserves anew).
  local recorded = redis.call('HGET', KEYS[2], id .. '#') or charged_on
  if redis.call('HEXISTS', KEYS[2], id) == 1 and recorded == charged_on then
    worst, wait = refusal(tokens, true)
    if worst == '' or (op == 'overdraw_top_up' and wait <= lease_s) then
      for _, d in ipairs(dims) do
        if not d.per_request then
          d.level = d.level - tokens
          d.reserved = d.reserved + tokens
        end
      end
      redis.call('HINCRBYFLOAT', KEYS[2], id, num(tokens))
      granted = 1
    end
  else
    worst = 'expired'  -- its lease ran out: the caller reserves anew
  end
elseif op == 'catchup' then
  -- A replica that ran on its own buckets while Redis was down: what its finished requests
  -- used (id = requests, tokens), then its running ones as reservations with leases
  -- (ARGV after the n seeds: id, tokens pairs). A bucket Redis lost starts at the seed,
  -- the replica's local level, which already counts all of it: nothing taken twice.
  local requests = tonumber(id)
  for _, d in ipairs(dims) do
    if not fresh then d.level = d.level - (d.per_request and requests or tokens) end
  end
  for k = 7 + n * 5, #ARGV, 2 do
    local rid, held = ARGV[k], tonumber(ARGV[k + 1])
    if redis.call('HEXISTS', KEYS[2], rid) == 0 then
      for _, d in ipairs(dims) do
        local cost = cost_of(d, held)
        if not fresh then d.level = d.level - cost end
        d.reserved = d.reserved + cost
      end
      record(rid, held)
    end
  end
  granted = 1
elseif op == 'settle' then
  local sent = string.sub(id, 1, 1) ~= '!'
  if not sent then id = string.sub(id, 2) end
  local held = redis.call('HGET', KEYS[2], id)
  if held then  -- else settled already, or expired (and charged whole)
    release(id, tonumber(held), sent and 1 or 0, sent and tokens or 0)
    granted = 1
  end
end

local out = {granted, worst, num(wait), tostring(redis.call('ZCARD', KEYS[3]))}
-- Written back only when something changed (refill alone is recomputed from the stored
-- state just as well); a settle of an unknown id leaves a missing bucket missing.
if granted == 1 or #expired > 0 or (fresh and op == 'reserve') then
  for _, d in ipairs(dims) do
    redis.call('HSET', KEYS[1], d.name .. ':l', num(d.level), d.name .. ':r', num(d.reserved),
               d.name .. ':u', num(now))
  end
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], KEEP_MS) end
end
for _, d in ipairs(dims) do out[#out + 1] = num(d.level) end
return out
