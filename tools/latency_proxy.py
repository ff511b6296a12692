"""A TCP proxy that adds network round-trip latency without limiting bandwidth.

    tools/latency_proxy --listen 127.0.0.1:PORT --target HOST:PORT --rtt-ms 30

Benchmarks of S3 repositories run against a loopback SeaweedFS, where a round trip costs
microseconds; a real object store is tens of milliseconds away, and that latency is what the
readahead and parallel fetching must hide. Each chunk read from one side is stamped with
the time it is due (arrival + RTT/2) and written to the other side when due: a stream is
delayed, never throttled, and many connections run at once on one event loop. The first
bytes a client sends are also held for one extra RTT, as a TCP handshake would cost.
Prints `listening on HOST:PORT` (PORT 0 picks a free one) and runs until killed.
Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys

# Bytes held per direction before the source is paused (the bandwidth-delay product of
# 2 GB/s at 100 ms is 200 MB; 64 MiB covers loopback speeds at typical RTTs).
HIGH_WATER = 64 << 20
LOW_WATER = 16 << 20
_EOF = b""
_CLOSE = None


class Direction:
    """One direction of one connection: chunks wait in order until they are due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.not_before = 0.0
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.src_paused = False
        self.dst_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False

    def push(self, data: bytes | None) -> None:
        due = max(self.loop.time() + self.delay, self.not_before)
        self.queue.append((due, data))
        if data:
            self.queued += len(data)
            if self.queued > HIGH_WATER and self.src is not None and not self.src_paused:
                self.src.pause_reading()
                self.src_paused = True
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and not self.dst_paused:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        self.timer = None
        dst = self.dst
        assert dst is not None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and not self.dst_paused:
            _, data = self.queue.popleft()
            if data is _CLOSE:
                self.finished = True
                dst.close()
                return
            if data == _EOF:
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
                continue
            if not dst.is_closing():
                dst.write(data)
            self.queued -= len(data)
            if self.src_paused and self.queued < LOW_WATER and self.src is not None:
                self.src.resume_reading()
                self.src_paused = False
        self.schedule()

    def pause(self) -> None:
        self.dst_paused = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def resume(self) -> None:
        self.dst_paused = False
        self.schedule()


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes out, what it gets comes in."""

    def __init__(self, outgoing: Direction, incoming: Direction) -> None:
        self.outgoing = outgoing  # data read here, to be written to the other side
        self.incoming = incoming  # data from the other side, written here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.outgoing.src = transport
        self.incoming.dst = transport
        self.incoming.schedule()

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(_EOF)
        return True  # keep the socket open for the other direction (half close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.outgoing.push(_CLOSE)

    def pause_writing(self) -> None:
        self.incoming.pause()

    def resume_writing(self) -> None:
        self.incoming.resume()


class Proxy:
    def __init__(self, target: tuple[str, int], rtt: float, handshake_rtts: float) -> None:
        self.target = target
        self.rtt = rtt
        self.handshake_rtts = handshake_rtts
        self.connecting: set[asyncio.Task[None]] = set()

    def accept(self) -> Side:
        loop = asyncio.get_running_loop()
        up = Direction(loop, self.rtt / 2)
        down = Direction(loop, self.rtt / 2)
        up.not_before = loop.time() + self.handshake_rtts * self.rtt + self.rtt / 2
        client = Side(up, down)
        task = loop.create_task(self.connect(up, down, client))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)
        return client

    async def connect(self, up: Direction, down: Direction, client: Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Side(down, up), *self.target)
        except OSError:
            if client.incoming.dst is not None:
                client.incoming.dst.abort()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(listen: tuple[str, int], proxy: Proxy) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proxy.accept, *listen, reuse_address=True, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latency_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (0: any)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, required=True, help="added round trip, ms")
    parser.add_argument(
        "--handshake-rtts",
        type=float,
        default=1.0,
        help="extra RTTs before a new connection's first bytes go out (default 1: TCP's)",
    )
    args = parser.parse_args(argv)
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must be >= 0")
    proxy = Proxy(args.target, args.rtt_ms / 1000, args.handshake_rtts)
    asyncio.run(serve(args.listen, proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
