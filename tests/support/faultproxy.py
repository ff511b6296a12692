"""An HTTP proxy in front of the test S3 server that fails a chosen share of requests.

Real object stores answer 503 SlowDown under load, 500 InternalError now and then,
drop connections, and cut responses short; repofs must retry the first three and never take a
short body for a whole one. The proxy forwards each request unchanged (the Host header
included, so AWS signatures still match) and, for a request that ``match`` selects, draws a
fault with probability ``rate``:

* ``503``: answers ``503 SlowDown`` without forwarding;
* ``500``: answers ``500 InternalError`` without forwarding;
* ``reset``: resets the connection before forwarding (the request never arrived);
* ``reset-after``: forwards, then resets instead of answering (it did arrive: the client
  cannot know, which is what makes a retried conditional PUT ambiguous);
* ``truncate``: forwards, then sends the full Content-Length but only half the body.

``counts`` says how many of each it injected, and how many requests it forwarded, by method.
Threads only, standard library only; it runs inside the test process.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("503", "500", "reset", "reset-after", "truncate")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te"}
_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}

#: ``match(method, path)``: whether a request may get a fault.
Matcher = Callable[[str, str], bool]


class FaultProxy:
    """A proxy on a free loopback port; ``endpoint`` is what AWS_ENDPOINT_URL should say."""

    def __init__(
        self,
        target: str,
        *,
        rate: float = 0.2,
        faults: tuple[str, ...] = ("503", "500", "reset"),
        seed: int = 1,
        match: Matcher | None = None,
        limit: int | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        host, _, port = target.removeprefix("http://").rpartition(":")
        self.target = (host, int(port))
        self.rate = rate
        self.faults = faults
        self.match: Matcher = match or (lambda _method, _path: True)
        self.limit = limit  #: at most this many faults in all (None: no bound)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.uploaded = 0  #: bytes of PUT bodies forwarded
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one request --------------------------------------------------------------

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            if not self.faults or not self.match(method, path):
                return None
            if self.limit is not None and sum(self.counts[f] for f in FAULTS) >= self.limit:
                return None
            if self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        fault = self._draw(req.command, req.path)
        if fault in _BODIES:
            status, code, message = _BODIES[fault]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>"
            ).encode()
            req.send_response(status)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(payload)
            return
        if fault == "reset":
            _reset(req)
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        try:
            conn.request(req.command, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, out_headers = resp.status, resp.reason, resp.getheaders()
        except OSError:
            _reset(req)
            return
        finally:
            conn.close()
        with self._lock:
            self.counts[req.command] += 1
            if req.command == "PUT":
                self.uploaded += len(body)
        if fault == "reset-after":
            _reset(req)
            return
        req.send_response(status, reason)
        for key, value in out_headers:
            if key.lower() not in _HOP and key.lower() != "content-length":
                req.send_header(key, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            _reset(req)
            return
        req.wfile.write(data)


def _reset(req: BaseHTTPRequestHandler) -> None:
    """Close with RST (SO_LINGER 0): the client sees "connection reset by peer"."""
    sock = req.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
    req.close_connection = True
