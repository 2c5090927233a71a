#!/usr/bin/env python3
"""`make bench`'s streamed case: an upstream that answers every request with the same
Anthropic Messages SSE stream, built once, as fast as it can write it.

    python3 bench/sse_upstream.py --port 8080 [--bytes 1048576] [--write 4096]

The stream is the real wire format (as demo/upstream.py speaks it): message_start with the
input-side usage, content_block_start, ping, then content_block_delta events of 100-200
bytes until the body reaches --bytes, content_block_stop, message_delta with the output
usage, message_stop. It goes as HTTP/1.1 chunked transfer encoding, one chunk per --write
bytes of the stream (cut at any byte offset, so events straddle chunks as they do on the
wire), one write each. Keep-alive; any method and path; the request body is read and
ignored. bench/run.py imports this module to know what the answer must be and what it costs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket

MODEL = "claude-sonnet-4-5"
# The usage the stream reports. The request bench/run.py sends is about 200 bytes, so 20
# input tokens is within what it can hold; the answer runs to its max_tokens (4096).
USAGE = {"input_tokens": 20, "output_tokens": 4096}
WORDS = ("the quick brown fox jumps over a lazy dog while metering every token of "
         "an answer that streams past in small pieces").split()


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def text_piece(i: int) -> str:
    """The text of delta i: 10 to 84 characters, now and then a line break (escaped in JSON)."""
    n = 10 + (i * 37) % 75
    out, k = "", i
    while len(out) < n:
        out += WORDS[k % len(WORDS)] + ("\n" if k % 13 == 0 else " ")
        k += 1
    return out[:n]


def stream_body(target: int) -> tuple[bytes, int]:
    """(the SSE body, its number of events), at least `target` bytes."""
    start = {"id": "msg_bench0000000000000000000", "type": "message", "role": "assistant",
             "model": MODEL, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": USAGE["input_tokens"], "cache_creation_input_tokens": 0,
                       "cache_read_input_tokens": 0,
                       "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                       "output_tokens": 1, "service_tier": "standard"}}
    head = [sse("message_start", {"type": "message_start", "message": start}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
            sse("ping", {"type": "ping"})]
    tail = [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                  "usage": {"output_tokens": USAGE["output_tokens"]}}),
            sse("message_stop", {"type": "message_stop"})]
    events = list(head)
    size = sum(map(len, head)) + sum(map(len, tail))
    i = 0
    while size < target:
        e = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": text_piece(i)}})
        events.append(e)
        size += len(e)
        i += 1
    events += tail
    return b"".join(events), len(events)


def answer(target: int, write: int) -> tuple[bytes, list[bytes], bytes, int]:
    """(response head, the chunked-encoded writes ending with the last chunk, the SSE body,
    its number of events)."""
    body, events = stream_body(target)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\nrequest-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n")
    writes = [b"%x\r\n%s\r\n" % (len(body[i:i + write]), body[i:i + write])
              for i in range(0, len(body), write)]
    writes[-1] += b"0\r\n\r\n"
    return head, writes, body, events


def cost(prices: dict) -> int:
    """What the stream's usage costs at a price row (per million tokens), rounded up as pag0 does."""
    total = USAGE["input_tokens"] * int(prices["input"]) + USAGE["output_tokens"] * int(prices["output"])
    return -(-total // 1_000_000)


async def read_request(reader: asyncio.StreamReader) -> bool:
    """Reads one request, body included; False at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description="SSE upstream for make bench's streamed case")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bytes", type=int, default=1024 * 1024)
    ap.add_argument("--write", type=int, default=4096)
    a = ap.parse_args()
    head, writes, _, _ = answer(a.bytes, a.write)
    first = head + writes[0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while await read_request(reader):
                writer.write(first)
                for w in writes[1:]:
                    writer.write(w)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def run() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", a.port, backlog=128)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
