"""A loopback HTTP proxy that injects S3-style faults in front of a real endpoint.

Each request is, by a seeded draw, forwarded unchanged, answered with 503
SlowDown (what S3 says when throttling), or cut off by closing the connection
without an answer. ``fail_all_after`` makes every request after that many fail,
for faults that do not go away.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, target: str, fault_rate: float, seed: int = 0, fail_all_after: int | None = None) -> None:
        self.target = urlsplit(target)
        self.fault_rate = fault_rate
        self.fail_all_after = fail_all_after
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "slow_down": 0, "dropped": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "dropped":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "slow_down":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                try:
                    # The body is forwarded whole, with its length: no chunked re-encoding.
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("connection", "transfer-encoding", "content-length")}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        # A HEAD answer keeps the object's Content-Length: it is how clients learn its size.
                        if key.lower() in ("transfer-encoding", "connection") or (
                                key.lower() == "content-length" and self.command != "HEAD"):
                            continue
                        self.send_header(key, value)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    pieces = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(pieces)
                        pieces.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> str:
        with self.lock:
            total = sum(self.counts.values())
            if self.fail_all_after is not None and total >= self.fail_all_after:
                kind = "slow_down"
            else:
                draw = self.random.random()
                kind = "forwarded" if draw >= self.fault_rate else ("slow_down" if draw < self.fault_rate / 2
                                                                    else "dropped")
            self.counts[kind] += 1
            return kind

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
