-- The one wrk script of `make bench`. Every case goes through request(), so the load
-- generator does the same work per request whichever case it drives; requests are
-- built in init() wherever they can be, and only the "unique" modes format one per call.
--
--   wrk -t2 -c50 -d10s -s bench/wrk/bench.lua http://127.0.0.1:PORT -- key=value ...
--
-- keys: mode     static (default) | many | unique-session | unique-query
--       method   GET (default)
--       path     /bench (default)
--       session  x-pag0-session (static), or the id prefix (unique-session)
--       agent    x-pag0-agent
--       apikey   x-pag0-api-key
--       sessions, agents   for mode=many: the request table is every session x agent
--                (session ids "<session>-<i>", agents "executor-<j>")
-- done() prints one line "WRKJSON {...}" with the totals and latency percentiles (µs).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local reqs = {}
local n = 0
local i = 0
local counter = 0
local opts = {}
local base_headers = {}

local function headers_with(extra)
  local h = {}
  for k, v in pairs(base_headers) do h[k] = v end
  for k, v in pairs(extra) do h[k] = v end
  return h
end

function init(args)
  for _, a in ipairs(args) do
    local k, v = string.match(a, "^([%w_-]+)=(.*)$")
    if k then opts[k] = v end
  end
  opts.mode = opts.mode or "static"
  opts.method = opts.method or "GET"
  opts.path = opts.path or "/bench"
  if opts.apikey then base_headers["x-pag0-api-key"] = opts.apikey end
  if opts.agent then base_headers["x-pag0-agent"] = opts.agent end
  if opts.mode == "static" then
    local extra = {}
    if opts.session then extra["x-pag0-session"] = opts.session end
    reqs[1] = wrk.format(opts.method, opts.path, headers_with(extra), nil)
  elseif opts.mode == "many" then
    local sessions = tonumber(opts.sessions or "1000")
    local agents = tonumber(opts.agents or "8")
    -- Consecutive requests walk the sessions, then the agents, so neighbours in time
    -- rarely share a session.
    for a = 0, agents - 1 do
      for s = 0, sessions - 1 do
        local extra = {
          ["x-pag0-session"] = (opts.session or "bench") .. "-" .. s,
          ["x-pag0-agent"] = "executor-" .. a,
        }
        reqs[#reqs + 1] = wrk.format(opts.method, opts.path, headers_with(extra), nil)
      end
    end
  end
  n = #reqs
  -- Threads start at different places in the table.
  if n > 0 then i = (tid * math.floor(n / 2)) % n end
end

function request()
  if n > 0 then
    i = i + 1
    if i > n then i = 1 end
    return reqs[i]
  end
  counter = counter + 1
  local id = tid .. "-" .. counter
  if opts.mode == "unique-session" then
    return wrk.format(opts.method, opts.path,
      headers_with({["x-pag0-session"] = (opts.session or "u") .. "-" .. id}), nil)
  end
  -- unique-query: one session, a new cache key per request.
  local extra = {}
  if opts.session then extra["x-pag0-session"] = opts.session end
  return wrk.format(opts.method, opts.path .. "?k=" .. id, headers_with(extra), nil)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
