#!/usr/bin/env python3
"""pag0 reference x402 signer service (loopback only).

Signs x402 `exact` EVM payments: EIP-712 typed EIP-3009 TransferWithAuthorization,
for x402 protocol v1 (X-PAYMENT) and v2 (PAYMENT-SIGNATURE).

    python3 signer.py --port 9402 [--key-file KEY] [--delay-ms 0]
    key: --key-file (hex private key, optional 0x, whitespace ignored) or env PAG0_SIGNER_KEY

POST /sign  {"x402Version": 1|2, "requirement": {<one accepts[] entry>},
             "resource": "<url>" | {"url": ...}, "tenant": "...", "session": "...", "agent": "..."}
  200 {"header": "PAYMENT-SIGNATURE"|"X-PAYMENT", "value": "<base64 json>", "amount": "<decimal>",
       "network": "...", "payer": "0x..."}
  4xx/5xx {"error": "..."}
GET /healthz -> {"ok": true, "payer": "0x..."}
GET /signed  -> {"count": n, "signed": [{tenant, session, agent, amount, network, nonce}...]}
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer as _THS


class ThreadingHTTPServer(_THS):
    daemon_threads = True
    request_queue_size = 1024

from eth_account import Account
from eth_utils import is_address

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from x402common import (  # noqa: E402
    BadRequest,
    b64json,
    chain_id_for,
    parse_uint,
    requirement_amount,
    signable,
    typed_data,
)

MAX_BODY = 64 * 1024


def load_key(key_file: str | None) -> str:
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            key = f.read().strip()
    else:
        key = os.environ.get("PAG0_SIGNER_KEY", "").strip()
    if not key:
        raise SystemExit("signer: no key (use --key-file or PAG0_SIGNER_KEY)")
    if not key.startswith("0x"):
        key = "0x" + key
    return key


class Signer:
    def __init__(self, key: str, delay_ms: int = 0):
        self.account = Account.from_key(key)
        self.delay_ms = delay_ms
        self.lock = threading.Lock()
        self.signed: list[dict] = []

    def sign(self, req_body: dict) -> dict:
        if not isinstance(req_body, dict):
            raise BadRequest("body must be a JSON object")
        version = req_body.get("x402Version")
        if version not in (1, 2) or isinstance(version, bool):
            raise BadRequest("x402Version must be 1 or 2")
        req = req_body.get("requirement")
        if not isinstance(req, dict):
            raise BadRequest("requirement must be an object (one accepts[] entry)")
        if req.get("scheme") != "exact":
            raise BadRequest(f"unsupported scheme {req.get('scheme')!r}")
        network = req.get("network")
        chain_id = chain_id_for(network)
        if version == 2 and not str(network).startswith("eip155:"):
            raise BadRequest("v2 network must be CAIP-2 eip155:<chainId>")
        asset, pay_to = req.get("asset"), req.get("payTo")
        if not isinstance(asset, str) or not is_address(asset):
            raise BadRequest("asset must be an EVM address")
        if not isinstance(pay_to, str) or not is_address(pay_to):
            raise BadRequest("payTo must be an EVM address")
        extra = req.get("extra") or {}
        if not isinstance(extra, dict):
            raise BadRequest("extra must be an object")
        if extra.get("assetTransferMethod") not in (None, "eip3009"):
            raise BadRequest(f"unsupported assetTransferMethod {extra.get('assetTransferMethod')!r}")
        name, ver = extra.get("name"), extra.get("version")
        if not isinstance(name, str) or not isinstance(ver, str):
            raise BadRequest("extra.name and extra.version (EIP-712 domain) are required")
        amount = requirement_amount(req, version)
        timeout = req.get("maxTimeoutSeconds", 60)
        timeout = parse_uint(timeout, "maxTimeoutSeconds", 32) or 60

        now = int(time.time())
        valid_after = max(0, now - 60)
        valid_before = now + timeout
        nonce = secrets.token_bytes(32)
        td = typed_data(
            name=name, version=ver, chain_id=chain_id, asset=asset,
            frm=self.account.address, to=pay_to, value=int(amount),
            valid_after=valid_after, valid_before=valid_before, nonce_bytes=nonce,
        )
        signed = self.account.sign_message(signable(td))
        inner = {
            "authorization": {
                "from": self.account.address,
                "to": pay_to,
                "value": amount,
                "validAfter": str(valid_after),
                "validBefore": str(valid_before),
                "nonce": "0x" + nonce.hex(),
            },
            "signature": "0x" + bytes(signed.signature).hex(),
        }
        if version == 2:
            payload = {"x402Version": 2, "payload": inner, "accepted": req}
            resource = req_body.get("resource")
            if isinstance(resource, str) and resource:
                payload["resource"] = {"url": resource}
            elif isinstance(resource, dict):
                payload["resource"] = resource
            exts = req_body.get("extensions")
            if isinstance(exts, dict) and exts:
                payload["extensions"] = exts
            header = "PAYMENT-SIGNATURE"
        else:
            payload = {"x402Version": 1, "scheme": "exact", "network": network, "payload": inner}
            header = "X-PAYMENT"
        with self.lock:
            self.signed.append({
                "tenant": req_body.get("tenant"), "session": req_body.get("session"),
                "agent": req_body.get("agent"), "amount": amount, "network": network,
                "nonce": inner["authorization"]["nonce"], "x402Version": version,
            })
        return {"header": header, "value": b64json(payload), "amount": amount,
                "network": network, "payer": self.account.address}


def make_handler(signer: Signer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet unless PAG0_X402_LOG
            if os.environ.get("PAG0_X402_LOG"):
                sys.stderr.write("signer: " + fmt % args + "\n")

        def reply(self, status: int, obj: dict):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(200, {"ok": True, "payer": signer.account.address})
            if self.path == "/signed":
                with signer.lock:
                    return self.reply(200, {"count": len(signer.signed), "signed": list(signer.signed)})
            self.reply(404, {"error": "not found"})

        def do_POST(self):
            if self.path == "/control":
                # Tests: {"delayMs": N} makes the signer slow from now on.
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                    signer.delay_ms = max(0, int(json.loads(self.rfile.read(min(n, MAX_BODY)))["delayMs"]))
                except (ValueError, KeyError, TypeError) as e:
                    return self.reply(400, {"error": f"bad control: {e}"})
                return self.reply(200, {"delayMs": signer.delay_ms})
            if self.path != "/sign":
                return self.reply(404, {"error": "not found"})
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self.reply(400, {"error": "bad Content-Length"})
            if n > MAX_BODY:
                return self.reply(413, {"error": "body too large"})
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                return self.reply(400, {"error": f"bad JSON: {e}"})
            if signer.delay_ms:
                time.sleep(signer.delay_ms / 1000)
            try:
                out = signer.sign(body)
            except BadRequest as e:
                return self.reply(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001
                return self.reply(500, {"error": f"signing failed: {e}"})
            self.reply(200, out)

    return Handler


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=9402)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--key-file")
    ap.add_argument("--delay-ms", type=int, default=0, help="sleep before answering (tests: slow signer)")
    a = ap.parse_args(argv)
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("signer: refusing to listen on a non-loopback address")
    signer = Signer(load_key(a.key_file), a.delay_ms)
    srv = ThreadingHTTPServer((a.host, a.port), make_handler(signer))
    srv.daemon_threads = True
    print(f"signer: listening on {a.host}:{srv.server_address[1]} payer={signer.account.address}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
