#!/usr/bin/env python3
"""An agent holding its own wallet, paying x402 (v2 or v1) with the official x402 SDK client.

    PAG0_AGENT_KEY=0x<64 hex> python agent.py URL [--host H] [--method POST] [--body JSON]
        [--header k:v]... [--count N] [--concurrency C]

Sends the call N times (C at once), paying each 402 itself. Prints one JSON line per call:
status, pag0's x-pag0-* headers, the decoded settlement, and the body (or the error).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os

from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client


def settlement(headers) -> dict | None:
    raw = headers.get("payment-response") or headers.get("x-payment-response")
    if not raw:
        return None
    try:
        return json.loads(base64.b64decode(raw))
    except ValueError:
        return {"undecodable": raw}


async def one(client, args, headers) -> dict:
    try:
        r = await client.request(args.method, args.url, headers=headers, content=args.body)
    except Exception as e:  # the SDK raises when it cannot or will not pay
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "status": r.status_code,
        "headers": {k: v for k, v in r.headers.items() if k.startswith("x-pag0-")},
        "settlement": settlement(r.headers),
        "body": r.text,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--host")
    ap.add_argument("--method", default="GET")
    ap.add_argument("--body")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.host:
        headers["host"] = args.host
    if args.body is not None:
        headers["content-type"] = "application/json"
    client = register_exact_evm_client(x402Client(), Account.from_key(os.environ["PAG0_AGENT_KEY"]))
    gate = asyncio.Semaphore(max(1, args.concurrency))
    limits_kw = {"timeout": 30.0}
    async with x402HttpxClient(client, **limits_kw) as http:

        async def run() -> dict:
            async with gate:
                return await one(http, args, headers)

        for result in await asyncio.gather(*(run() for _ in range(args.count))):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
