#!/usr/bin/env python3
"""The official Anthropic and OpenAI Python SDKs as real clients, for tests/llm.rs.

Run with the python of scripts/ensure-llm-venv.sh. Reads a plan (JSON) on stdin, makes
each call with the SDK and prints, as JSON on stdout, what the client saw:

  plan:   {"base_url": "http://127.0.0.1:PORT", "parallel": false,
           "calls": [{"id": "a1", "api": "anthropic" | "chat" | "responses",
                      "kind": "create" | "stream" | "raw_stream",
                      "host": "api.anthropic.com",      (the Host header: Envoy's vhost)
                      "headers": {...}, "query": {...}, "beta": false,
                      "body": {... the SDK method's keyword arguments ...}}, ...]}
          "parallel": true starts every call in its own thread, released at once by a
          barrier (one SDK client per API and host, shared, as an agent would).

  output: [{"id", "ok", "status", "headers" (answer headers, lowercased),
            "sent": {"method", "path", "bytes", "body", "headers"} (exactly what the SDK
                    put on the wire, captured by an httpx event hook),
            "usage" (what the SDK reports to its caller, normalised below; null when it
                     reported none),
            "error": {"class", "status", "body", "message"} or null, and per kind:
            "events" (SSE event types in order), "deltas" (Anthropic message_delta
            usages), "usageChunks" / "lastChunkChoices" (Chat streams), "stopReason",
            "text"}, ...]

  usage:  anthropic  {"input", "output", "cache_write", "cache_read", "cache_5m",
                      "cache_1h"} (cache_5m / cache_1h: the cache_creation split, null
                      when the answer had none)
          chat       {"prompt", "cached", "output", "reasoning"}
          responses  {"prompt", "cached", "output", "reasoning"}

kinds:  anthropic  create: messages.create (JSON); stream: messages.stream (the SDK's
                   helper, usage from get_final_message()); raw_stream:
                   messages.create(stream=True), usage added up event by event as the
                   SDK documents it (message_start, then each message_delta's non-null
                   counts overwrite). "beta": true goes through client.beta.messages.
        chat       create; stream: chat.completions.create(stream=True) (the body says
                   whether it asks for stream_options.include_usage)
        responses  create; stream: responses.stream (usage from the last
                   response.completed / response.incomplete event)
"""
import json
import sys
import threading
import traceback
import warnings

import anthropic
import openai

warnings.simplefilter("ignore")  # the SDKs warn about retiring model ids

LOCAL = threading.local()
CLIENTS = {}
CLIENTS_LOCK = threading.Lock()


def on_request(request):
    rec = getattr(LOCAL, "rec", None)
    if rec is None:
        return
    body = request.content
    rec["sent"] = {"method": request.method, "path": request.url.raw_path.decode(),
                   "bytes": len(body), "body": body.decode("utf-8", "replace"),
                   "headers": {k.lower(): v for k, v in request.headers.items()}}


def on_response(response):
    rec = getattr(LOCAL, "rec", None)
    if rec is None:
        return
    rec["status"] = response.status_code
    rec["headers"] = {k.lower(): v for k, v in response.headers.items()}


def client(plan, api, host):
    key = (api, host)
    with CLIENTS_LOCK:
        if key in CLIENTS:
            return CLIENTS[key]
        hooks = {"request": [on_request], "response": [on_response]}
        base = plan["base_url"].rstrip("/")
        if api == "anthropic":
            http = anthropic.DefaultHttpxClient(event_hooks=hooks, limits=LIMITS)
            made = anthropic.Anthropic(base_url=base, api_key="sk-ant-pag0-test", max_retries=0,
                                       timeout=60, default_headers={"Host": host},
                                       http_client=http)
        else:
            http = openai.DefaultHttpxClient(event_hooks=hooks, limits=LIMITS)
            made = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-pag0-test", max_retries=0,
                                 timeout=60, default_headers={"Host": host}, http_client=http)
        CLIENTS[key] = made
        return made


def anthropic_usage(u):
    if u is None:
        return None
    if not isinstance(u, dict):
        u = u.model_dump()
    split = u.get("cache_creation")
    return {"input": u.get("input_tokens") or 0, "output": u.get("output_tokens") or 0,
            "cache_write": u.get("cache_creation_input_tokens") or 0,
            "cache_read": u.get("cache_read_input_tokens") or 0,
            "cache_5m": split.get("ephemeral_5m_input_tokens") if split else None,
            "cache_1h": split.get("ephemeral_1h_input_tokens") if split else None}


def chat_usage(u):
    if u is None:
        return None
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    reasoning = (u.completion_tokens_details.reasoning_tokens
                 if u.completion_tokens_details else 0)
    return {"prompt": u.prompt_tokens, "cached": cached or 0, "output": u.completion_tokens,
            "reasoning": reasoning or 0}


def responses_usage(u):
    if u is None:
        return None
    cached = u.input_tokens_details.cached_tokens if u.input_tokens_details else 0
    reasoning = u.output_tokens_details.reasoning_tokens if u.output_tokens_details else 0
    return {"prompt": u.input_tokens, "cached": cached or 0, "output": u.output_tokens,
            "reasoning": reasoning or 0}


def call_anthropic(c, call, rec):
    body, extra = call["body"], {"extra_headers": call.get("headers") or None,
                                 "extra_query": call.get("query") or None}
    messages = c.beta.messages if call.get("beta") else c.messages
    kind = call["kind"]
    if kind == "create":
        msg = messages.create(**body, **extra)
        rec["usage"] = anthropic_usage(msg.usage)
        rec["stopReason"] = msg.stop_reason
        rec["text"] = "".join(getattr(b, "text", "") for b in msg.content)
    elif kind == "stream":
        rec["events"], rec["deltas"] = [], []
        with messages.stream(**body, **extra) as stream:
            for event in stream:
                rec["events"].append(event.type)
                if event.type == "message_delta":
                    rec["deltas"].append(event.usage.model_dump())
            final = stream.get_final_message()
        rec["usage"] = anthropic_usage(final.usage)
        rec["stopReason"] = final.stop_reason
        rec["text"] = "".join(getattr(b, "text", "") for b in final.content)
    elif kind == "raw_stream":
        rec["events"], rec["deltas"] = [], []
        usage, text = None, []
        for event in messages.create(**body, stream=True, **extra):
            rec["events"].append(event.type)
            if event.type == "message_start":
                usage = event.message.usage.model_dump()
            elif event.type == "message_delta":
                delta = event.usage.model_dump()
                rec["deltas"].append(delta)
                for name in ("output_tokens", "input_tokens", "cache_creation_input_tokens",
                             "cache_read_input_tokens"):
                    if delta.get(name) is not None:
                        usage[name] = delta[name]
                rec["stopReason"] = event.delta.stop_reason
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text.append(event.delta.text)
        rec["usage"] = anthropic_usage(usage)
        rec["text"] = "".join(text)
    else:
        raise ValueError(f"unknown kind {kind}")


def call_chat(c, call, rec):
    body, extra = call["body"], {"extra_headers": call.get("headers") or None,
                                 "extra_query": call.get("query") or None}
    if call["kind"] == "create":
        reply = c.chat.completions.create(**body, **extra)
        rec["usage"] = chat_usage(reply.usage)
        rec["stopReason"] = reply.choices[0].finish_reason
        rec["text"] = reply.choices[0].message.content
        return
    chunks = list(c.chat.completions.create(**body, stream=True, **extra))
    with_usage = [ch for ch in chunks if getattr(ch, "usage", None) is not None]
    rec["usageChunks"] = len(with_usage)
    rec["chunks"] = len(chunks)
    rec["lastChunkChoices"] = len(chunks[-1].choices) if chunks else None
    rec["usage"] = chat_usage(with_usage[-1].usage) if with_usage else None
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    rec["stopReason"] = finishes[-1] if finishes else None
    rec["text"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def call_responses(c, call, rec):
    body, extra = call["body"], {"extra_headers": call.get("headers") or None,
                                 "extra_query": call.get("query") or None}
    if call["kind"] == "create":
        resp = c.responses.create(**body, **extra)
        rec["usage"] = responses_usage(resp.usage)
        rec["stopReason"] = resp.status
        rec["text"] = resp.output_text
        return
    rec["events"] = []
    final = None
    with c.responses.stream(**body, **extra) as stream:
        for event in stream:
            rec["events"].append(event.type)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    rec["usage"] = responses_usage(final.usage) if final is not None else None
    rec["stopReason"] = final.status if final is not None else None


CALLERS = {"anthropic": call_anthropic, "chat": call_chat, "responses": call_responses}


def run(plan, call, barrier=None):
    rec = {"id": call["id"], "ok": False, "status": None, "headers": {}, "sent": None,
           "usage": None, "error": None}
    LOCAL.rec = rec
    try:
        c = client(plan, "anthropic" if call["api"] == "anthropic" else "openai", call["host"])
        if barrier is not None:
            barrier.wait(timeout=60)
        CALLERS[call["api"]](c, call, rec)
        rec["ok"] = True
    except Exception as exc:  # what the SDK raised is what the agent sees
        if barrier is not None and rec["sent"] is None:
            barrier.abort()
        body = getattr(exc, "body", None)
        try:
            json.dumps(body)
        except (TypeError, ValueError):
            body = repr(body)
        rec["error"] = {"class": type(exc).__name__, "status": getattr(exc, "status_code", None),
                        "body": body, "message": str(exc)}
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                rec["error"]["raw"] = response.text
            except Exception:  # a stream's body cannot be read again
                rec["error"]["raw"] = None
        if not isinstance(exc, (anthropic.APIError, openai.APIError)):
            rec["error"]["trace"] = traceback.format_exc(limit=3)
    finally:
        LOCAL.rec = None
    return rec


LIMITS = None


def main():
    global LIMITS
    plan = json.load(sys.stdin)
    calls = plan["calls"]
    import httpx2
    LIMITS = httpx2.Limits(max_connections=max(100, len(calls) + 10),
                           max_keepalive_connections=max(20, len(calls) + 10))
    if plan.get("parallel"):
        barrier = threading.Barrier(len(calls))
        results = [None] * len(calls)

        def worker(i):
            results[i] = run(plan, calls[i], barrier)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        results = [run(plan, call) for call in calls]
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
