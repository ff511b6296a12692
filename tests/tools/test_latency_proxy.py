"""tools/latency_proxy adds the round trip it is asked for and takes no bandwidth away."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.helpers import REPO_ROOT
from tests.support.s3server import S3Server

RTT_MS = 30


@contextlib.contextmanager
def latency_proxy(target: tuple[str, int], rtt_ms: float) -> Iterator[int]:
    proc = subprocess.Popen(
        [
            str(REPO_ROOT / "tools" / "latency_proxy"),
            "--listen", "127.0.0.1:0",
            "--target", f"{target[0]}:{target[1]}",
            "--rtt-ms", str(rtt_ms),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A threaded TCP echo server on a free loopback port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                conns.append(conn)
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield listener.getsockname()[:2]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    acceptor.join(5)
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


def _round_trip(sock: socket.socket) -> float:
    began = time.monotonic()
    sock.sendall(b"x")
    assert sock.recv(16) == b"x"
    return time.monotonic() - began


class TestLatencyProxy:
    def test_each_round_trip_takes_the_rtt(self, echo_server: tuple[str, int]) -> None:
        """A one-byte echo through the proxy takes at least the RTT, and not much more."""
        with (
            latency_proxy(echo_server, RTT_MS) as port,
            socket.create_connection(("127.0.0.1", port)) as sock,
        ):
            first = _round_trip(sock)  # includes the emulated handshake
            times = [_round_trip(sock) for _ in range(5)]
        assert first >= 2 * RTT_MS / 1000
        assert min(times) >= RTT_MS / 1000
        assert sorted(times)[2] < (RTT_MS + 25) / 1000

    def test_connections_are_delayed_in_parallel(self, echo_server: tuple[str, int]) -> None:
        """32 connections doing 5 round trips each finish in about 6 RTTs, not 32 times that."""

        def client(port: int) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for _ in range(5):
                    _round_trip(sock)

        with latency_proxy(echo_server, RTT_MS) as port, ThreadPoolExecutor(32) as pool:
            began = time.monotonic()
            list(pool.map(client, [port] * 32))
            elapsed = time.monotonic() - began
        assert elapsed < 20 * RTT_MS / 1000, elapsed

    def test_bulk_transfer_is_not_throttled(self, echo_server: tuple[str, int]) -> None:
        """50 MB echoed through the proxy (100 MB through it) goes at more than 100 MB/s."""
        total = 50 << 20
        chunk = b"z" * (1 << 20)
        with (
            latency_proxy(echo_server, RTT_MS) as port,
            socket.create_connection(("127.0.0.1", port)) as sock,
        ):
            _round_trip(sock)
            received = 0

            def drain() -> None:
                nonlocal received
                while received < total and (data := sock.recv(1 << 20)):
                    received += len(data)

            reader = threading.Thread(target=drain)
            began = time.monotonic()
            reader.start()
            for _ in range(total // len(chunk)):
                sock.sendall(chunk)
            reader.join(30)
            elapsed = time.monotonic() - began
        assert received == total
        assert total / elapsed > 100e6, f"{total / elapsed / 1e6:.0f} MB/s"

    def test_boto3_through_the_proxy(self, s3_server: S3Server, s3_bucket: str) -> None:
        """boto3 reaches the S3 server through the proxy, each request paying the RTT."""
        with latency_proxy(("127.0.0.1", s3_server.ports["s3"]), RTT_MS) as port:
            s3: Any = s3_server.client(endpoint=f"http://127.0.0.1:{port}")
            s3.put_object(Bucket=s3_bucket, Key="k", Body=b"through the proxy")
            began = time.monotonic()
            body = s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read()
            elapsed = time.monotonic() - began
        assert body == b"through the proxy"
        assert elapsed >= RTT_MS / 1000
