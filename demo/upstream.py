#!/usr/bin/env python3
"""Local stand-ins for the paid APIs of the demo (OpenAI, Anthropic, Tavily, Exa, DeepL).

One server answers for every host, chosen by the Host header, with a body shaped like
the real API's. It counts the calls it serves per host and path and shows them at
GET /_demo/calls (on its own port, not through Envoy). It is also the demo's alert
webhook: pag0 POSTs alerts to /_demo/alerts, and GET /_demo/alerts lists them.
Usage: upstream.py [--port 18080]

LLM calls, in the real wire formats (Python stdlib only, so pag0 can meter them and the
official SDKs can be pointed at this server; send `Host: api.anthropic.com` or
`Host: api.openai.com`, or go through Envoy):

  api.anthropic.com  POST /v1/messages[?...]          Messages API: `message` JSON, or SSE
                                                       with "stream": true
                     POST /v1/messages/count_tokens   {"input_tokens": P}
  api.openai.com     POST /v1/chat/completions        chat.completion JSON, or SSE chunks
                                                       with "stream": true
                     POST /v1/responses               Responses API: `response` JSON, or
                                                       SSE events with "stream": true
  Any other path on those hosts keeps the old small JSON answer (GET /v1/models, ...).

Missing fields are tolerated, as the demo sends small bodies: no `model` -> claude-sonnet-4-5
(Anthropic) / gpt-4o-mini (OpenAI); no `max_tokens` -> no output limit; no `messages` ->
the whole body is the prompt. A body that is not JSON is a 400 in the API's error shape;
an empty body is {}.

Token formulas (deterministic, so a test can compute the expected cost on its own)
------------------------------------------------------------------------------------
  canon(x)  = json.dumps(x, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
              (compact, keys sorted, non-ASCII as raw UTF-8; Rust serde_json::to_string of
              a serde_json::Value without "preserve_order" gives the same bytes, floats
              aside: write prompts of strings, integers, booleans)
  tok(x)    = max(1, ceil(len(utf8(canon(x))) / 4))
  The prompt is a list of blocks, in this order:
    Anthropic /v1/messages: each element of `tools`; then `system` (a string is one block,
      a list gives one block per element); then for each message of `messages`: one block
      per element of its `content` when that is a list, else the whole message object
      ({"role":..,"content":".."}) is one block.
    OpenAI /v1/chat/completions: each element of `tools`; then each element of `messages`
      (the whole message object).
    OpenAI /v1/responses: each element of `tools`; then `instructions` if present (one
      block); then `input` (a string is one block, a list gives one block per item).
    If that gives no block at all, the whole request body is the one block.
  P (prompt tokens) = sum of tok(block) over the blocks.
  natural   = x-demo-output-tokens if sent, else 20 + P % 50
  limit     = Anthropic `max_tokens`; Chat `max_completion_tokens`, else `max_tokens`;
              Responses `max_output_tokens`; absent -> no limit
  O (output tokens) = min(natural, limit). When natural > limit the answer says so:
    Anthropic stop_reason "max_tokens" (else "end_turn"); Chat finish_reason "length"
    (else "stop"); Responses status "incomplete", incomplete_details.reason
    "max_output_tokens" (else "completed").
  OpenAI reasoning models (model id starting o1, o3, o4 or gpt-5): reasoning_tokens =
    O // 2 (part of O, as in the real API: never billed on top), else 0.

Anthropic prompt caching (state in memory, per process; POST /_demo/llm/reset clears it)
  A block carrying "cache_control": {"type": "ephemeral"} is a 5m breakpoint, with
  "ttl": "1h" a 1h breakpoint (tools, system blocks and content blocks can carry one).
  prefix(k) = the tokens of blocks 0..k; the cache key of breakpoint k is a hash of the
  model and canon() of blocks 0..k.
    R = prefix(k) of the last breakpoint k whose key was seen before (0 if none)
    every later breakpoint k writes the tokens between the previous breakpoint (or R) and
      prefix(k), counted as ephemeral_1h or ephemeral_5m by that breakpoint's ttl
    cache_read_input_tokens     = R
    cache_creation_input_tokens = W = W5m + W1h  (cache_creation.ephemeral_5m/1h_input_tokens)
    input_tokens                = P - R - W  (the tokens after the last breakpoint)
  Then every breakpoint's key counts as seen. No minimum cacheable length, no expiry.
  So: first request with one breakpoint after blocks worth C tokens -> creation C, input
  P - C; the same prefix again -> read C, creation 0, input P - C.

OpenAI automatic caching (Chat and Responses; state in memory, per process)
  prefix(k) as above, keyed by endpoint, model and canon() of blocks 0..k. After each
  request every prefix(k) >= 1024 tokens is remembered. cached_tokens = the largest
  remembered prefix(k) of this request, rounded down to a multiple of 128, if it is at
  least 1024; else 0. prompt_tokens stays P (cached tokens are a part of it).
  Responses: input_tokens_details.cache_write_tokens is always 0.

Usage fields answered
  Anthropic JSON and message_start: input_tokens, cache_creation_input_tokens,
    cache_read_input_tokens, cache_creation {ephemeral_5m_input_tokens,
    ephemeral_1h_input_tokens}, output_tokens (message_start: 1, or 0 when O is 0),
    service_tier. message_delta: {"output_tokens": O} (cumulative).
  Chat: prompt_tokens P, completion_tokens O, total_tokens P+O, prompt_tokens_details
    {cached_tokens, audio_tokens 0}, completion_tokens_details {reasoning_tokens, ...}.
    Streamed, usage comes only with "stream_options": {"include_usage": true}: one last
    chunk with "choices": [] and usage (every earlier chunk has "usage": null), then
    `data: [DONE]`.
  Responses: input_tokens P, input_tokens_details {cached_tokens, cache_write_tokens 0},
    output_tokens O, output_tokens_details {reasoning_tokens}, total_tokens; streamed in
    response.completed (or response.incomplete).

Test controls: request headers (they only exist here; no real API knows them)
  x-demo-delay-ms: N         sleep N ms before answering.
  x-demo-status: N           answer status N (>= 400) with the API's error JSON:
                             Anthropic {"type":"error","error":{"type","message"},
                             "request_id"}, OpenAI {"error":{"message","type","param",
                             "code"}}. The official SDKs retry 408/409/429/5xx unless
                             max_retries=0.
  x-demo-output-tokens: N    force `natural` to N (still capped by the limit).
  x-demo-chunk-bytes: N      write the body (SSE or JSON) in N-byte pieces, each flushed
                             on its own (TCP_NODELAY) with ~1 ms between, so events split
                             at odd byte offsets across TCP writes (and chunks).
  x-demo-event-delay-ms: N   sleep N ms between SSE events.
  x-demo-cut-after-bytes: N  send only the first N bytes of the body, then close the
                             connection (FIN, no final chunk: a truncated message; a
                             stream loses its message_delta / message_stop / [DONE]).
                             A body of N bytes or less is sent whole.
  x-demo-error-event: 1      streams: right after message_start (Anthropic) or the first
                             chunk / response.created (OpenAI) send an error event and
                             end the stream: Anthropic `event: error` with
                             {"type":"error","error":{"type":"overloaded_error",...}};
                             Chat `data: {"error":{...,"type":"server_error"}}` (no
                             [DONE]); Responses `event: error` {"type":"error",...}.
  x-demo-deltas: N           Anthropic streams: N message_delta events (cumulative usage),
                             as with server tools. Delta j < N: stop_reason null,
                             output_tokens max(min(1,O), O*j//N); delta 1 also carries
                             input_tokens P_in+100 and the cache counts. Delta N (the last)
                             carries the final counts: output_tokens O, input_tokens
                             P_in + 100*(N-1), cache_creation/read_input_tokens,
                             server_tool_use {"web_search_requests": N-1,
                             "web_fetch_requests": 0}. (P_in = input_tokens of
                             message_start.) The message JSON answer is not affected.
  x-demo-delta-usage: full   Anthropic streams: the last message_delta also repeats
                             input_tokens and the cache counts, as the current API does.

Anthropic validation, as the real API: `max_tokens` present but not a non-negative
integer, or thinking {"type":"enabled","budget_tokens": B} with B >= max_tokens -> 400
invalid_request_error.

Inspection (on this server's own port, not through Envoy)
  GET  /_demo/llm/last   {endpoint: record} for the last LLM request per endpoint
                         ("api.anthropic.com/v1/messages", ...): "request" (the body
                         exactly as parsed from what arrived, so a test can see what pag0
                         changed, e.g. a lowered max_tokens), "path" (with query),
                         "headers" (x-api-key / authorization replaced by
                         "sha256:<hex>"), "stream", "status", "outcome" ("complete",
                         "cut", "error-event", "status", "invalid"), "usage" (the final
                         usage answered, in the API's own shape, as a client adds up a
                         stream; null when the answer carried none; for a cut answer,
                         what the whole answer carries), "computed" (the usage
                         the formulas gave, even when it was not sent: a stream without
                         include_usage, an error event, a cut), "promptTokens" P,
                         "count" (requests seen on that endpoint), "body" (the raw
                         request body as text, so a test can check what pag0 left
                         byte for byte) and "bodyBytes" (its length in bytes).
  GET  /_demo/llm/log    every LLM record since the start or the last reset, oldest
                         first (the same records; at most the last 10000), for tests
                         that make many calls at once and must see each request.
  POST /_demo/llm/reset  forget the LLM records (last and log) and both prompt caches.
"""
import argparse
import hashlib
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CALLS = {}
ALERTS = []
LOCK = threading.Lock()
LLM_LAST = {}           # endpoint -> record of the last LLM request
LLM_COUNT = {}          # endpoint -> requests seen
LLM_LOG = []            # every LLM record, oldest first (bounded by LLM_LOG_MAX)
LLM_LOG_MAX = 10000
ANTHROPIC_CACHE = set()  # keys of cache breakpoints already written
OPENAI_SEEN = set()     # keys of prompt prefixes (>= 1024 tokens) already seen

REASONS = {529: "Overloaded"}  # statuses http.server has no phrase for
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
WORDS = ("pag0", "meters", "this", "demo", "answer", "token", "by", "token", "for",
         "the", "spend", "firewall")
WORDS_PER_DELTA = 4
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                    402: "billing_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    504: "timeout_error", 529: "overloaded_error"}
OPENAI_ERRORS = {400: ("invalid_request_error", None),
                 401: ("invalid_request_error", "invalid_api_key"),
                 403: ("invalid_request_error", "unsupported_country_region_territory"),
                 404: ("invalid_request_error", "model_not_found"),
                 429: ("requests", "rate_limit_exceeded"),
                 500: ("server_error", None), 503: ("server_error", None)}


# --- the old small answers (every host, every path that is not an LLM call) -------------


def answer(host, path, body):
    if host.startswith("api.openai.com"):
        return {"id": "chatcmpl-demo", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "demo answer"}}]}
    if host.startswith("api.anthropic.com"):
        return {"id": "msg_demo", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": "demo answer"}]}
    if host.startswith("api.tavily.com") or host.startswith("api.exa.ai"):
        return {"query": body.get("query", "") if isinstance(body, dict) else "",
                "results": [{"title": "pag0 docs", "url": "https://example.com/docs"}]}
    if host.startswith("api.deepl.com"):
        return {"translations": [{"detected_source_language": "EN", "text": "Demo-Antwort"}]}
    return {"host": host, "path": path}


# --- token arithmetic ----------------------------------------------------------------------


def canon(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def utf8(text):
    return text.encode("utf-8", "surrogatepass")


def tok(value):
    return max(1, (len(utf8(canon(value))) + 3) // 4)


def as_count(value):
    """A JSON integer >= 0 (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def header_int(headers, name):
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def anthropic_blocks(body):
    blocks = []
    if isinstance(body.get("tools"), list):
        blocks.extend(body["tools"])
    system = body.get("system")
    if isinstance(system, list):
        blocks.extend(system)
    elif system is not None:
        blocks.append(system)
    if isinstance(body.get("messages"), list):
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                blocks.extend(content)
            else:
                blocks.append(message)
    return blocks or [body]


def chat_blocks(body):
    blocks = []
    if isinstance(body.get("tools"), list):
        blocks.extend(body["tools"])
    if isinstance(body.get("messages"), list):
        blocks.extend(body["messages"])
    return blocks or [body]


def responses_blocks(body):
    blocks = []
    if isinstance(body.get("tools"), list):
        blocks.extend(body["tools"])
    if body.get("instructions") is not None:
        blocks.append(body["instructions"])
    inp = body.get("input")
    if isinstance(inp, list):
        blocks.extend(inp)
    elif inp is not None:
        blocks.append(inp)
    return blocks or [body]


def prefixes(root, blocks):
    """Per block: (tokens of blocks 0..k, hash key of blocks 0..k)."""
    digest = hashlib.sha256(utf8(root))
    total, out = 0, []
    for block in blocks:
        total += tok(block)
        digest.update(b"\n" + utf8(canon(block)))
        out.append((total, digest.hexdigest()))
    return out


def output_count(natural, limit):
    """(output tokens, clamped?)"""
    if limit is not None and natural > limit:
        return limit, True
    return natural, False


def words(n, start=0):
    return [WORDS[(start + i) % len(WORDS)] for i in range(n)]


def text_pieces(n):
    """The answer text of n tokens, as the deltas of a stream."""
    ws = words(n)
    pieces = []
    for i in range(0, len(ws), WORDS_PER_DELTA):
        piece = " ".join(ws[i:i + WORDS_PER_DELTA])
        pieces.append(piece if i == 0 else " " + piece)
    return pieces


def is_reasoning_model(model):
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


def new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


def sse(event, data):
    payload = json.dumps(data, separators=(",", ":"))
    if event is None:
        return f"data: {payload}\n\n".encode()
    return f"event: {event}\ndata: {payload}\n\n".encode()


# --- the Anthropic Messages API ---------------------------------------------------------------


def anthropic_usage(body, headers):
    model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_ANTHROPIC_MODEL
    blocks = anthropic_blocks(body)
    pre = prefixes(model, blocks)
    total = pre[-1][0]
    breakpoints = []
    for k, block in enumerate(blocks):
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            breakpoints.append((k, "1h" if control.get("ttl") == "1h" else "5m"))
    with LOCK:
        read_k = -1
        for k, _ in breakpoints:
            if pre[k][1] in ANTHROPIC_CACHE:
                read_k = k
        for k, _ in breakpoints:
            ANTHROPIC_CACHE.add(pre[k][1])
    read = pre[read_k][0] if read_k >= 0 else 0
    written = {"5m": 0, "1h": 0}
    edge = read
    for k, ttl in breakpoints:
        if k > read_k:
            written[ttl] += pre[k][0] - edge
            edge = pre[k][0]
    natural = header_int(headers, "x-demo-output-tokens")
    if natural is None:
        natural = 20 + total % 50
    out, clamped = output_count(natural, as_count(body.get("max_tokens")))
    usage = {"input_tokens": total - edge,
             "cache_creation_input_tokens": written["5m"] + written["1h"],
             "cache_read_input_tokens": read,
             "cache_creation": {"ephemeral_5m_input_tokens": written["5m"],
                                "ephemeral_1h_input_tokens": written["1h"]},
             "output_tokens": out,
             "service_tier": "standard"}
    return model, total, usage, "max_tokens" if clamped else "end_turn"


def anthropic_invalid(body):
    """The message of the 400 the real API gives for this body, or None."""
    if "max_tokens" in body and as_count(body["max_tokens"]) is None:
        return "max_tokens: Input should be a valid non-negative integer"
    thinking = body.get("thinking")
    max_tokens = as_count(body.get("max_tokens"))
    if isinstance(thinking, dict) and thinking.get("type") == "enabled" and max_tokens is not None:
        budget = as_count(thinking.get("budget_tokens"))
        if budget is not None and budget >= max_tokens:
            return ("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult "
                    "our documentation at https://docs.claude.com/en/docs/build-with-claude/"
                    "extended-thinking#max-tokens-and-context-window-size")
    return None


def anthropic_error(status, message=None):
    kind = ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error",
            "error": {"type": kind, "message": message or f"demo upstream: forced {status} ({kind})"},
            "request_id": new_id("req_")}


def anthropic_message(msg_id, model, usage, stop_reason):
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": " ".join(words(usage["output_tokens"]))}],
            "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}


def anthropic_events(msg_id, model, usage, stop_reason, headers):
    """(SSE events, final usage as a client adds it up, outcome)."""
    out = usage["output_tokens"]
    start_usage = dict(usage, output_tokens=min(1, out))
    start = {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    events = [sse("message_start", {"type": "message_start", "message": start})]
    if headers.get("x-demo-error-event", "").strip() not in ("", "0"):
        events.append(sse("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}))
        return events, start_usage, "error-event"
    events.append(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}}))
    events.append(sse("ping", {"type": "ping"}))
    for piece in text_pieces(out):
        events.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": piece}}))
    events.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    cache = {"cache_creation_input_tokens": usage["cache_creation_input_tokens"],
             "cache_read_input_tokens": usage["cache_read_input_tokens"]}
    final = dict(usage)
    n = header_int(headers, "x-demo-deltas") or 1
    for j in range(1, n):
        delta_usage = {"output_tokens": max(min(1, out), out * j // n)}
        if j == 1:
            delta_usage.update(input_tokens=usage["input_tokens"] + 100, **cache)
        events.append(sse("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": None, "stop_sequence": None},
                                            "usage": delta_usage}))
    last = {"output_tokens": out}
    if n > 1:
        final["input_tokens"] = usage["input_tokens"] + 100 * (n - 1)
        final["server_tool_use"] = {"web_search_requests": n - 1, "web_fetch_requests": 0}
        last.update(input_tokens=final["input_tokens"], **cache,
                    server_tool_use=final["server_tool_use"])
    elif headers.get("x-demo-delta-usage", "").strip().lower() == "full":
        last.update(input_tokens=usage["input_tokens"], **cache)
    events.append(sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                        "usage": last}))
    events.append(sse("message_stop", {"type": "message_stop"}))
    return events, final, "complete"


# --- the OpenAI APIs --------------------------------------------------------------------------


def openai_cached(endpoint, model, blocks):
    pre = prefixes(f"{endpoint}\n{model}", blocks)
    with LOCK:
        seen = [n for n, key in pre if key in OPENAI_SEEN]
        OPENAI_SEEN.update(key for n, key in pre if n >= 1024)
    best = max(seen, default=0)
    return pre[-1][0], (best // 128 * 128 if best >= 1024 else 0)


def openai_counts(endpoint, body, headers, blocks, limit):
    model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_OPENAI_MODEL
    total, cached = openai_cached(endpoint, model, blocks)
    natural = header_int(headers, "x-demo-output-tokens")
    if natural is None:
        natural = 20 + total % 50
    out, clamped = output_count(natural, limit)
    reasoning = out // 2 if is_reasoning_model(model) else 0
    return model, total, cached, out, reasoning, clamped


def openai_error(status, message=None):
    kind, code = OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message or f"demo upstream: forced {status} ({kind})",
                      "type": kind, "param": None, "code": code}}


def chat_usage(total, cached, out, reasoning):
    return {"prompt_tokens": total, "completion_tokens": out, "total_tokens": total + out,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def chat_answer(body, headers):
    limit = as_count(body.get("max_completion_tokens"))
    if limit is None:
        limit = as_count(body.get("max_tokens"))
    model, total, cached, out, reasoning, clamped = openai_counts(
        "chat", body, headers, chat_blocks(body), limit)
    usage = chat_usage(total, cached, out, reasoning)
    finish = "length" if clamped else "stop"
    visible = out - reasoning
    base = {"id": new_id("chatcmpl-"), "created": int(time.time()), "model": model,
            "service_tier": "default", "system_fingerprint": "fp_pag0demo"}
    if not body.get("stream"):
        doc = dict(base, object="chat.completion", usage=usage, choices=[{
            "index": 0, "logprobs": None, "finish_reason": finish,
            "message": {"role": "assistant", "content": " ".join(words(visible)),
                        "refusal": None, "annotations": []}}])
        return total, usage, usage, doc, None, "complete"
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunk = dict(base, object="chat.completion.chunk")

    def event(choices, **extra):
        data = dict(chunk, choices=choices, **extra)
        if with_usage and "usage" not in data:
            data["usage"] = None
        return sse(None, data)

    events = [event([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                      "logprobs": None, "finish_reason": None}])]
    if headers.get("x-demo-error-event", "").strip() not in ("", "0"):
        events.append(sse(None, {"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": None, "code": None}}))
        return total, usage, None, None, events, "error-event"
    for piece in text_pieces(visible):
        events.append(event([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                              "finish_reason": None}]))
    events.append(event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
    if with_usage:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return total, usage, usage if with_usage else None, None, events, "complete"


def responses_answer(body, headers):
    limit = as_count(body.get("max_output_tokens"))
    model, total, cached, out, reasoning, clamped = openai_counts(
        "responses", body, headers, responses_blocks(body), limit)
    usage = {"input_tokens": total,
             "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
             "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
             "total_tokens": total + out}
    status = "incomplete" if clamped else "completed"
    text = " ".join(words(out - reasoning))
    msg_id = new_id("msg_")
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": [part]}
    now = int(time.time())
    response = {"id": new_id("resp_"), "object": "response", "created_at": now, "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if clamped else None,
                "instructions": body.get("instructions"), "max_output_tokens": limit,
                "model": model, "output": [item], "parallel_tool_calls": True,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
                "service_tier": "default", "store": True, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": body.get("tools") if isinstance(body.get("tools"), list) else [],
                "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
                "metadata": {}}
    if not body.get("stream"):
        return total, usage, usage, response, None, "complete"
    seq = iter(range(1 << 30))
    opening = dict(response, status="in_progress", output=[], usage=None, incomplete_details=None)

    def event(kind, **fields):
        return sse(kind, dict(type=kind, sequence_number=next(seq), **fields))

    events = [event("response.created", response=opening)]
    if headers.get("x-demo-error-event", "").strip() not in ("", "0"):
        events.append(event("error", code="server_error", param=None,
                            message="The server had an error while processing your request."))
        return total, usage, None, None, events, "error-event"
    events.append(event("response.in_progress", response=opening))
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    events.append(event("response.output_item.added", output_index=0,
                        item=dict(item, status="in_progress", content=[])))
    events.append(event("response.content_part.added", part=dict(part, text=""), **where))
    for piece in text_pieces(out - reasoning):
        events.append(event("response.output_text.delta", delta=piece, logprobs=[], **where))
    events.append(event("response.output_text.done", text=text, logprobs=[], **where))
    events.append(event("response.content_part.done", part=part, **where))
    events.append(event("response.output_item.done", output_index=0, item=item))
    events.append(event("response.incomplete" if clamped else "response.completed",
                        response=dict(response, completed_at=now)))
    return total, usage, usage, None, events, "complete"


# --- the server ---------------------------------------------------------------------------------


def recorded_headers(headers):
    out = {}
    for name, value in headers.items():
        name = name.lower()
        if name in ("x-api-key", "authorization"):
            value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
        out[name] = value
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each flushed piece of x-demo-chunk-bytes leaves on its own

    def log_message(self, *args):
        pass

    def _read_body(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self):
        raw = self._read_body()
        route = self.path.split("?")[0]
        if route == "/_demo/calls":
            with LOCK:
                payload = json.dumps(CALLS, indent=2).encode()
        elif route == "/_demo/alerts":
            # pag0's alert webhook posts here; GET lists what arrived.
            with LOCK:
                if self.command == "POST":
                    try:
                        ALERTS.append(json.loads(raw))
                    except ValueError:
                        pass
                    print(f"alert: {raw.decode(errors='replace')}", flush=True)
                payload = json.dumps(ALERTS, indent=2).encode()
        elif route == "/_demo/llm/last":
            with LOCK:
                payload = json.dumps(LLM_LAST, indent=2).encode()
        elif route == "/_demo/llm/log":
            with LOCK:
                payload = json.dumps(LLM_LOG).encode()
        elif route == "/_demo/llm/reset" and self.command == "POST":
            with LOCK:
                LLM_LAST.clear()
                LLM_COUNT.clear()
                LLM_LOG.clear()
                ANTHROPIC_CACHE.clear()
                OPENAI_SEEN.clear()
            payload = b'{"reset": true}'
        else:
            host = (self.headers.get("host") or "").split(":")[0].lower()
            key = f"{host}{route}"
            with LOCK:
                CALLS[key] = CALLS.get(key, 0) + 1
            if self.command == "POST" and self._llm(host, route, raw):
                return
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            payload = json.dumps(answer(host, self.path, body)).encode()
        self._send_json(200, payload, {})

    do_GET = _serve
    do_POST = _serve

    # -- LLM endpoints --

    def _llm(self, host, route, raw):
        """Answers an LLM call and returns True, or returns False for any other request."""
        if host.startswith("api.anthropic.com") and route in ("/v1/messages", "/v1/messages/count_tokens"):
            api = "anthropic"
        elif host.startswith("api.openai.com") and route in ("/v1/chat/completions", "/v1/responses"):
            api = "openai"
        else:
            return False
        endpoint = f"{host}{route}"
        headers = self.headers
        error = anthropic_error if api == "anthropic" else openai_error
        record = {"endpoint": endpoint, "path": self.path, "headers": recorded_headers(headers),
                  "request": None, "stream": False, "status": 200, "outcome": "complete",
                  "usage": None, "computed": None, "promptTokens": None,
                  "body": raw.decode("utf-8", "replace"), "bodyBytes": len(raw)}
        delay = header_int(headers, "x-demo-delay-ms")
        if delay:
            time.sleep(delay / 1000)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self._finish_llm(record, 400, error(400, "The request body is not valid JSON."), "invalid")
            return True
        record["request"] = body
        if not isinstance(body, dict):
            body = {}
        record["stream"] = bool(body.get("stream"))
        forced = header_int(headers, "x-demo-status")
        if forced is not None and 400 <= forced <= 599:
            self._finish_llm(record, forced, error(forced), "status")
            return True
        if api == "anthropic":
            invalid = anthropic_invalid(body)
            if invalid:
                self._finish_llm(record, 400, error(400, invalid), "invalid")
                return True
            if route == "/v1/messages/count_tokens":
                total = sum(tok(block) for block in anthropic_blocks(body))
                record["promptTokens"] = total
                self._finish_llm(record, 200, {"input_tokens": total}, "complete")
                return True
            model, total, usage, stop_reason = anthropic_usage(body, headers)
            record["promptTokens"] = total
            record["computed"] = usage
            msg_id = new_id("msg_01")
            if not body.get("stream"):
                record["usage"] = usage
                self._finish_llm(record, 200, anthropic_message(msg_id, model, usage, stop_reason),
                                 "complete")
                return True
            events, final, outcome = anthropic_events(msg_id, model, usage, stop_reason, headers)
            record["usage"] = final
            self._stream(record, events, outcome)
            return True
        make = chat_answer if route == "/v1/chat/completions" else responses_answer
        total, computed, usage, doc, events, outcome = make(body, headers)
        record["promptTokens"] = total
        record["computed"] = computed
        record["usage"] = usage
        if events is None:
            self._finish_llm(record, 200, doc, outcome)
        else:
            self._stream(record, events, outcome)
        return True

    def _remember(self, record):
        with LOCK:
            LLM_COUNT[record["endpoint"]] = LLM_COUNT.get(record["endpoint"], 0) + 1
            record["count"] = LLM_COUNT[record["endpoint"]]
            LLM_LAST[record["endpoint"]] = record
            LLM_LOG.append(record)
            del LLM_LOG[:-LLM_LOG_MAX]

    def _finish_llm(self, record, status, doc, outcome):
        record["status"], record["outcome"] = status, outcome
        payload = json.dumps(doc).encode()
        cut = self._write(status, "application/json", [payload], chunked=False)
        if cut:
            record["outcome"] = "cut"
        self._remember(record)

    def _stream(self, record, events, outcome):
        cut = self._write(200, "text/event-stream; charset=utf-8", events, chunked=True)
        record["outcome"] = "cut" if cut else outcome
        self._remember(record)

    def _send_json(self, status, payload, extra):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _write(self, status, content_type, pieces, chunked):
        """Sends the body (pieces: bytes) with the test controls applied; True if cut short."""
        headers = self.headers
        size = header_int(headers, "x-demo-chunk-bytes")
        cut_after = header_int(headers, "x-demo-cut-after-bytes")
        gap = (header_int(headers, "x-demo-event-delay-ms") or 0) / 1000
        if size:
            whole = b"".join(pieces)
            pieces = [whole[i:i + size] for i in range(0, len(whole), size)]
        self.send_response(status, REASONS.get(status))
        self.send_header("content-type", content_type)
        self.send_header("request-id", new_id("req_"))
        self.send_header("x-request-id", new_id("req_"))
        if chunked:
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(sum(len(p) for p in pieces)))
        self.end_headers()
        self.wfile.flush()
        sent = 0
        for n, piece in enumerate(pieces):
            if n and size:
                time.sleep(0.001)
            elif n and gap:
                time.sleep(gap)
            if cut_after is not None and sent + len(piece) > cut_after:
                piece = piece[:cut_after - sent]
                if piece:
                    self._put(piece, chunked)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return True
            self._put(piece, chunked)
            sent += len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        return False

    def _put(self, data, chunked):
        if chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), Handler)
    print(f"demo APIs on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
