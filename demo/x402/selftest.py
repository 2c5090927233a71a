#!/usr/bin/env python3
"""End-to-end self test: local facilitator + official-SDK paid server + reference signer.

    /tmp/x402-venv/bin/python demo/x402/selftest.py      (exit 0 = PASS)
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
procs: list[subprocess.Popen] = []
failures: list[str] = []


_port_next = os.getpid() * 7919


def free_port() -> int:
    # Below Linux's ephemeral range, so an outbound connection cannot take it before
    # the server binds it, and never the same port twice (as bench/run.py picks them).
    global _port_next
    for _ in range(12000):
        port = 20000 + _port_next % 12000
        _port_next += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free loopback port")


def http(method, url, body=None, headers=None, timeout=10):
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def start(args, env=None, ready_url=None):
    p = subprocess.Popen([PY, *args], cwd=HERE, env={**os.environ, **(env or {})},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(p)
    deadline = time.time() + 20
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{args[0]} exited: {p.stderr.read().decode()[-2000:]}")
        try:
            st, _, _ = http("GET", ready_url, timeout=1)
            if st < 500:
                return p
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError(f"{args[0]} not ready at {ready_url}")


def check(cond, what):
    print(("  ok   " if cond else "  FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


def b64d(v):
    return json.loads(base64.b64decode(v))


def sdk_accepts_signature(header_value: str) -> bool:
    """Verify the payment with the official SDK's own EIP-3009 signature classifier."""
    from x402.mechanisms.evm.exact.eip3009_utils import classify_eip3009_signature
    from x402.mechanisms.evm.types import ExactEIP3009Payload
    from x402.mechanisms.evm.utils import get_evm_chain_id

    class EOAOnly:  # offline stand-in for the chain: every address is an EOA
        def get_code(self, address):
            return b""

    pp = b64d(header_value)
    req = pp["accepted"]
    p = ExactEIP3009Payload.from_dict(pp["payload"])
    c = classify_eip3009_signature(EOAOnly(), p.authorization, bytes.fromhex(p.signature[2:]),
                                   get_evm_chain_id(req["network"]), req["asset"],
                                   req["extra"]["name"], req["extra"]["version"])
    return c.valid


def main() -> int:
    fp, sp, gp = free_port(), free_port(), free_port()
    fac, srv, sig = (f"http://127.0.0.1:{p}" for p in (fp, sp, gp))
    key = "0x" + secrets.token_hex(32)
    start(["facilitator.py", "--port", str(fp)], ready_url=fac + "/healthz")
    start(["signer.py", "--port", str(gp)], env={"PAG0_SIGNER_KEY": key}, ready_url=sig + "/healthz")
    start(["server.py", "--port", str(sp), "--facilitator", fac], ready_url=srv + "/free")
    meta = {"tenant": "t1", "session": "s1", "agent": "buyer-1"}

    print("v2 GET /weather")
    st, h, _ = http("GET", srv + "/weather")
    check(st == 402, f"unpaid GET -> 402 (got {st})")
    check("payment-required" in h, "PAYMENT-REQUIRED header present")
    pr = b64d(h["payment-required"])
    print("    PAYMENT-REQUIRED:", json.dumps(pr))
    req = pr["accepts"][0]
    check(pr["x402Version"] == 2 and req["amount"] == "10000", "x402Version 2, amount 10000")

    st, _, body = http("POST", sig + "/sign", {"x402Version": 2, "requirement": req, "resource": pr.get("resource"), **meta})
    check(st == 200, f"signer 200 (got {st} {body[:200]!r})")
    signed = json.loads(body)
    check(signed["header"] == "PAYMENT-SIGNATURE", "signer header PAYMENT-SIGNATURE")
    print("    signer reply:", json.dumps(signed))
    print("    PAYMENT-SIGNATURE:", json.dumps(b64d(signed["value"])))
    check(sdk_accepts_signature(signed["value"]), "official SDK classify_eip3009_signature accepts the signature")

    st, h, body = http("GET", srv + "/weather", headers={signed["header"]: signed["value"]})
    check(st == 200, f"paid GET -> 200 (got {st} {body[:200]!r})")
    check("payment-response" in h, "PAYMENT-RESPONSE header present")
    if "payment-response" in h:
        resp = b64d(h["payment-response"])
        print("    PAYMENT-RESPONSE:", json.dumps(resp))
        tx = resp.get("transaction", "")
        check(resp.get("success") is True and len(tx) == 66 and tx.startswith("0x"), "settled, tx = 0x + 64 hex")
    first_payment = signed

    print("v2 replay of the same payment")
    st, h, _ = http("GET", srv + "/weather", headers={first_payment["header"]: first_payment["value"]})
    check(st == 402, f"replayed payment -> 402 (got {st})")

    print("v2 POST /echo with a body")
    st, h, _ = http("POST", srv + "/echo", {"q": "hello"})
    check(st == 402, f"unpaid POST -> 402 (got {st})")
    pr = b64d(h["payment-required"])
    st, _, body = http("POST", sig + "/sign", {"x402Version": 2, "requirement": pr["accepts"][0], "resource": pr.get("resource"), **meta})
    signed = json.loads(body)
    st, h, body = http("POST", srv + "/echo", {"q": "hello"}, headers={signed["header"]: signed["value"]})
    check(st == 200 and json.loads(body).get("echo") == {"q": "hello"}, f"paid POST -> 200 echo (got {st} {body[:200]!r})")
    check("payment-response" in h and b64d(h["payment-response"]).get("success") is True, "POST settled")

    print("v2 tampered payments")
    st, _, body = http("POST", sig + "/sign", {"x402Version": 2, "requirement": req, "resource": pr.get("resource"), **meta})
    pp = b64d(json.loads(body)["value"])
    bad = json.loads(json.dumps(pp))
    s = bad["payload"]["signature"]
    bad["payload"]["signature"] = s[:10] + ("0" if s[10] != "0" else "1") + s[11:]
    st, h, _ = http("GET", srv + "/weather", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(bad).encode()).decode()})
    check(st == 402, f"tampered signature -> 402 (got {st})")
    bad = json.loads(json.dumps(pp))
    bad["payload"]["authorization"]["to"] = "0x" + "11" * 20
    st, _, _ = http("GET", srv + "/weather", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(bad).encode()).decode()})
    check(st == 402, f"tampered payee -> 402 (got {st})")
    st, _, _ = http("GET", srv + "/weather", headers={"PAYMENT-SIGNATURE": "!!notbase64"})
    check(st == 402, f"garbage header -> 402 (got {st})")

    print("v1 signer + facilitator (X-PAYMENT)")
    req1 = {"scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "10000",
            "resource": srv + "/weather", "description": "", "mimeType": "application/json",
            "payTo": req["payTo"], "maxTimeoutSeconds": 300, "asset": req["asset"],
            "extra": {"name": "USDC", "version": "2"}}
    st, _, body = http("POST", sig + "/sign", {"x402Version": 1, "requirement": req1, "resource": req1["resource"], **meta})
    s1 = json.loads(body)
    check(st == 200 and s1["header"] == "X-PAYMENT", f"v1 sign -> X-PAYMENT (got {st})")
    pp1 = b64d(s1["value"])
    print("    X-PAYMENT:", json.dumps(pp1))
    vbody = {"x402Version": 1, "paymentPayload": pp1, "paymentRequirements": req1}
    st, _, body = http("POST", fac + "/verify", vbody)
    check(json.loads(body).get("isValid") is True, f"v1 facilitator verify valid ({body!r})")
    bad1 = json.loads(json.dumps(pp1))
    bad1["payload"]["authorization"]["value"] = "20000"
    st, _, body = http("POST", fac + "/verify", {**vbody, "paymentPayload": bad1,
                                                  "paymentRequirements": {**req1, "maxAmountRequired": "20000"}})
    check(json.loads(body).get("isValid") is False, f"v1 altered value rejected ({body!r})")
    st, _, body = http("POST", fac + "/settle", vbody)
    check(json.loads(body).get("success") is True, f"v1 settle ok ({body!r})")
    st, _, body = http("POST", fac + "/settle", vbody)
    check(json.loads(body).get("success") is False, "v1 second settle of same nonce refused")

    print("signer errors")
    st, _, body = http("POST", sig + "/sign", {"x402Version": 3, "requirement": req})
    check(st == 400 and "error" in json.loads(body), f"bad version -> 400 JSON error ({st} {body!r})")
    st, _, body = http("POST", sig + "/sign", {"x402Version": 2, "requirement": {**req, "extra": {}}})
    check(st == 400, f"missing extra.name/version -> 400 ({st})")

    st, _, body = http("GET", fac + "/settlements")
    ledger = json.loads(body)
    check(ledger["count"] == 3 and ledger["total"] == "30000", f"facilitator settled 3 payments = 30000 ({ledger['count']}, {ledger['total']})")
    return 0


if __name__ == "__main__":
    rc = 1
    try:
        rc = main()
    except Exception as e:  # noqa: BLE001
        failures.append(f"exception: {e!r}")
        print("  FAIL exception:", repr(e))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    if failures or rc:
        print(f"FAIL ({len(failures)} failures): " + "; ".join(failures))
        sys.exit(1)
    print("PASS")
