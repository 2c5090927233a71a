"""Shared helpers for the pag0 x402 demo services (signer, facilitator).

Only depends on the standard library and eth-account.
"""
from __future__ import annotations

import base64
import json

from eth_account.messages import encode_typed_data

# v1 network names (as used by x402 v1 / the Python SDK's V1_NETWORK_CHAIN_IDS).
V1_NETWORK_CHAIN_IDS = {
    "base": 8453,
    "base-sepolia": 84532,
    "ethereum": 1,
    "polygon": 137,
    "polygon-amoy": 80002,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
    "abstract": 2741,
    "abstract-testnet": 11124,
    "iotex": 4689,
    "sei": 1329,
    "sei-testnet": 1328,
    "peaq": 3338,
    "story": 1513,
    "educhain": 656476,
    "skale-base-sepolia": 1444673419,
    "megaeth": 4326,
    "monad": 143,
    "monad-testnet": 10143,
    "stable": 988,
    "stable-testnet": 2201,
    "celo": 42220,
    "flare": 14,
}

TRANSFER_WITH_AUTHORIZATION_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


class BadRequest(ValueError):
    """A client error (maps to HTTP 400)."""


def chain_id_for(network: str) -> int:
    """`eip155:<id>` (v2, CAIP-2) or a v1 name such as `base-sepolia`."""
    if not isinstance(network, str) or not network:
        raise BadRequest("network missing")
    if network.startswith("eip155:"):
        try:
            cid = int(network.split(":", 1)[1])
        except ValueError:
            raise BadRequest(f"bad CAIP-2 network {network!r}") from None
        if cid <= 0:
            raise BadRequest(f"bad chain id in {network!r}")
        return cid
    if network in V1_NETWORK_CHAIN_IDS:
        return V1_NETWORK_CHAIN_IDS[network]
    raise BadRequest(f"unsupported network {network!r}")


def parse_uint(value, field: str, bits: int = 256) -> int:
    """Decimal string (or int) -> int in [0, 2**bits)."""
    if isinstance(value, bool):
        raise BadRequest(f"{field} must be a decimal string")
    if isinstance(value, int):
        v = value
    elif isinstance(value, str) and value.isdigit() and value.isascii():
        v = int(value)
    else:
        raise BadRequest(f"{field} must be a decimal string of digits")
    if v < 0 or v >= 1 << bits:
        raise BadRequest(f"{field} out of range")
    return v


def parse_nonce(nonce) -> bytes:
    if not isinstance(nonce, str) or not nonce.startswith("0x") or len(nonce) != 66:
        raise BadRequest("nonce must be 0x + 64 hex chars")
    try:
        return bytes.fromhex(nonce[2:])
    except ValueError:
        raise BadRequest("nonce is not hex") from None


def typed_data(*, name, version, chain_id, asset, frm, to, value, valid_after, valid_before, nonce_bytes):
    return {
        "types": TRANSFER_WITH_AUTHORIZATION_TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": name,
            "version": version,
            "chainId": chain_id,
            "verifyingContract": asset,
        },
        "message": {
            "from": frm,
            "to": to,
            "value": value,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce_bytes,
        },
    }


def signable(td):
    return encode_typed_data(full_message=td)


def b64json(obj) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def unb64json(value: str):
    try:
        raw = base64.b64decode(value.encode(), validate=True)
        return json.loads(raw.decode())
    except Exception as e:  # noqa: BLE001
        raise BadRequest(f"bad base64 JSON: {e}") from None


def requirement_amount(req: dict, version: int) -> str:
    """v2: `amount`; v1: `maxAmountRequired`."""
    key = "amount" if version == 2 else "maxAmountRequired"
    val = req.get(key)
    parse_uint(val, key)
    return str(val)
