// What pag0 does per request, outside Envoy: every host call it makes, the bytes that
// cross the wasm boundary, and how long its own code runs. A small proxy-wasm host in
// Node (V8, as in Envoy) loads the module, plays each `make bench` case's callbacks
// (request headers, response headers and body, log, done) and counts.
//
//   node bench/hostcalls.mjs [--wasm=pag0.wasm] [--n=20000] [--noop=noop.wasm] [--case=free,hot]
//   bench/profile.py runs it per case under `node --cpu-prof` and splits the time by origin
//   (pag0's code, the wasm-to-host boundary, this host) and by wasm function.
//
// The host keeps Envoy's semantics where they matter to the counts: shared data with CAS
// (unchecked on absent keys), header maps, route metadata as properties. Its own host calls
// are cheap JavaScript, far cheaper than Envoy's, so "µs per request" here is mostly the
// module's own code; the host-call counts say what Envoy's side costs.
// Prints one JSON object on stdout.

import fs from "node:fs";
import crypto from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.dirname(here);
const args = Object.fromEntries(process.argv.slice(2).map((a) => a.replace(/^--/, "").split("=")));
const wasmPath = args.wasm || path.join(root, "target/wasm32-wasip1/release/pag0.wasm");
const N = Number(args.n || 20000);
const noopPath = args.noop || path.join(here, "noop-filter/target/wasm32-wasip1/release/pag0_bench_noop.wasm");
const only = args.case ? args.case.split(",") : null;
const API_KEY = "bench-key";
const BODY = new Uint8Array(1024).fill(120);

const enc = new TextEncoder();
const utf8 = new TextDecoder();
// Host-side decoding kept cheap: keys and names are short ASCII.
const dec = utf8;
const encoded = new Map();
const encCached = (s) => { let e = encoded.get(s); if (!e) { e = enc.encode(s); encoded.set(s, e); } return e; };
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8;

function serializeMap(pairs) {
  const kv = pairs.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
  let size = 4 + kv.length * 8;
  for (const [k, v] of kv) size += k.length + v.length + 2;
  const out = new Uint8Array(size);
  const d = new DataView(out.buffer);
  d.setUint32(0, kv.length, true);
  let p = 4;
  for (const [k, v] of kv) { d.setUint32(p, k.length, true); d.setUint32(p + 4, v.length, true); p += 8; }
  for (const [k, v] of kv) { out.set(k, p); p += k.length + 1; out.set(v, p); p += v.length + 1; }
  return out;
}

function parseMap(bytes) {
  const d = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = d.getUint32(0, true);
  const sizes = [];
  let p = 4;
  for (let i = 0; i < n; i++) { sizes.push([d.getUint32(p, true), d.getUint32(p + 4, true)]); p += 8; }
  const pairs = [];
  for (const [ks, vs] of sizes) {
    const k = dec.decode(bytes.subarray(p, p + ks)); p += ks + 1;
    const v = dec.decode(bytes.subarray(p, p + vs)); p += vs + 1;
    pairs.push([k, v]);
  }
  return pairs;
}

// One VM: a module instance with its own shared data (one vm_id in Envoy).
async function makeVm(wasmFile, pluginConfig) {
  const module = await WebAssembly.compile(fs.readFileSync(wasmFile));
  const vm = {
    counting: false, calls: new Map(), bytesIn: 0, bytesOut: 0,
    shared: new Map(), casCounter: 1, metrics: new Map(),
    stream: null, route: {}, logs: [],
  };
  let memory, ex;
  const u8 = () => new Uint8Array(memory.buffer);
  const dv = () => new DataView(memory.buffer);
  const count = (name) => { if (vm.counting) vm.calls.set(name, (vm.calls.get(name) || 0) + 1); };
  const read = (ptr, len) => { if (vm.counting) vm.bytesOut += len; return new Uint8Array(memory.buffer, ptr, len); };
  const give = (data, retPtr, retSize) => {
    const p = ex.proxy_on_memory_allocate(Math.max(data.length, 1));
    u8().set(data, p);
    dv().setUint32(retPtr, p, true);
    dv().setUint32(retSize, data.length, true);
    if (vm.counting) vm.bytesIn += data.length;
    return OK;
  };
  const map = (type) => {
    const s = vm.stream;
    if (!s) return null;
    return { 0: s.req, 2: s.resp, 6: s.callResp }[type] || null;
  };
  const env = {
    proxy_log(level, ptr, len) {
      count("proxy_log");
      const msg = dec.decode(read(ptr, len));
      if (level >= 3) vm.logs.push(msg);
      return OK;
    },
    proxy_get_log_level(ret) { dv().setUint32(ret, 2, true); return OK; },
    proxy_get_current_time_nanoseconds(ret) {
      count("proxy_get_current_time_nanoseconds");
      dv().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true);
      return OK;
    },
    proxy_set_tick_period_milliseconds() { count("proxy_set_tick_period_milliseconds"); return OK; },
    proxy_get_buffer_bytes(type, start, max, retPtr, retSize) {
      count("proxy_get_buffer_bytes");
      let data = null;
      if (type === 7) data = encCached(pluginConfig);
      else if (type === 6) data = new Uint8Array(0);
      else if (type === 1 && vm.stream) data = BODY;
      if (!data) return NOT_FOUND;
      start >>>= 0; max >>>= 0;
      return give(data.subarray(start, Math.min(data.length, start + max)), retPtr, retSize);
    },
    proxy_get_header_map_pairs(type, retPtr, retSize) {
      count("proxy_get_header_map_pairs");
      const m = map(type);
      return m ? give(serializeMap(m), retPtr, retSize) : NOT_FOUND;
    },
    proxy_set_header_map_pairs(type, ptr, len) {
      count("proxy_set_header_map_pairs");
      const m = map(type);
      if (m) { m.length = 0; m.push(...parseMap(read(ptr, len))); }
      return OK;
    },
    proxy_get_header_map_value(type, kp, kl, retPtr, retSize) {
      count("proxy_get_header_map_value");
      const m = map(type);
      const key = dec.decode(read(kp, kl));
      const hit = m && m.find(([k]) => k === key);
      return hit ? give(encCached(hit[1]), retPtr, retSize) : NOT_FOUND;
    },
    proxy_replace_header_map_value(type, kp, kl, vp, vl) {
      count("proxy_replace_header_map_value");
      const m = map(type);
      const key = dec.decode(read(kp, kl)), value = dec.decode(read(vp, vl));
      if (m) {
        const i = m.findIndex(([k]) => k === key);
        if (i >= 0) m[i] = [key, value]; else m.push([key, value]);
      }
      return OK;
    },
    proxy_add_header_map_value(type, kp, kl, vp, vl) {
      count("proxy_add_header_map_value");
      const m = map(type);
      if (m) m.push([dec.decode(read(kp, kl)), dec.decode(read(vp, vl))]);
      return OK;
    },
    proxy_remove_header_map_value(type, kp, kl) {
      count("proxy_remove_header_map_value");
      const m = map(type);
      const key = dec.decode(read(kp, kl));
      if (m) for (let i = m.length - 1; i >= 0; i--) if (m[i][0] === key) m.splice(i, 1);
      return OK;
    },
    proxy_get_property(pp, pl, retPtr, retSize) {
      count("proxy_get_property");
      const parts = dec.decode(read(pp, pl)).split("\0").filter((x) => x.length);
      const key = parts.join(".");
      let value;
      const prefix = "xds.route_metadata.filter_metadata.pag0";
      // The whole map comes back as Envoy sends it: proxy-wasm pairs encoding.
      if (key === prefix) return give(serializeMap(Object.entries(vm.route)), retPtr, retSize);
      if (key.startsWith(prefix + ".")) value = vm.route[key.slice(prefix.length + 1)];
      else if (key === "response.code_details") value = "via_upstream";
      else if (key === "xds.cluster_name") value = "upstream";
      else if (key === "xds.route_name") value = "bench";
      if (value === undefined) return NOT_FOUND;
      return give(encCached(value), retPtr, retSize);
    },
    proxy_set_property(pp, pl, vp, vl) { count("proxy_set_property"); read(pp, pl); read(vp, vl); return OK; },
    proxy_get_shared_data(kp, kl, retPtr, retSize, retCas) {
      count("proxy_get_shared_data");
      const key = dec.decode(read(kp, kl));
      const e = vm.shared.get(key);
      if (!e) return NOT_FOUND;
      if (vm.counting) vm.sharedBytesIn = (vm.sharedBytesIn || 0) + e.value.length;
      give(e.value, retPtr, retSize);
      dv().setUint32(retCas, e.cas, true);
      return OK;
    },
    proxy_set_shared_data(kp, kl, vp, vl, cas) {
      count("proxy_set_shared_data");
      const key = dec.decode(read(kp, kl));
      const value = read(vp, vl).slice();
      const e = vm.shared.get(key);
      if (e && cas !== 0 && cas !== e.cas) { count("(shared data CAS mismatch)"); return CAS_MISMATCH; }
      vm.shared.set(key, { value, cas: ++vm.casCounter });
      return OK;
    },
    proxy_send_local_response(status, dp, dl, bp, bl, hp, hl) {
      count("proxy_send_local_response");
      read(dp, dl); read(bp, bl);
      if (vm.stream) {
        vm.stream.local = status;
        vm.stream.resp = [[":status", String(status)], ...parseMap(read(hp, hl))];
      }
      return OK;
    },
    proxy_define_metric(type, np, nl, retId) {
      count("proxy_define_metric");
      const name = dec.decode(read(np, nl));
      if (!vm.metrics.has(name)) vm.metrics.set(name, vm.metrics.size + 1);
      dv().setUint32(retId, vm.metrics.get(name), true);
      return OK;
    },
    proxy_increment_metric() { count("proxy_increment_metric"); return OK; },
    proxy_record_metric() { count("proxy_record_metric"); return OK; },
    proxy_get_metric(id, ret) { count("proxy_get_metric"); dv().setBigUint64(ret, 0n, true); return OK; },
    proxy_continue_stream() { count("proxy_continue_stream"); return OK; },
    proxy_set_effective_context() { count("proxy_set_effective_context"); return OK; },
    proxy_http_call() { count("proxy_http_call"); return 2; },
  };
  const wasi = {
    fd_write(fd, iovs, iovsLen, nwritten) {
      let n = 0;
      for (let i = 0; i < iovsLen; i++) {
        const p = dv().getUint32(iovs + i * 8, true), l = dv().getUint32(iovs + i * 8 + 4, true);
        process.stderr.write(u8().slice(p, p + l)); n += l;
      }
      dv().setUint32(nwritten, n, true);
      return 0;
    },
    random_get(ptr, len) { crypto.randomFillSync(u8().subarray(ptr, ptr + len)); return 0; },
    clock_time_get(id, precision, ret) { dv().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true); return 0; },
    environ_sizes_get(a, b) { dv().setUint32(a, 0, true); dv().setUint32(b, 0, true); return 0; },
    args_sizes_get(a, b) { dv().setUint32(a, 0, true); dv().setUint32(b, 0, true); return 0; },
    environ_get() { return 0; },
    args_get() { return 0; },
    proc_exit(code) { throw new Error(`proc_exit(${code})`); },
  };
  // Time spent inside host calls (including the allocations they ask the module for), so
  // that the module's own time is the rest.
  vm.hostNs = 0n;
  for (const k of Object.keys(env)) {
    const f = env[k];
    env[k] = (...a) => {
      const t0 = process.hrtime.bigint();
      try { return f(...a); } finally { vm.hostNs += process.hrtime.bigint() - t0; }
    };
  }
  const imports = {};
  for (const imp of WebAssembly.Module.imports(module)) {
    const table = imp.module === "env" ? env : wasi;
    imports[imp.module] ||= {};
    imports[imp.module][imp.name] = table[imp.name] || ((...a) => { count(`(unimplemented) ${imp.name}`); return 0; });
  }
  const instance = await WebAssembly.instantiate(module, imports);
  ex = instance.exports;
  memory = ex.memory;
  if (ex._initialize) ex._initialize();
  ex.proxy_on_context_create(1, 0);
  if (!ex.proxy_on_vm_start(1, 0)) throw new Error("on_vm_start failed");
  if (!ex.proxy_on_configure(1, enc.encode(pluginConfig).length)) {
    throw new Error(`on_configure failed: ${vm.logs.join("\n")}`);
  }
  let next = 2;
  // One request through the filter, as Envoy calls it for a GET answered with 1 KiB.
  vm.request = (reqHeaders, route) => {
    vm.route = route;
    const ctx = next++;
    vm.stream = { req: reqHeaders.slice(), resp: null, callResp: [], local: 0 };
    ex.proxy_on_context_create(ctx, 1);
    const action = ex.proxy_on_request_headers(ctx, reqHeaders.length, 1);
    if (!vm.stream.local) {
      if (action !== 0) throw new Error(`request paused (action ${action}): ${vm.logs.slice(-3).join(" | ")}`);
      vm.stream.resp = [[":status", "200"], ["content-length", "1024"], ["content-type", "text/plain"]];
      ex.proxy_on_response_headers(ctx, vm.stream.resp.length, 0);
      ex.proxy_on_response_body(ctx, BODY.length, 1);
    } else {
      ex.proxy_on_response_headers(ctx, vm.stream.resp.length, 0);
    }
    const out = vm.stream;
    ex.proxy_on_log(ctx);
    ex.proxy_on_done(ctx);
    ex.proxy_on_delete(ctx);
    vm.stream = null;
    return out;
  };
  return vm;
}

function headers(p, session, agent) {
  return [[":method", "GET"], [":path", p], [":authority", "127.0.0.1:10000"], [":scheme", "http"],
    ["user-agent", "wrk"], ["x-pag0-api-key", API_KEY], ["x-pag0-session", session],
    ["x-pag0-agent", agent], ["x-request-id", "3c0b7f1e-6a2d-4c1b-9a0e-2f1d3b4c5d6e"]];
}

const readJson = (f) => JSON.stringify(JSON.parse(fs.readFileSync(path.join(here, "envoy", f), "utf8")));
const FREE = { tool: "bench", endpoint: "bench/free" };
const PRICED = { price: "20000", tool: "bench", endpoint: "bench/priced" };
const CACHED = { price: "20000", tool: "bench", endpoint: "bench/cached" };

// (case, plugin config, request headers for the i-th call, route metadata, what the answer must say)
const cases = [
  ["free", "pag0.json", (i) => headers("/free", "bench-free", "executor-1"), FREE, { cost: "0" }],
  ["free_new", "pag0.json", (i) => headers("/free", "bench-never-paid", "executor-1"), FREE, { cost: "0" }],
  ["priced", "pag0.json", (i) => headers("/priced", `bench-many-${i % 1000}`, `executor-${Math.floor(i / 1000) % 8}`), PRICED, { cost: "20000" }],
  ["hot", "pag0.json", (i) => headers("/priced", "bench-hot", "executor-1"), PRICED, { cost: "20000" }],
  ["cache_hit", "pag0-cache.json", (i) => headers("/hit", "bench-cache", "executor-1"), CACHED, { cost: "0", cached: "true" }],
];

async function measure(name, wasmFile, config, make, route, warm, expect = {}) {
  const vm = await makeVm(wasmFile, config);
  for (const pre of warm) vm.request(pre[0], pre[1]);
  for (let i = 0; i < 8000; i++) vm.request(make(i), route);  // every session x agent of case 4 once; V8 tiers up
  // Counted pass.
  vm.counting = true;
  const M = Math.min(N, 2000);
  let statuses = new Map();
  for (let i = 0; i < M; i++) {
    const s = vm.request(make(i), route);
    const status = s.local || 200;
    statuses.set(status, (statuses.get(status) || 0) + 1);
    if (i === 0) vm.lastResponseHeaders = s.resp;
    // The case must be what it claims (a priced call charged, a hit served), or the counts
    // would describe another path.
    const got = Object.fromEntries(s.resp || []);
    for (const [k, v] of Object.entries(expect)) {
      if (got[`x-pag0-${k}`] !== v) {
        throw new Error(`${name}: x-pag0-${k} is ${got[`x-pag0-${k}`]}, expected ${v}: ${JSON.stringify(s.resp)} ${vm.logs.slice(-3).join(" | ")}`);
      }
    }
  }
  vm.counting = false;
  // Timed pass.
  vm.hostNs = 0n;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) vm.request(make(i), route);
  const us = Number(process.hrtime.bigint() - t0) / 1000 / N;
  const hostUs = Number(vm.hostNs) / 1000 / N;
  const calls = Object.fromEntries([...vm.calls.entries()].sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, +(v / M).toFixed(2)]));
  const total = [...vm.calls.entries()].filter(([k]) => !k.startsWith("(")).reduce((a, [, v]) => a + v, 0) / M;
  return {
    case: name, us_per_request: +us.toFixed(2), host_us_per_request: +hostUs.toFixed(2),
    module_us_per_request: +(us - hostUs).toFixed(2), host_calls_per_request: +total.toFixed(2), host_calls: calls,
    bytes_into_wasm_per_request: Math.round(vm.bytesIn / M), bytes_out_of_wasm_per_request: Math.round(vm.bytesOut / M),
    shared_data_bytes_read_per_request: Math.round((vm.sharedBytesIn || 0) / M),
    statuses: Object.fromEntries(statuses), response_headers: vm.lastResponseHeaders,
  };
}

const results = [];
// The floor: the do-nothing filter in the same harness.
if (fs.existsSync(noopPath) && (!only || only.includes("noop"))) {
  results.push(await measure("noop", noopPath, "", () => headers("/bench", "bench-static", "executor-1"), {}, []));
}
for (const [name, cfg, make, route, expect] of cases) {
  if (only && !only.includes(name)) continue;
  const warm = [];
  if (name === "free") warm.push([headers("/priced", "bench-free", "executor-1"), PRICED]);
  results.push(await measure(name, wasmPath, readJson(cfg), make, route, warm, expect));
}
process.stdout.write(JSON.stringify({ wasm: wasmPath, requests_per_case: N, results }, null, 1) + "\n");
