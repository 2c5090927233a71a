#!/usr/bin/env python3
"""pag0 local x402 facilitator (loopback only, no chain).

Implements the facilitator HTTP API the official x402 SDKs call:
  GET  /supported  -> {"kinds":[{"x402Version":2,"scheme":"exact","network":"eip155:84532"},...],
                      "extensions":[], "signers":{"eip155:*":[...]}}
  POST /verify     {"x402Version":N,"paymentPayload":{...},"paymentRequirements":{...}}
                   -> 200 {"isValid":true,"payer":"0x.."} | {"isValid":false,"invalidReason":"..","invalidMessage":"..","payer":..}
  POST /settle     same body -> 200 {"success":true,"transaction":"0x<64 hex>","network":"..","payer":"0x..","amount":".."}
                   | {"success":false,"errorReason":"..","errorMessage":"..","transaction":"","network":".."}
Test helpers:
  GET  /settlements -> {"count":n,"total":"<sum of amounts>","settlements":[...]}
  POST /control     {"rejectVerify":bool,"failSettle":bool,"settleDelayMs":int,"verifyDelayMs":int,"settleHttpStatus":int}
  POST /reset       forget settlements, used nonces and control flags

Verification is real: the EIP-712 TransferWithAuthorization signer is recovered with eth-account and
must equal authorization.from; to == payTo; value == amount (or >= with --allow-overpay);
validAfter <= now < validBefore - 6; nonce unused (a nonce becomes used when settled); scheme exact;
network/asset match; EIP-712 domain from requirements.extra {name, version}.

    python3 facilitator.py --port 9403 [--allow-overpay]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer as _THS


class ThreadingHTTPServer(_THS):
    daemon_threads = True
    request_queue_size = 1024

from eth_account import Account

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from x402common import (  # noqa: E402
    BadRequest,
    chain_id_for,
    parse_nonce,
    parse_uint,
    requirement_amount,
    signable,
    typed_data,
)

MAX_BODY = 256 * 1024
DEFAULT_V2_NETWORKS = ["eip155:84532", "eip155:8453"]
DEFAULT_V1_NETWORKS = ["base-sepolia", "base"]
# Pretend facilitator fee-payer address reported in /supported "signers".
FACILITATOR_ADDRESS = "0x000000000000000000000000000000000000fAC1"


class Invalid(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(reason)
        self.reason, self.message = reason, message


class Facilitator:
    def __init__(self, allow_overpay=False, v2_networks=None, v1_networks=None):
        self.allow_overpay = allow_overpay
        self.v2_networks = v2_networks or DEFAULT_V2_NETWORKS
        self.v1_networks = v1_networks or DEFAULT_V1_NETWORKS
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.used: set[tuple] = set()
            self.settlements: list[dict] = []
            self.control = {"rejectVerify": False, "failSettle": False, "settleDelayMs": 0,
                            "verifyDelayMs": 0, "settleHttpStatus": 200}
            self.verify_count = 0

    def supported(self):
        kinds = [{"x402Version": 2, "scheme": "exact", "network": n} for n in self.v2_networks]
        kinds += [{"x402Version": 1, "scheme": "exact", "network": n} for n in self.v1_networks]
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": [FACILITATOR_ADDRESS]}}

    # -- verification -------------------------------------------------------------------
    def check(self, body: dict) -> dict:
        """Returns a dict describing the valid payment, or raises Invalid/BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("body must be an object")
        pp, req = body.get("paymentPayload"), body.get("paymentRequirements")
        if not isinstance(pp, dict) or not isinstance(req, dict):
            raise BadRequest("paymentPayload and paymentRequirements must be objects")
        version = pp.get("x402Version", body.get("x402Version"))
        if version not in (1, 2) or isinstance(version, bool):
            raise Invalid("invalid_x402_version", f"x402Version {version!r}")
        if version == 2:
            acc = pp.get("accepted")
            if not isinstance(acc, dict):
                raise Invalid("invalid_payload", "v2 paymentPayload.accepted missing")
            scheme, network = acc.get("scheme"), acc.get("network")
            for k in ("scheme", "network", "asset", "payTo", "amount"):
                if str(acc.get(k, "")).lower() != str(req.get(k, "")).lower():
                    raise Invalid("accepted_requirements_mismatch", f"accepted.{k} differs from requirements")
        else:
            scheme, network = pp.get("scheme"), pp.get("network")
        if scheme != "exact" or req.get("scheme") != "exact":
            raise Invalid("unsupported_scheme", f"scheme {scheme!r}")
        if network != req.get("network"):
            raise Invalid("network_mismatch", f"{network!r} != {req.get('network')!r}")
        try:
            chain_id = chain_id_for(network)
        except BadRequest as e:
            raise Invalid("invalid_network", str(e)) from None
        inner = pp.get("payload")
        if not isinstance(inner, dict):
            raise Invalid("invalid_payload", "payload missing")
        auth, sig = inner.get("authorization"), inner.get("signature")
        if not isinstance(auth, dict) or not isinstance(sig, str):
            raise Invalid("invalid_payload", "payload.authorization / payload.signature missing")
        extra = req.get("extra") or {}
        name, ver = extra.get("name"), extra.get("version")
        if not isinstance(name, str) or not isinstance(ver, str):
            raise Invalid("invalid_exact_evm_missing_eip712_domain", "requirements.extra name/version")
        try:
            required = int(requirement_amount(req, version))
            value = parse_uint(auth.get("value"), "authorization.value")
            valid_after = parse_uint(auth.get("validAfter"), "authorization.validAfter")
            valid_before = parse_uint(auth.get("validBefore"), "authorization.validBefore")
            nonce = parse_nonce(auth.get("nonce"))
            frm, to, asset, pay_to = auth.get("from"), auth.get("to"), req.get("asset"), req.get("payTo")
            for label, a in (("from", frm), ("to", to), ("asset", asset), ("payTo", pay_to)):
                if not isinstance(a, str) or len(a) != 42 or not a.startswith("0x"):
                    raise BadRequest(f"{label} is not an address")
            sig_bytes = bytes.fromhex(sig[2:] if sig.startswith("0x") else sig)
        except (BadRequest, ValueError) as e:
            raise Invalid("invalid_payload", str(e)) from None
        if to.lower() != pay_to.lower():
            raise Invalid("invalid_exact_evm_payload_recipient_mismatch", f"to {to} != payTo {pay_to}")
        if value < required or (value != required and not self.allow_overpay):
            raise Invalid("invalid_exact_evm_payload_authorization_value_mismatch",
                          f"value {value} vs amount {required}")
        now = int(time.time())
        if valid_before < now + 6:
            raise Invalid("invalid_exact_evm_payload_authorization_valid_before", "expired")
        if valid_after > now:
            raise Invalid("invalid_exact_evm_payload_authorization_valid_after", "not yet valid")
        if len(sig_bytes) != 65:
            raise Invalid("invalid_exact_evm_payload_signature", "signature must be 65 bytes")
        td = typed_data(name=name, version=ver, chain_id=chain_id, asset=asset, frm=frm, to=to,
                        value=value, valid_after=valid_after, valid_before=valid_before, nonce_bytes=nonce)
        try:
            recovered = Account.recover_message(signable(td), signature=sig_bytes)
        except Exception as e:  # noqa: BLE001
            raise Invalid("invalid_exact_evm_payload_signature", f"recover failed: {e}") from None
        if recovered.lower() != frm.lower():
            raise Invalid("invalid_exact_evm_payload_signature", f"signed by {recovered}, not {frm}")
        sdk_checked = sdk_accepts(inner, chain_id, asset, name, ver)
        if sdk_checked is False:
            raise Invalid("invalid_exact_evm_payload_signature", "the x402 SDK's EIP-3009 check refused it")
        key = (chain_id, asset.lower(), frm.lower(), nonce)
        with self.lock:
            if key in self.used:
                raise Invalid("invalid_exact_evm_nonce_already_used", "nonce already used")
        return {"payer": recovered, "key": key, "network": network, "amount": str(value),
                "payTo": pay_to, "asset": asset, "x402Version": version, "nonce": "0x" + nonce.hex(),
                "sdkVerified": bool(sdk_checked)}

    def verify(self, body):
        with self.lock:
            self.verify_count += 1
            ctl = dict(self.control)
        if ctl["verifyDelayMs"]:
            time.sleep(ctl["verifyDelayMs"] / 1000)
        payer = _payer_hint(body)
        try:
            info = self.check(body)
        except (Invalid, BadRequest) as e:
            return _invalid(e, payer)
        if ctl["rejectVerify"]:
            return {"isValid": False, "invalidReason": "rejected_by_facilitator",
                    "invalidMessage": "facilitator configured to reject", "payer": info["payer"]}
        return {"isValid": True, "payer": info["payer"]}

    def settle(self, body):
        with self.lock:
            ctl = dict(self.control)
        if ctl["settleDelayMs"]:
            time.sleep(ctl["settleDelayMs"] / 1000)
        network = _network_hint(body)
        try:
            info = self.check(body)
        except (Invalid, BadRequest) as e:
            r = _invalid(e, _payer_hint(body))
            return {"success": False, "errorReason": r["invalidReason"], "errorMessage": r.get("invalidMessage", ""),
                    "payer": r.get("payer"), "transaction": "", "network": network}
        if ctl["failSettle"]:
            return {"success": False, "errorReason": "settle_failed", "errorMessage": "facilitator configured to fail",
                    "payer": info["payer"], "transaction": "", "network": info["network"]}
        with self.lock:
            if info["key"] in self.used:  # lost a race with a concurrent settle of the same nonce
                return {"success": False, "errorReason": "invalid_exact_evm_nonce_already_used",
                        "payer": info["payer"], "transaction": "", "network": info["network"]}
            self.used.add(info["key"])
            tx = "0x" + hashlib.sha256(repr(info["key"]).encode() + os.urandom(8)).hexdigest()
            rec = {k: v for k, v in info.items() if k != "key"}
            rec.update(transaction=tx, time=time.time())
            self.settlements.append(rec)
        return {"success": True, "transaction": tx, "network": info["network"], "payer": info["payer"],
                "amount": info["amount"]}

    def listing(self):
        with self.lock:
            s = list(self.settlements)
            return {"count": len(s), "total": str(sum(int(x["amount"]) for x in s)),
                    "sdkVerified": sum(1 for x in s if x.get("sdkVerified")),
                    "verifyCount": self.verify_count, "settlements": s}


def _invalid(e, payer):
    if isinstance(e, Invalid):
        r = {"isValid": False, "invalidReason": e.reason, "invalidMessage": e.message}
    else:
        r = {"isValid": False, "invalidReason": "invalid_payload", "invalidMessage": str(e)}
    if payer:
        r["payer"] = payer
    return r


def _payer_hint(body):
    try:
        p = body["paymentPayload"]["payload"]["authorization"]["from"]
        return p if isinstance(p, str) else None
    except Exception:  # noqa: BLE001
        return None


def _network_hint(body):
    try:
        n = body["paymentRequirements"]["network"]
        return n if isinstance(n, str) and n else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def sdk_accepts(inner: dict, chain_id: int, asset: str, name: str, version: str) -> bool | None:
    """The official x402 SDK's own EIP-3009 signature check, on top of ours; None when
    the SDK is not installed. The chain is offline here: every address counts as an EOA."""
    try:
        from x402.mechanisms.evm.exact.eip3009_utils import classify_eip3009_signature
        from x402.mechanisms.evm.types import ExactEIP3009Payload
    except ImportError:
        return None

    class EOAOnly:
        def get_code(self, address):
            return b""

    try:
        p = ExactEIP3009Payload.from_dict(inner)
        sig = bytes.fromhex(p.signature[2:] if p.signature.startswith("0x") else p.signature)
        return bool(classify_eip3009_signature(EOAOnly(), p.authorization, sig, chain_id, asset, name, version).valid)
    except Exception:  # noqa: BLE001 - anything the SDK cannot read is refused
        return False


def make_handler(fac: Facilitator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            if os.environ.get("PAG0_X402_LOG"):
                sys.stderr.write("facilitator: " + fmt % args + "\n")

        def reply(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/supported":
                return self.reply(200, fac.supported())
            if self.path == "/settlements":
                return self.reply(200, fac.listing())
            if self.path == "/healthz":
                return self.reply(200, {"ok": True})
            self.reply(404, {"error": "not found"})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self.reply(400, {"error": "bad Content-Length"})
            if n > MAX_BODY:
                return self.reply(413, {"error": "body too large"})
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw or b"{}")
            except ValueError as e:
                return self.reply(400, {"error": f"bad JSON: {e}"})
            if self.path == "/verify":
                return self.reply(200, fac.verify(body))
            if self.path == "/settle":
                out = fac.settle(body)
                status = fac.control.get("settleHttpStatus", 200)
                return self.reply(status, out)
            if self.path == "/control":
                if not isinstance(body, dict):
                    return self.reply(400, {"error": "object expected"})
                with fac.lock:
                    for k, v in body.items():
                        if k in fac.control:
                            fac.control[k] = v
                    return self.reply(200, dict(fac.control))
            if self.path == "/reset":
                fac.reset()
                return self.reply(200, {"ok": True})
            self.reply(404, {"error": "not found"})

    return Handler


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=9403)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--allow-overpay", action="store_true", help="accept value >= amount (SDK requires ==)")
    ap.add_argument("--networks", help="comma-separated v2 CAIP-2 networks (default eip155:84532,eip155:8453)")
    ap.add_argument("--v1-networks", help="comma-separated v1 network names (default base-sepolia,base)")
    a = ap.parse_args(argv)
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("facilitator: refusing to listen on a non-loopback address")
    fac = Facilitator(a.allow_overpay,
                      a.networks.split(",") if a.networks else None,
                      a.v1_networks.split(",") if a.v1_networks else None)
    srv = ThreadingHTTPServer((a.host, a.port), make_handler(fac))
    srv.daemon_threads = True
    print(f"facilitator: listening on {a.host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
