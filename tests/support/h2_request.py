"""Sends one HTTP/2 (h2c, prior knowledge) request and prints its answer as JSON.

Used by the tests to end a request with trailers, which HTTP/1.1 clients do not do.
Usage: h2_request.py PORT METHOD PATH AUTHORITY BODY [--trailers] [--header k:v]...
Output: {"status": 200, "headers": {...}, "body": "..."}; exit 2 on a reset stream.
"""
import json
import socket
import sys

import h2.config
import h2.connection
import h2.events


def main():
    port, method, path, authority, body = sys.argv[1:6]
    rest = sys.argv[6:]
    trailers = "--trailers" in rest
    headers = [(":method", method), (":path", path), (":authority", authority), (":scheme", "http")]
    for i, arg in enumerate(rest):
        if arg == "--header":
            k, v = rest[i + 1].split(":", 1)
            headers.append((k.strip().lower(), v.strip()))
    sock = socket.create_connection(("127.0.0.1", int(port)), timeout=20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    data = body.encode()
    conn.send_headers(sid, headers, end_stream=False)
    conn.send_data(sid, data, end_stream=not trailers)
    if trailers:
        conn.send_headers(sid, [("x-checksum", "done")], end_stream=True)
    sock.sendall(conn.data_to_send())
    out = {"status": 0, "headers": {}, "body": ""}
    chunks = []
    while True:
        received = sock.recv(65535)
        if not received:
            break
        for event in conn.receive_data(received):
            if isinstance(event, h2.events.ResponseReceived):
                for k, v in event.headers:
                    k, v = k.decode(), v.decode(errors="replace")
                    if k == ":status":
                        out["status"] = int(v)
                    else:
                        out["headers"][k] = v
            elif isinstance(event, h2.events.DataReceived):
                chunks.append(event.data)
                conn.acknowledge_received_data(len(event.data), event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                print(json.dumps({"status": 0, "reset": True}))
                sys.exit(2)
            elif isinstance(event, h2.events.StreamEnded):
                out["body"] = b"".join(chunks).decode(errors="replace")
                print(json.dumps(out))
                return
        sock.sendall(conn.data_to_send())


if __name__ == "__main__":
    main()
