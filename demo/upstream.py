#!/usr/bin/env python3
"""Local stand-ins for the paid APIs of the demo (OpenAI, Anthropic, Tavily, Exa, DeepL).

One server answers for every host, chosen by the Host header, with a small JSON body
shaped like the real API's. It counts the calls it serves per host and path and shows
them at GET /_demo/calls (on its own port, not through Envoy). It is also the demo's
alert webhook: pag0 POSTs alerts to /_demo/alerts, and GET /_demo/alerts lists them.
Usage: upstream.py [--port 18080]
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CALLS = {}
ALERTS = []
LOCK = threading.Lock()


def answer(host, path, body):
    if host.startswith("api.openai.com"):
        return {"id": "chatcmpl-demo", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "demo answer"}}]}
    if host.startswith("api.anthropic.com"):
        return {"id": "msg_demo", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": "demo answer"}]}
    if host.startswith("api.tavily.com") or host.startswith("api.exa.ai"):
        return {"query": body.get("query", "") if isinstance(body, dict) else "",
                "results": [{"title": "pag0 docs", "url": "https://example.com/docs"}]}
    if host.startswith("api.deepl.com"):
        return {"translations": [{"detected_source_language": "EN", "text": "Demo-Antwort"}]}
    return {"host": host, "path": path}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _serve(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path == "/_demo/calls":
            with LOCK:
                payload = json.dumps(CALLS, indent=2).encode()
        elif self.path == "/_demo/alerts":
            # pag0's alert webhook posts here; GET lists what arrived.
            with LOCK:
                if self.command == "POST":
                    try:
                        ALERTS.append(json.loads(raw))
                    except ValueError:
                        pass
                    print(f"alert: {raw.decode(errors='replace')}", flush=True)
                payload = json.dumps(ALERTS, indent=2).encode()
        else:
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            host = (self.headers.get("host") or "").split(":")[0].lower()
            key = f"{host}{self.path.split('?')[0]}"
            with LOCK:
                CALLS[key] = CALLS.get(key, 0) + 1
            payload = json.dumps(answer(host, self.path, body)).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _serve
    do_POST = _serve


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), Handler)
    print(f"demo APIs on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
