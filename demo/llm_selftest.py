#!/usr/bin/env python3
"""Self-test of the LLM answers of demo/upstream.py with the official SDKs as clients.

Run it with the python of scripts/ensure-llm-venv.sh against a running upstream.py, with
no Envoy in between (the SDKs send `Host: api.anthropic.com` / `Host: api.openai.com`):

    python3 demo/upstream.py --port 18080 &
    "$(scripts/ensure-llm-venv.sh)" demo/llm_selftest.py --upstream http://127.0.0.1:18080

It checks that the anthropic and openai SDKs parse every answer (JSON and SSE, both
streaming helpers of each SDK) and that the usage they report equals the formulas in
upstream.py's docstring, computed here independently (prompt caching included). Every
run uses fresh prompts (a random nonce), so it does not depend on what the upstream saw
before. Exit status 0 when all checks pass.
"""
import argparse
import json
import sys
import urllib.request
import uuid
import warnings

import anthropic
import openai

warnings.simplefilter("ignore", DeprecationWarning)  # the SDKs warn about retiring model ids

FAILURES = []
PASSED = 0


def check(cond, what, got=None):
    global PASSED
    if cond:
        PASSED += 1
    else:
        FAILURES.append(f"{what}" + (f" (got {got!r})" if got is not None else ""))
        print(f"FAIL {what}" + (f": got {got!r}" if got is not None else ""), flush=True)


def equal(got, want, what):
    check(got == want, f"{what}: want {want!r}", got)


# --- the documented formulas, written again from the docstring ---------------------------------


def canon(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def tok(value):
    return max(1, -(-len(canon(value).encode("utf-8")) // 4))


def anthropic_blocks(body):
    blocks = list(body.get("tools", []))
    system = body.get("system")
    if isinstance(system, list):
        blocks += system
    elif system is not None:
        blocks.append(system)
    for message in body.get("messages", []):
        if isinstance(message.get("content"), list):
            blocks += message["content"]
        else:
            blocks.append(message)
    return blocks or [body]


def chat_blocks(body):
    return (list(body.get("tools", [])) + list(body.get("messages", []))) or [body]


def responses_blocks(body):
    blocks = list(body.get("tools", []))
    if "instructions" in body:
        blocks.append(body["instructions"])
    inp = body.get("input")
    blocks += inp if isinstance(inp, list) else ([inp] if inp is not None else [])
    return blocks or [body]


def prefix_tokens(blocks):
    out, total = [], 0
    for block in blocks:
        total += tok(block)
        out.append(total)
    return out


def output_tokens(prompt, limit=None, forced=None):
    natural = forced if forced is not None else 20 + prompt % 50
    return (limit, True) if limit is not None and natural > limit else (natural, False)


class AnthropicCacheModel:
    """The client-side view of the upstream's prompt cache: which breakpoints were written."""

    def __init__(self):
        self.seen = set()

    def usage(self, body):
        model = body.get("model", "claude-sonnet-4-5")
        blocks = anthropic_blocks(body)
        pre = prefix_tokens(blocks)
        keys = [model + "".join("\n" + canon(b) for b in blocks[:k + 1]) for k in range(len(blocks))]
        points = [(k, "1h" if b["cache_control"].get("ttl") == "1h" else "5m")
                  for k, b in enumerate(blocks) if isinstance(b, dict) and "cache_control" in b]
        read_k = max((k for k, _ in points if keys[k] in self.seen), default=-1)
        self.seen.update(keys[k] for k, _ in points)
        read = pre[read_k] if read_k >= 0 else 0
        written, edge = {"5m": 0, "1h": 0}, read
        for k, ttl in points:
            if k > read_k:
                written[ttl] += pre[k] - edge
                edge = pre[k]
        return {"prompt": pre[-1], "input_tokens": pre[-1] - edge, "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written["5m"] + written["1h"],
                "ephemeral_5m_input_tokens": written["5m"], "ephemeral_1h_input_tokens": written["1h"]}


class OpenAICacheModel:
    def __init__(self, endpoint):
        self.endpoint, self.seen = endpoint, set()

    def cached(self, model, blocks):
        pre = prefix_tokens(blocks)
        keys = [self.endpoint + model + "".join("\n" + canon(b) for b in blocks[:k + 1])
                for k in range(len(blocks))]
        best = max((pre[k] for k in range(len(blocks)) if keys[k] in self.seen), default=0)
        self.seen.update(keys[k] for k in range(len(blocks)) if pre[k] >= 1024)
        return pre[-1], (best // 128 * 128 if best >= 1024 else 0)


# --- helpers --------------------------------------------------------------------------------------


def last_record(upstream, endpoint):
    with urllib.request.urlopen(f"{upstream}/_demo/llm/last", timeout=10) as resp:
        return json.load(resp).get(endpoint)


def check_anthropic_usage(usage, want, out, what):
    equal(usage.input_tokens, want["input_tokens"], f"{what}: input_tokens")
    equal(usage.cache_read_input_tokens, want["cache_read_input_tokens"], f"{what}: cache_read_input_tokens")
    equal(usage.cache_creation_input_tokens, want["cache_creation_input_tokens"],
          f"{what}: cache_creation_input_tokens")
    equal(usage.cache_creation.ephemeral_5m_input_tokens, want["ephemeral_5m_input_tokens"],
          f"{what}: ephemeral_5m_input_tokens")
    equal(usage.cache_creation.ephemeral_1h_input_tokens, want["ephemeral_1h_input_tokens"],
          f"{what}: ephemeral_1h_input_tokens")
    equal(usage.output_tokens, out, f"{what}: output_tokens")


# --- Anthropic ------------------------------------------------------------------------------------


def test_anthropic(upstream, nonce):
    client = anthropic.Anthropic(base_url=upstream, api_key="sk-ant-demo", max_retries=0,
                                 default_headers={"Host": "api.anthropic.com"})
    cache = AnthropicCacheModel()
    endpoint = "api.anthropic.com/v1/messages"
    long_system = f"[{nonce}] You are a careful coding agent. " * 40
    tools = [{"name": "read_file", "description": f"Read a file ({nonce})",
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

    # 1. non-streamed, one 5m breakpoint on the system prompt: cache write, then read.
    body = {"model": "claude-opus-5-5", "max_tokens": 1024,
            "system": [{"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": f"Summarise the repo ({nonce})"}]}
    want = cache.usage(body)
    out, _ = output_tokens(want["prompt"], 1024)
    msg = client.messages.create(**body)
    equal(msg.type, "message", "anthropic create: type")
    equal(msg.model, "claude-opus-5-5", "anthropic create: model echoed")
    equal(msg.stop_reason, "end_turn", "anthropic create: stop_reason")
    equal(msg.stop_sequence, None, "anthropic create: stop_sequence")
    check(want["cache_creation_input_tokens"] > 0, "anthropic create: the test writes the cache")
    check_anthropic_usage(msg.usage, want, out, "anthropic create (cache write)")
    record = last_record(upstream, endpoint)
    equal(record["request"], body, "llm/last: request body as received")
    equal(record["usage"]["output_tokens"], out, "llm/last: usage")
    equal(record["promptTokens"], want["prompt"], "llm/last: promptTokens")

    # 2. the same prompt through client.messages.stream: a cache read.
    want = cache.usage(body)
    check(want["cache_read_input_tokens"] > 0, "anthropic stream: the test reads the cache")
    with client.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check_anthropic_usage(final.usage, want, out, "anthropic messages.stream (cache read)")
    equal(final.stop_reason, "end_turn", "anthropic messages.stream: stop_reason")
    equal(final.content[0].text, text, "anthropic messages.stream: text")
    equal(len(text.split()), out, "anthropic messages.stream: one word per output token")

    # 3. create(stream=True) with a 1h breakpoint (tools) and a 5m one (system), via the beta
    #    path (?beta=true, as Claude Code calls it).
    body3 = dict(body, tools=tools, stream=True,
                 messages=[{"role": "user", "content": [{"type": "text", "text": f"Plan ({nonce})"}]}])
    want = cache.usage(body3)
    out3, _ = output_tokens(want["prompt"], 1024)
    check(want["ephemeral_1h_input_tokens"] > 0 and want["ephemeral_5m_input_tokens"] > 0,
          "anthropic raw stream: the test writes both ttls")
    kinds, start, delta = [], None, None
    for event in client.beta.messages.create(**body3, betas=["context-1m-2025-08-07"],
                                             extra_query={"beta": "true"}):
        kinds.append(event.type)
        if event.type == "message_start":
            start = event.message.usage
        elif event.type == "message_delta":
            delta = event
    deltas = kinds.count("content_block_delta")
    equal(kinds, ["message_start", "content_block_start"] + ["content_block_delta"] * deltas
          + ["content_block_stop", "message_delta", "message_stop"], "anthropic raw stream: event order")
    check(deltas >= 2, "anthropic raw stream: several text deltas", deltas)
    check_anthropic_usage(start, want, 1, "anthropic raw stream: message_start")
    equal(delta.usage.output_tokens, out3, "anthropic raw stream: message_delta output_tokens")
    equal(delta.usage.input_tokens, None, "anthropic raw stream: message_delta has no input_tokens")
    equal(delta.delta.stop_reason, "end_turn", "anthropic raw stream: stop_reason")
    record = last_record(upstream, endpoint)
    equal(record["path"], "/v1/messages?beta=true", "llm/last: path keeps the query")
    equal(record["stream"], True, "llm/last: stream")

    # 4. the tools breakpoint is read back (1h) when only the system prompt changes.
    body4 = dict(body3, system=[{"type": "text", "text": long_system + "!", "cache_control": {"type": "ephemeral"}}])
    body4.pop("stream")
    want = cache.usage(body4)
    check(want["cache_read_input_tokens"] == tok(tools[0]), "anthropic: tools prefix read back")
    out4, _ = output_tokens(want["prompt"], 1024)
    with client.messages.stream(**body4) as stream:
        final = stream.get_final_message()
    check_anthropic_usage(final.usage, want, out4, "anthropic messages.stream (1h read, 5m write)")

    # 5. max_tokens below the natural count: clamped, stop_reason max_tokens.
    body5 = {"model": "claude-haiku-4-5", "max_tokens": 5,
             "messages": [{"role": "user", "content": f"Write an essay ({nonce})"}]}
    want = cache.usage(body5)
    with client.messages.stream(**body5) as stream:
        final = stream.get_final_message()
    check_anthropic_usage(final.usage, want, 5, "anthropic clamped")
    equal(final.stop_reason, "max_tokens", "anthropic clamped: stop_reason")

    # 6. x-demo-output-tokens, x-demo-chunk-bytes (events split at odd offsets).
    body6 = dict(body5, max_tokens=4096)
    want = cache.usage(body6)
    with client.messages.stream(**body6, extra_headers={"x-demo-output-tokens": "77",
                                                        "x-demo-chunk-bytes": "7"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check_anthropic_usage(final.usage, want, 77, "anthropic forced output, 7-byte pieces")
    equal(len(text.split()), 77, "anthropic 7-byte pieces: text intact")

    # 7. x-demo-deltas: 3 -> cumulative message_delta usage, as with server tools.
    want = cache.usage(body6)
    out7, _ = output_tokens(want["prompt"], 4096)
    seen = []
    with client.messages.stream(**body6, extra_headers={"x-demo-deltas": "3"}) as stream:
        for event in stream:
            if event.type == "message_delta":
                seen.append(event.usage)
        final = stream.get_final_message()
    equal(len(seen), 3, "anthropic deltas: three message_delta events")
    equal(seen[0].input_tokens, want["input_tokens"] + 100, "anthropic deltas: first carries input_tokens")
    equal([u.output_tokens for u in seen], [max(1, out7 * j // 3) for j in (1, 2)] + [out7],
          "anthropic deltas: cumulative output_tokens")
    equal(final.usage.input_tokens, want["input_tokens"] + 200, "anthropic deltas: final input_tokens")
    equal(final.usage.output_tokens, out7, "anthropic deltas: final output_tokens")
    equal(final.usage.server_tool_use.web_search_requests, 2, "anthropic deltas: server_tool_use")
    equal(last_record(upstream, endpoint)["usage"]["input_tokens"], want["input_tokens"] + 200,
          "llm/last: deltas usage is the final one")

    # 8. x-demo-delta-usage: full -> the last message_delta repeats input and cache counts.
    want = cache.usage(body6)
    with client.messages.stream(**body6, extra_headers={"x-demo-delta-usage": "full"}) as stream:
        deltas = [e.usage for e in stream if e.type == "message_delta"]
    equal(deltas[-1].input_tokens, want["input_tokens"], "anthropic full delta usage: input_tokens")
    equal(deltas[-1].cache_read_input_tokens, 0, "anthropic full delta usage: cache_read_input_tokens")

    # 9. an error event mid-stream; forced statuses; a thinking budget not below max_tokens.
    try:
        with client.messages.stream(**body6, extra_headers={"x-demo-error-event": "1"}) as stream:
            for _ in stream:
                pass
        check(False, "anthropic error event: the SDK raises")
    except anthropic.APIStatusError as exc:
        check("overloaded_error" in str(exc), "anthropic error event: overloaded_error", str(exc))
    equal(last_record(upstream, endpoint)["outcome"], "error-event", "llm/last: outcome error-event")
    for status, kind in ((429, anthropic.RateLimitError), (529, anthropic.InternalServerError)):
        try:
            client.messages.create(**body6, extra_headers={"x-demo-status": str(status)})
            check(False, f"anthropic status {status}: the SDK raises")
        except kind as exc:
            equal(exc.status_code, status, f"anthropic status {status}")
            equal(exc.body["type"], "error", f"anthropic status {status}: error body")
    try:
        client.messages.create(**dict(body6, max_tokens=2000),
                               thinking={"type": "enabled", "budget_tokens": 2000})
        check(False, "anthropic thinking budget >= max_tokens: 400")
    except anthropic.BadRequestError as exc:
        check("budget_tokens" in str(exc), "anthropic thinking budget >= max_tokens: 400", str(exc))

    # 10. count_tokens.
    counted = client.messages.count_tokens(model="claude-opus-5-5", messages=body5["messages"])
    equal(counted.input_tokens, sum(tok(b) for b in anthropic_blocks(body5)), "anthropic count_tokens")


# --- OpenAI ----------------------------------------------------------------------------------------


def test_openai(upstream, nonce):
    client = openai.OpenAI(base_url=f"{upstream}/v1", api_key="sk-demo", max_retries=0,
                           default_headers={"Host": "api.openai.com"})
    chat_cache = OpenAICacheModel("chat")
    endpoint = "api.openai.com/v1/chat/completions"
    system = {"role": "system", "content": f"[{nonce}] You are a careful coding agent. " * 120}
    body = {"model": "gpt-4.1", "messages": [system, {"role": "user", "content": f"Hello ({nonce})"}]}

    # 1. non-streamed; the long system prompt is remembered for later requests.
    prompt, cached = chat_cache.cached("gpt-4.1", chat_blocks(body))
    check(tok(system) >= 1024, "openai: the system prompt is long enough to be cached")
    out, _ = output_tokens(prompt)
    reply = client.chat.completions.create(**body)
    equal(reply.object, "chat.completion", "openai create: object")
    equal(reply.choices[0].finish_reason, "stop", "openai create: finish_reason")
    equal((reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens),
          (prompt, out, prompt + out), "openai create: usage")
    equal(reply.usage.prompt_tokens_details.cached_tokens, cached, "openai create: cached_tokens")
    equal(reply.usage.completion_tokens_details.reasoning_tokens, 0, "openai create: reasoning_tokens")
    equal(last_record(upstream, endpoint)["request"], body, "llm/last: chat request body")

    # 2. streamed with include_usage, same system prompt, new user turn: a cache hit.
    body2 = dict(body, messages=[system, {"role": "user", "content": f"Again ({nonce})"}])
    prompt, cached = chat_cache.cached("gpt-4.1", chat_blocks(body2))
    check(cached >= 1024 and cached % 128 == 0, "openai stream: the test hits the cache", cached)
    out, _ = output_tokens(prompt)
    chunks = list(client.chat.completions.create(**body2, stream=True,
                                                 stream_options={"include_usage": True}))
    equal(chunks[-1].choices, [], "openai stream: the usage chunk has no choices")
    usage = chunks[-1].usage
    equal((usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens),
          (prompt, out, cached), "openai stream: usage")
    check(all(c.usage is None for c in chunks[:-1]), "openai stream: earlier chunks have usage null")
    equal(chunks[-2].choices[0].finish_reason, "stop", "openai stream: finish_reason")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    equal(len(text.split()), out, "openai stream: text")

    # 3. streamed without include_usage: no usage anywhere; the record says what it would be.
    chunks = list(client.chat.completions.create(**body2, stream=True))
    chat_cache.cached("gpt-4.1", chat_blocks(body2))
    check(all(getattr(c, "usage", None) is None for c in chunks), "openai stream without usage")
    record = last_record(upstream, endpoint)
    equal(record["usage"], None, "llm/last: no usage answered")
    equal(record["computed"]["completion_tokens"], out, "llm/last: computed usage")

    # 4. a reasoning model, clamped by max_completion_tokens (over max_tokens), 5-byte pieces.
    body4 = {"model": "o4-mini", "max_tokens": 1000, "max_completion_tokens": 9,
             "messages": [{"role": "user", "content": f"Think ({nonce})"}]}
    prompt, cached = chat_cache.cached("o4-mini", chat_blocks(body4))
    chunks = list(client.chat.completions.create(**body4, stream=True, stream_options={"include_usage": True},
                                                 extra_headers={"x-demo-chunk-bytes": "5"}))
    usage = chunks[-1].usage
    equal((usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens), (9, 4),
          "openai reasoning clamped: completion and reasoning tokens")
    equal(chunks[-2].choices[0].finish_reason, "length", "openai clamped: finish_reason")

    # 5. error event mid-stream; a forced 429.
    try:
        for _ in client.chat.completions.create(**body4, stream=True,
                                                extra_headers={"x-demo-error-event": "1"}):
            pass
        check(False, "openai error event: the SDK raises")
    except openai.APIError as exc:
        check("server had an error" in str(exc), "openai error event", str(exc))
    try:
        client.chat.completions.create(**body4, extra_headers={"x-demo-status": "429"})
        check(False, "openai 429: the SDK raises")
    except openai.RateLimitError as exc:
        equal(exc.code, "rate_limit_exceeded", "openai 429: error code")

    # 6. the Responses API, non-streamed and through client.responses.stream.
    resp_cache = OpenAICacheModel("responses")
    body6 = {"model": "gpt-5", "instructions": system["content"], "input": f"Fix the bug ({nonce})"}
    prompt, cached = resp_cache.cached("gpt-5", responses_blocks(body6))
    out, _ = output_tokens(prompt)
    resp = client.responses.create(**body6)
    equal(resp.status, "completed", "openai responses: status")
    equal((resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens),
          (prompt, out, prompt + out), "openai responses: usage")
    equal(resp.usage.output_tokens_details.reasoning_tokens, out // 2, "openai responses: reasoning")
    equal(resp.usage.input_tokens_details.cached_tokens, cached, "openai responses: cached_tokens")
    body6b = dict(body6, input=[{"role": "user", "content": f"And the tests ({nonce})"}])
    prompt, cached = resp_cache.cached("gpt-5", responses_blocks(body6b))
    out, _ = output_tokens(prompt)
    check(cached >= 1024, "openai responses stream: the instructions are read from the cache", cached)
    with client.responses.stream(**body6b) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    equal(kinds[0], "response.created", "openai responses stream: first event")
    equal(kinds[-1], "response.completed", "openai responses stream: last event")
    equal(final.output_text.count(" ") + 1, out - out // 2, "openai responses stream: text")
    equal((final.usage.input_tokens, final.usage.output_tokens, final.usage.input_tokens_details.cached_tokens),
          (prompt, out, cached), "openai responses stream: usage")
    # clamped by max_output_tokens: the stream ends with response.incomplete (the SDK's
    # get_final_response() wants response.completed, so read the event itself).
    body6c = dict(body6b, max_output_tokens=6)
    prompt, cached = resp_cache.cached("gpt-5", responses_blocks(body6c))
    with client.responses.stream(**body6c) as stream:
        events = list(stream)
    equal(events[-1].type, "response.incomplete", "openai responses clamped: last event")
    final = events[-1].response
    equal((final.status, final.incomplete_details.reason), ("incomplete", "max_output_tokens"),
          "openai responses clamped: status")
    equal((final.usage.input_tokens, final.usage.output_tokens, final.usage.input_tokens_details.cached_tokens),
          (prompt, 6, cached), "openai responses clamped: usage")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default="http://127.0.0.1:18080")
    args = parser.parse_args()
    upstream = args.upstream.rstrip("/")
    nonce = uuid.uuid4().hex[:12]
    print(f"llm self-test against {upstream} (anthropic {anthropic.__version__}, "
          f"openai {openai.__version__}, nonce {nonce})", flush=True)
    for test in (test_anthropic, test_openai):
        try:
            test(upstream, nonce)
        except Exception as exc:  # a crash is a failure, with what the SDK said
            check(False, f"{test.__name__} crashed: {type(exc).__name__}: {exc}")
    if FAILURES:
        print(f"{len(FAILURES)} of {len(FAILURES) + PASSED} checks failed", flush=True)
        return 1
    print(f"all {PASSED} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
