#!/usr/bin/env python3
"""A tiny approval service for pag0's `requireApproval`.

pag0 POSTs {"tenant", "session", "agent", "endpoint", "tool", "price"} (price: a decimal
string in the token's smallest unit). This service approves prices up to --approve-up-to
(default 300000 = $0.30) and denies the rest, with a reason.
Usage: approval.py [--port 18090] [--approve-up-to 300000]
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18090)
    parser.add_argument("--approve-up-to", type=int, default=300_000)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            try:
                ask = json.loads(self.rfile.read(length) or b"{}")
                price = int(ask.get("price", "0"))
            except (ValueError, TypeError):
                self.send_response(400)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            approved = price <= args.approve_up_to
            answer = {"approved": approved}
            if not approved:
                answer["reason"] = f"price {price} is above {args.approve_up_to}"
            print(f"approval: {ask.get('agent')} {ask.get('endpoint')} {price} -> {approved}", flush=True)
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"approval service on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
