-- pag0's ledger in Redis: every operation is one call of this script (EVALSHA), so it
-- runs as one atomic step across all the scopes it touches. ARGV[1] is a JSON request;
-- the answer is a JSON string whose numbers are decimal strings (Lua's numbers are
-- doubles: amounts stay exact below 2^53, and are never printed in exponent form).
--
-- Keys (built by pag0, never taken from a client unescaped):
--   scope hashes (session, day, month): <f>spent, <f>reserved, <f>unconf, <f>expired,
--     <f>alerts (flags), where <f> is "" for the scope or "a:<agent>:" for an agent
--     budget inside the session hash; the session hash also has `killed` (the reason).
--   pag0:r:<id>   one reservation: st (held|settled|expired|released), amount, sc (its
--                 scopes as JSON, while held), cost; kept 10 minutes after it ends.
--   pag0:exp      reservations by deadline (ms, Redis's clock).
--   pag0:kills    kill switch changes by sequence number, for every Envoy to poll.
--   rate hashes   a spend-rate window (session or agent): slice start (s) -> amount
--                 counted in that slice, and `alerted` (when its last trip alert went).
--   report lists  each VM's report counts of a session, appended at its flush (merged
--                 by whoever reads them, and compacted into one entry by that reader).
--   session index a tenant's sessions by last reservation (the report's session list).
--   alert claims  pag0:al:...: an alert counted per Envoy, sent by the first claimant.
local req = cjson.decode(ARGV[1])
-- How long an ended reservation (and a release's tombstone) is kept: for a retry, a
-- reserve that arrives late after a Redis pause, and audits by `x-pag0-reservation`.
local RETAIN_MS = 600000

local function fmt(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hnum(key, field)
  return tonumber(redis.call('HGET', key, field) or '0') or 0
end

local function incr(key, field, by)
  if by ~= 0 then
    redis.call('HINCRBY', key, field, fmt(by))
  end
end

-- Alert flags: 1 threshold crossed, 2 budget exhausted, 4 kill switch. Raises `kind`
-- once per scope (per window for days and months): returns true the first time.
local function raise(key, f, kind)
  local flags = hnum(key, f .. 'alerts')
  if flags % (kind * 2) >= kind then
    return false
  end
  redis.call('HSET', key, f .. 'alerts', fmt(flags + kind))
  return true
end

-- The alerts a scope's committed spend crossed: [scope index, kind, spent, limit].
local function spend_alerts(scopes, out, tag)
  for i, sc in ipairs(scopes) do
    local spent = hnum(sc.k, sc.f .. 'spent')
    if sc.al and spent >= sc.al and raise(sc.k, sc.f, 1) then
      table.insert(out, { tag, fmt(i - 1), '1', fmt(spent), fmt(sc.l or 0) })
    end
    if sc.kl and spent >= sc.kl and raise(sc.k, sc.f, 4) then
      table.insert(out, { tag, fmt(i - 1), '4', fmt(spent), fmt(sc.l or 0) })
    end
    if sc.l and spent >= sc.l and raise(sc.k, sc.f, 2) then
      table.insert(out, { tag, fmt(i - 1), '2', fmt(spent), fmt(sc.l) })
    end
  end
end

-- Moves a held reservation's amount from reserved to spent (plus `extra`, which a
-- settlement uses for a cost other than the amount), counting it as unconfirmed or
-- expired when it is one.
local function charge(r, cost, counter)
  for _, sc in ipairs(r.sc) do
    incr(sc.k, sc.f .. 'reserved', -r.amount)
    incr(sc.k, sc.f .. 'spent', cost)
    if counter then
      incr(sc.k, sc.f .. counter, cost)
    end
  end
end

local function load(id)
  local fields = redis.call('HMGET', 'pag0:r:' .. id, 'st', 'amount', 'sc', 'rt')
  if not fields[1] then
    return nil
  end
  return {
    st = fields[1],
    amount = tonumber(fields[2]) or 0,
    sc = cjson.decode(fields[3] or '[]'),
    rt = cjson.decode(fields[4] or '[]'),
  }
end

-- A spend-rate window's live slices (start, amount), their sum and when it last
-- alerted; slices that slid out are removed.
local function rate_window(rt, now_s)
  local fields = redis.call('HGETALL', rt.k)
  local live, sum, alerted = {}, 0, 0
  for i = 1, #fields, 2 do
    local name, value = fields[i], tonumber(fields[i + 1]) or 0
    if name == 'alerted' then
      alerted = value
    else
      local start = tonumber(name) or 0
      if value > 0 and now_s - start < rt.w then
        table.insert(live, { start, value })
        sum = sum + value
      else
        redis.call('HDEL', rt.k, name)
      end
    end
  end
  return live, sum, alerted
end

-- Seconds until enough of the window has slid out for `amount` to fit.
local function rate_retry(live, sum, rt, amount, now_s)
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, slice in ipairs(live) do
    sum = sum - slice[2]
    if sum + amount <= rt.l then
      return math.max(slice[1] + rt.w - now_s, 1)
    end
  end
  return rt.w
end

-- What a reservation counted in spend-rate windows and did not cost goes back to the
-- slice it was counted in (if that slice is still in its window).
local function rate_back(r, cost)
  local back = r.amount - cost
  if back <= 0 then
    return
  end
  for _, c in ipairs(r.rt) do
    local counted = tonumber(redis.call('HGET', c.k, c.s) or '0') or 0
    if counted > 0 then
      redis.call('HSET', c.k, c.s, fmt(math.max(counted - back, 0)))
    end
  end
end

-- Turns a session's kill switch on or off and logs the change for every Envoy's poll.
local function switch(session, tenant, sid, on, reason, expire)
  if on then
    redis.call('HSET', session, 'killed', reason or 'manual')
  else
    redis.call('HDEL', session, 'killed')
  end
  if expire then
    redis.call('EXPIRE', session, fmt(expire))
  end
  local seq = redis.call('INCR', 'pag0:killseq')
  redis.call('ZADD', 'pag0:kills', fmt(seq),
    cjson.encode({ n = fmt(seq), t = tenant, s = sid, on = on, reason = reason, at = fmt(now_ms()) }))
  redis.call('ZREMRANGEBYRANK', 'pag0:kills', 0, -10001)
  return seq
end

-- Ends a reservation: its state and what it was charged, kept for audits (a day).
local function finish(id, st, cost)
  redis.call('HSET', 'pag0:r:' .. id, 'st', st, 'cost', fmt(cost))
  if st ~= 'expired' then
    -- An expired one keeps its scopes: a late settlement charges what the call cost.
    redis.call('HDEL', 'pag0:r:' .. id, 'sc', 'rt')
  end
  redis.call('PEXPIRE', 'pag0:r:' .. id, RETAIN_MS)
  redis.call('ZREM', 'pag0:exp', id)
end

-- Reservations past their deadline expire charged: their Envoy died mid-call (or lost
-- Redis for longer than the deadline), and the upstream may have been paid.
local function sweep(now)
  local due = redis.call('ZRANGEBYSCORE', 'pag0:exp', '-inf', fmt(now), 'LIMIT', 0, 64)
  for _, id in ipairs(due) do
    local r = load(id)
    if r and r.st == 'held' then
      charge(r, r.amount, 'expired')
      for _, sc in ipairs(r.sc) do
        if sc.f == '' then
          redis.call('HINCRBY', sc.k, 'expiredn', 1)
        end
      end
      finish(id, 'expired', r.amount)
    else
      redis.call('ZREM', 'pag0:exp', id)
    end
  end
  return #due
end

local function apply_items(items)
  local results = {}
  local alerts = {}
  for n, item in ipairs(items) do
    local id = item.id
    local r = load(id)
    local status
    if not r then
      redis.call('HSET', 'pag0:r:' .. id, 'st', 'released', 'amount', '0')
      redis.call('PEXPIRE', 'pag0:r:' .. id, RETAIN_MS)
      status = 'unknown'
    elseif r.st == 'held' then
      charge(r, item.cost, item.u and 'unconf' or nil)
      rate_back(r, item.cost)
      if item.cost > 0 then
        spend_alerts(r.sc, alerts, fmt(n - 1))
      end
      finish(id, 'settled', item.cost)
      status = 'settled'
    elseif r.st == 'expired' then
      -- Charged in full when it expired; the call did end after all: charge what it
      -- really cost instead.
      rate_back(r, item.cost)
      for _, sc in ipairs(r.sc) do
        incr(sc.k, sc.f .. 'spent', item.cost - r.amount)
        incr(sc.k, sc.f .. 'expired', -r.amount)
        if sc.f == '' then
          redis.call('HINCRBY', sc.k, 'expiredn', -1)
        end
        if item.u then
          incr(sc.k, sc.f .. 'unconf', item.cost)
        end
      end
      finish(id, 'settled', item.cost)
      status = 'late'
    else
      status = 'duplicate'
    end
    results[n] = status
  end
  return { r = results, alerts = alerts }
end

local function settle()
  sweep(now_ms())
  return apply_items(req.items)
end

local function reserve_one(now)
  local id = req.id
  local old = load(id)
  if old then
    -- A reservation its Envoy already gave up on (released first), or an id in use:
    -- never taken as this call's reservation.
    return ({ ok = false, code = 'DUPLICATE' })
  end
  local scopes = req.scopes
  -- Each scope's figures read once: spent, reserved (and the session's kill switch).
  local spent, reserved, view = {}, {}, {}
  for i, sc in ipairs(scopes) do
    local f = redis.call('HMGET', sc.k, sc.f .. 'spent', sc.f .. 'reserved')
    spent[i], reserved[i] = tonumber(f[1] or '0') or 0, tonumber(f[2] or '0') or 0
    view[i] = { fmt(spent[i]), fmt(reserved[i]) }
  end
  local killed = redis.call('HGET', req.session, 'killed')
  if killed then
    return ({ ok = false, code = 'KILL_SWITCH_ACTIVE', reason = killed, v = view })
  end
  local si = req.si + 1
  if req.killAt and spent[si] + reserved[si] >= req.killAt then
    local alerts = {}
    if raise(scopes[si].k, '', 4) then
      table.insert(alerts, { '', fmt(req.si), '4', fmt(spent[si]), fmt(scopes[si].l or 0) })
    end
    return ({ ok = false, code = 'KILL_SWITCH_ACTIVE', reason = 'threshold', v = view, alerts = alerts })
  end
  -- As much of the price as every scope and spend-rate window leaves, down to the
  -- least the call may cost.
  local amount = req.price
  for i, sc in ipairs(scopes) do
    if sc.l then
      amount = math.min(amount, math.max(sc.l - spent[i] - reserved[i], req.min))
    end
  end
  local now_s = math.floor(now / 1000)
  local rates, windows = req.rates or {}, {}
  for j, rt in ipairs(rates) do
    local live, sum, alerted = rate_window(rt, now_s)
    windows[j] = { live = live, sum = sum, alerted = alerted }
    amount = math.min(amount, math.max(rt.l - sum, req.min))
  end
  -- The spend-rate breakers first, as a single Envoy checks them at admission.
  for j, rt in ipairs(rates) do
    local w = windows[j]
    if w.sum + amount > rt.l then
      -- The first refusal of a window alerts (and, with killSession, kills).
      local alert = w.alerted == 0 or now_s - w.alerted >= rt.w
      if alert then
        redis.call('HSET', rt.k, 'alerted', fmt(math.max(now_s, 1)))
        redis.call('EXPIRE', rt.k, fmt(rt.w + rt.s))
        if rt.kill then
          switch(req.session, req.tenant, req.sid, true, 'breaker', req.x)
        end
      end
      return ({
        ok = false, code = 'SPEND_RATE_EXCEEDED', ri = fmt(j - 1), spent = fmt(w.sum),
        requested = fmt(amount), retry = fmt(rate_retry(w.live, w.sum, rt, amount, now_s)),
        alert = alert, v = view,
      })
    end
  end
  for i, sc in ipairs(scopes) do
    if sc.l and spent[i] + reserved[i] + amount > sc.l then
      local alerts = {}
      if raise(sc.k, sc.f, 2) then
        table.insert(alerts, { '', fmt(i - 1), '2', fmt(spent[i]), fmt(sc.l) })
      end
      return ({ ok = false, code = sc.c, i = fmt(i - 1), requested = fmt(amount), v = view, alerts = alerts })
    end
  end
  local touched = {}
  for i, sc in ipairs(scopes) do
    incr(sc.k, sc.f .. 'reserved', amount)
    view[i] = { fmt(spent[i]), fmt(reserved[i] + amount) }
    if sc.x and not touched[sc.k] then
      touched[sc.k] = true
      redis.call('EXPIRE', sc.k, fmt(sc.x))
    end
  end
  if req.index then
    local now_s = math.floor(now / 1000)
    redis.call('HSET', req.session, 'id', req.sid, 'last', fmt(now_s))
    if redis.call('ZADD', req.index, fmt(now_s), req.sid) == 1 then
      -- A new session in the tenant's index: keep the newest 10,000.
      redis.call('ZREMRANGEBYRANK', req.index, 0, -10001)
      redis.call('EXPIRE', req.index, fmt(req.x or 2592000))
    end
  end
  local key = 'pag0:r:' .. id
  local held = {}
  for i, sc in ipairs(scopes) do
    held[i] = { k = sc.k, f = sc.f, l = sc.l, al = sc.al, kl = sc.kl }
  end
  -- Held without an expiry of its own: only a sweep (or a settlement) ends it.
  redis.call('HSET', key, 'st', 'held', 'amount', fmt(amount), 'sc', cjson.encode(held))
  if #rates > 0 then
    local counted = {}
    for j, rt in ipairs(rates) do
      local slice = fmt(now_s - now_s % rt.s)
      redis.call('HINCRBY', rt.k, slice, fmt(amount))
      redis.call('EXPIRE', rt.k, fmt(rt.w + rt.s))
      counted[j] = { k = rt.k, s = slice }
    end
    redis.call('HSET', key, 'rt', cjson.encode(counted))
  end
  redis.call('ZADD', 'pag0:exp', fmt(now + req.ttl), id)
  return ({ ok = true, amount = fmt(amount), v = view })
end

-- Commits or releases reservations (cost 0 releases). Each item is applied once: a
-- retried settlement finds the reservation settled and changes nothing; one for a
-- reservation not yet seen leaves a tombstone, so the reserve arriving late is refused.
local function reserve()
  local now = now_ms()
  sweep(now)
  -- The VM's settlements waiting to be sent ride along: applied first, so the budget
  -- figures this reservation sees (and a refusal's details) include them.
  local settled = req.items and apply_items(req.items) or nil
  local answer = reserve_one(now)
  answer.settled = settled
  return answer
end

local function kill()
  -- What the switch was: the kill alert is raised by the call that turns it on.
  local was = redis.call('HEXISTS', req.session, 'killed') == 1
  local seq = switch(req.session, req.tenant, req.sid, req.on, req.reason, req.x)
  return ({ seq = fmt(seq), was = was })
end

-- An alert raised by a counter each Envoy keeps (a repeat breaker's trip): the first
-- Envoy to claim its key within `x` seconds sends it, so the cluster sends it once.
local function once()
  local first = redis.call('SET', req.k, '1', 'NX', 'EX', fmt(req.x))
  return ({ first = first and true or false })
end

-- Changes after `since`; with `since` below 0 (a VM's first poll), the newest 256.
local function kills()
  local since = req.since or 0
  local seq = tonumber(redis.call('GET', 'pag0:killseq') or '0')
  local changes
  if since < 0 then
    changes = redis.call('ZREVRANGE', 'pag0:kills', 0, 255)
  else
    changes = redis.call('ZRANGEBYSCORE', 'pag0:kills', '(' .. fmt(since), '+inf', 'LIMIT', 0, 256)
  end
  return ({ seq = fmt(seq), k = changes })
end

-- Appends VMs' report counts: [list key, entry] each; answers each list's length.
local function report()
  local lengths = {}
  for i, item in ipairs(req.items) do
    -- Once per entry id: a push retried after a timeout is not counted twice.
    if redis.call('SET', 'pag0:pushed:' .. item.id, '1', 'NX', 'EX', 600) then
      lengths[i] = fmt(redis.call('RPUSH', item.k, item.d))
      redis.call('EXPIRE', item.k, fmt(req.x))
    else
      lengths[i] = fmt(redis.call('LLEN', item.k))
    end
  end
  return ({ n = lengths })
end

-- Replaces a report list's first `n` entries by their merge, unless someone did first
-- (the first entry is no longer the one the merge started from).
local function compact()
  local head = redis.call('LINDEX', req.k, 0)
  if head ~= req.head or redis.call('LLEN', req.k) < req.n then
    return ({ done = false })
  end
  redis.call('LTRIM', req.k, req.n, -1)
  redis.call('LPUSH', req.k, req.d)
  return ({ done = true })
end

local function figures(key)
  if not key then
    return {}
  end
  return redis.call('HGETALL', key)
end

-- One session's figures: its hash, its report entries, the tenant's day and month.
local function read()
  sweep(now_ms())
  return ({
    h = figures(req.session),
    r = redis.call('LRANGE', req.rep, 0, -1),
    d = figures(req.day),
    m = figures(req.month),
  })
end

-- A tenant's newest sessions (at most req.n), each with its hash and report entries.
local function list()
  sweep(now_ms())
  local ids = redis.call('ZREVRANGE', req.index, 0, req.n - 1)
  local out = {}
  for i, id in ipairs(ids) do
    out[i] = { id = id, h = figures(req.sp .. id), r = redis.call('LRANGE', req.rp .. id, 0, -1) }
  end
  return ({
    s = out,
    total = fmt(redis.call('ZCARD', req.index)),
    d = figures(req.day),
    m = figures(req.month),
  })
end

local ops = {
  reserve = reserve, settle = settle, kill = kill, kills = kills,
  report = report, compact = compact, read = read, list = list, once = once,
}
local op = ops[req.op]
if not op then
  return redis.error_reply('pag0: unknown ledger operation')
end
-- The request's tag comes back with its answer: after a pause, Webdis can answer a
-- request on a connection that reused the socket of one Envoy gave up on, and pag0
-- must not take that answer for its own.
local answer = op()
answer.tag = req.tag
return cjson.encode(answer)
