"""An HTTP proxy in front of a real S3 server that answers some requests with S3's throttling
error (503 SlowDown) instead of forwarding them: how a busy S3 bucket behaves, reproduced on
127.0.0.1 with the real server behind it (the client is never mocked)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class ThrottlingProxy:
    """Forwards to ``upstream`` (an http://host:port URL); ``throttle(method, path, query)``
    says whether to answer 503 SlowDown instead. ``throttled`` counts those answers.
    ``body_fault(method, path, query)`` may spoil the body of the upstream's answer: "drop"
    sends its headers and half of it, then closes the connection (a connection dropped
    mid-body); a number sends it at that many bytes per second (a trickle). ``faulted``
    counts those answers."""

    def __init__(self, upstream: str, throttle=lambda method, path, query: False, body_fault=None):
        target = urlparse(upstream)
        proxy = self
        self.throttled = 0
        self.faulted = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                url = urlparse(self.path)
                if throttle(self.command, url.path, url.query):
                    with proxy.lock:
                        proxy.throttled += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    # The Host header is kept: the client signed the request for it.
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                # A HEAD answer has no body but tells the object's length.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                fault = body_fault(self.command, url.path, url.query) if body_fault else None
                if fault is None:
                    self.wfile.write(data)
                    return
                with proxy.lock:
                    proxy.faulted += 1
                if fault == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                try:  # a trickle, until the client gives up
                    for at in range(0, len(data), 1024):
                        self.wfile.write(data[at : at + 1024])
                        self.wfile.flush()
                        time.sleep(1024 / fault)
                except OSError:
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def every_other_get(fault, only=lambda path, query: True):
    """A body fault rule: the 1st, 3rd, 5th... GET of each path (that ``only`` accepts) gets
    ``fault``, so every read's first try is spoiled and its retry is not."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def rule(method: str, path: str, query: str):
        if method != "GET" or not only(path, query):
            return None
        with lock:
            counts[path] = counts.get(path, 0) + 1
            return fault if counts[path] % 2 == 1 else None

    return rule


def every(n: int, methods=("GET", "PUT"), only=lambda path, query: True):
    """A throttle rule: every n-th request of ``methods`` (that ``only`` accepts) is refused."""
    count = [0]
    lock = threading.Lock()

    def rule(method: str, path: str, query: str) -> bool:
        if method not in methods or not only(path, query):
            return False
        with lock:
            count[0] += 1
            return count[0] % n == 0

    return rule
