#!/usr/bin/env python3
"""Paid demo API using the official x402 Python SDK's FastAPI middleware (protocol v2).

    /tmp/x402-venv/bin/python server.py --port 9404 --facilitator http://127.0.0.1:9403

Routes (price 10000 = 0.01 USDC, 6 decimals, network eip155:84532):
  GET  /weather        -> {"report": ..., "paid": true}
  POST /echo  (JSON)   -> {"echo": <request body>, "paid": true}
  GET  /free           -> unpaid
"""
from __future__ import annotations

import argparse
import os

from fastapi import FastAPI, Request
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import ExactEvmServerScheme

NETWORK = "eip155:84532"
# USDC on Base Sepolia; EIP-712 domain name "USDC", version "2".
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PRICE = os.environ.get("PAG0_X402_PRICE", "10000")


def accepts():
    return {
        "scheme": "exact",
        "payTo": PAY_TO,
        "price": {"amount": PRICE, "asset": ASSET, "extra": {"name": "USDC", "version": "2"}},
        "network": NETWORK,
        "maxTimeoutSeconds": 300,
    }


def build_app(facilitator_url: str) -> FastAPI:
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url))
    server = x402ResourceServer(facilitator)
    server.register(NETWORK, ExactEvmServerScheme())
    routes = {
        "GET /weather": {"accepts": accepts(), "description": "Weather report", "mimeType": "application/json"},
        "POST /echo": {"accepts": accepts(), "description": "Echo a JSON body", "mimeType": "application/json"},
    }
    app = FastAPI()
    mw = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402_mw(request: Request, call_next):
        return await mw(request, call_next)

    @app.get("/weather")
    async def weather():
        return {"report": {"weather": "sunny", "temperature": 21}, "paid": True}

    @app.post("/echo")
    async def echo(request: Request):
        return {"echo": await request.json(), "paid": True}

    @app.get("/free")
    async def free():
        return {"free": True}

    return app


def main():
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9404)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--facilitator", default="http://127.0.0.1:9403")
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("server: refusing to listen on a non-loopback address")
    uvicorn.run(build_app(a.facilitator), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
