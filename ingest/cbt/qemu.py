"""Reading a persistent qemu dirty bitmap with qemu's own tools.

There is no stable command that prints a bitmap, and parsing the qcow2
bitmap directory ourselves would mean re-implementing (and keeping up with)
qemu's on-disk format.  Instead the bitmap is exported over NBD, where it is
a ``qemu:dirty-bitmap:NAME`` metadata context, and ``qemu-img map`` is asked
to read that context instead of the allocation status (``x-dirty-bitmap``).
qemu's test suite uses exactly this and documents its one oddity: block
status is reused, so a *dirty* range is reported as ``"data": false`` and a
clean one as ``"data": true``.

For a qcow2 file we start a private, read-only ``qemu-nbd`` on a unix socket
in a fresh temporary directory, as our own child process (not ``--fork``:
a forked daemon is re-parented and, where init does not reap, lingers as a
zombie we cannot wait for).  It is stopped and the directory removed however
the read ends.  A source that is already an NBD URI (a running VM's export)
is read directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from ingest.cbt.blocks import ChangedBlocks
from ingest.formats.source import Extent
from repofs.errors import SourceError

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
#: How long qemu-nbd may take to open the image and start listening.
STARTUP_TIMEOUT = 30.0
#: Limit for the quick metadata commands (info, list).
COMMAND_TIMEOUT = 60.0
DEFAULT_NBD_PORT = 10809


def is_nbd_uri(source: str) -> bool:
    """Whether ``source`` names an NBD export rather than a file."""
    return re.match(r"nbds?(\+(tcp|unix|vsock))?://", source) is not None


def load_qemu_bitmap(name: str, capacity: int, source: str) -> ChangedBlocks:
    """Return the dirty extents of bitmap ``name`` of ``source``.

    ``source`` is a qcow2 image file or an ``nbd://`` / ``nbd+unix://`` URI
    whose server exports the bitmap.  The extents come at the bitmap's
    granularity (the last one clipped to the capacity).
    """
    if is_nbd_uri(source):
        return _load_from_nbd_uri(name, capacity, source)
    return _load_from_qcow2(name, capacity, source)


# -- running qemu's tools ----------------------------------------------------


def _env() -> dict[str, str]:
    """The caller's environment with qemu's messages in English, for our errors."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def _qemu_message(stderr: str) -> str:
    """Fold qemu's error output into one line for a :class:`SourceError`."""
    lines = []
    for line in stderr.splitlines():
        line = line.strip()
        for prefix in ("qemu-img: ", "qemu-nbd: "):
            line = line.removeprefix(prefix)
        # qemu repeats the whole json: pseudo-filename we built; drop it.
        line = re.sub(r"Could not open 'json:[^']*': ", "", line)
        if line:
            lines.append(line)
    text = "; ".join(lines) or "no message"
    return text if len(text) <= 400 else text[:397] + "..."


def _not_installed(where: str, tool: str) -> NoReturn:
    raise SourceError(f"{where}: {tool} is not installed (Debian package qemu-utils)")


def _spawn(
    cmd: list[str], where: str, stdout: int, stderr: IO[bytes], text: bool = False
) -> subprocess.Popen[Any]:
    """Start a long-running qemu tool with no input, or fail naming ``where`` if it is missing."""
    try:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=text, env=_env()
        )
    except FileNotFoundError:
        _not_installed(where, cmd[0])


def _run(cmd: list[str], where: str, what: str) -> str:
    """Run a quick qemu command and return its output, or fail naming ``where``."""
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        _not_installed(where, cmd[0])
    except subprocess.TimeoutExpired:
        raise SourceError(f"{where}: {what} did not finish in {COMMAND_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise SourceError(f"{where}: {what} failed: {_qemu_message(proc.stderr)}")
    return proc.stdout


def _read_stderr(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


def _parse_map_line(line: str) -> dict[str, Any] | None:
    """Parse one line of ``qemu-img map --output=json``.

    qemu prints one entry per line (``[{...},`` / ``{...},`` / ``{...}]``),
    which lets a map of a million entries be read as a stream instead of as
    one huge document.  Anything else raises :class:`ValueError`, so a change
    of qemu's layout fails loudly instead of being misread.
    """
    text = line.strip()
    text = text.removeprefix("[").removesuffix("]").removesuffix(",").strip()
    if not text:
        return None
    entry = json.loads(text)
    if not isinstance(entry, dict):
        raise ValueError("entry is not an object")
    return entry


def _dirty_extents(map_spec: dict[str, Any], capacity: int, where: str) -> list[Extent]:
    """Run ``qemu-img map`` on an NBD bitmap context and collect the dirty ranges.

    The map must describe every byte from 0 to ``capacity`` without gaps;
    a short or garbled map is an error, never read as "nothing changed".
    """
    cmd = [QEMU_IMG, "map", "--output=json", "json:" + json.dumps(map_spec)]
    dirty: list[Extent] = []
    with tempfile.TemporaryFile() as err:
        proc = _spawn(cmd, where, subprocess.PIPE, err, text=True)
        expected = 0
        finished = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    entry = _parse_map_line(line)
                    if entry is None:
                        continue
                    start, length, data = entry["start"], entry["length"], entry["data"]
                except (ValueError, KeyError) as exc:
                    raise SourceError(
                        f"{where}: cannot understand qemu-img map output {line.strip()[:60]!r}: "
                        f"{exc}"
                    ) from None
                if start != expected or not isinstance(length, int) or length <= 0:
                    raise SourceError(
                        f"{where}: qemu-img map output is not contiguous at offset {expected}"
                    )
                expected = start + length
                if data is False:  # the x-dirty-bitmap inversion: dirty reads as a hole
                    if dirty and dirty[-1][0] + dirty[-1][1] == start:
                        prev = dirty.pop()
                        dirty.append((prev[0], prev[1] + length))
                    else:
                        dirty.append((start, length))
                elif data is not True:
                    raise SourceError(f"{where}: qemu-img map entry has data={data!r}")
            finished = True
        finally:
            if not finished and proc.poll() is None:
                # Stopped early by an error: do not leave qemu-img blocked on a pipe.
                proc.kill()
            rc = proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if rc != 0:
            raise SourceError(
                f"{where}: reading the bitmap with qemu-img map failed: "
                f"{_qemu_message(_read_stderr(err))}"
            )
    if expected != capacity:
        raise SourceError(
            f"{where}: the bitmap covers {expected} bytes, but the disk has {capacity}"
        )
    return dirty


# -- qcow2 files ---------------------------------------------------------------


def _qcow2_bitmap(name: str, capacity: int, path: str, image: str) -> dict[str, Any]:
    """Check ``image`` is a qcow2 of the right size holding a usable bitmap ``name``."""
    out = _run([QEMU_IMG, "info", "--output=json", image], path, "qemu-img info")
    try:
        info = json.loads(out)
    except ValueError:
        raise SourceError(f"{path}: qemu-img info printed something that is not JSON") from None
    fmt = info.get("format")
    if fmt != "qcow2":
        raise SourceError(
            f"{path}: qemu-bitmap:{name} needs a qcow2 image, but this is {fmt or 'unknown'}"
        )
    size = info.get("virtual-size")
    if size != capacity:
        raise SourceError(f"{path}: the image is {size} bytes, but the disk has {capacity}")
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    for bitmap in bitmaps:
        if bitmap.get("name") == name:
            break
    else:
        names = ", ".join(sorted(repr(b.get("name")) for b in bitmaps))
        have = f"it has {names}" if names else "it has no persistent bitmaps"
        raise SourceError(f"{path}: no persistent dirty bitmap {name!r}; {have}")
    if "in-use" in bitmap.get("flags", []):
        # Set while a writer has the image open and cleared on a clean close:
        # a VM still running, or one that crashed, left an untrustworthy bitmap.
        raise SourceError(
            f"{path}: bitmap {name!r} is in use or inconsistent (the image is open in a "
            "running VM or was not closed cleanly); read the VM's NBD export or take a "
            "full backup"
        )
    granularity = bitmap.get("granularity")
    if not isinstance(granularity, int) or granularity <= 0:
        raise SourceError(f"{path}: bitmap {name!r} has no valid granularity")
    return bitmap


@contextlib.contextmanager
def _private_nbd_export(name: str, path: str, image: str) -> Iterator[str]:
    """Serve ``image`` read-only with bitmap ``name`` on a private unix socket.

    Yields the socket path.  qemu-nbd runs as our child so it can always be
    stopped and reaped; it writes its pid file only after the export (and
    the bitmap) are set up, which is the readiness signal.
    """
    base = tempfile.gettempdir()
    if len(base) > 60:  # unix socket paths are limited to 107 bytes
        base = "/tmp"
    with tempfile.TemporaryDirectory(prefix="repofs-cbt-", dir=base) as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        pidfile = os.path.join(tmp, "qemu-nbd.pid")
        cmd = [
            QEMU_NBD,
            "--read-only",
            "--format=qcow2",
            f"--bitmap={name}",
            f"--socket={sock}",
            f"--pid-file={pidfile}",
            "--shared=1",
            image,
        ]
        with open(os.path.join(tmp, "qemu-nbd.err"), "w+b") as err:
            proc = _spawn(cmd, path, subprocess.DEVNULL, err)
            try:
                deadline = time.monotonic() + STARTUP_TIMEOUT
                delay = 0.002
                while not os.path.exists(pidfile):
                    if proc.poll() is not None:
                        raise SourceError(
                            f"{path}: cannot export bitmap {name!r} with qemu-nbd: "
                            f"{_qemu_message(_read_stderr(err))}"
                        )
                    if time.monotonic() > deadline:
                        raise SourceError(
                            f"{path}: qemu-nbd did not start within {STARTUP_TIMEOUT:.0f} s"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
                yield sock
            finally:
                # Without --persistent qemu-nbd leaves by itself after its one
                # client; stop it if the client never came or is still there.
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def _load_from_qcow2(name: str, capacity: int, path: str) -> ChangedBlocks:
    # An absolute path keeps qemu from reading "a:b.qcow2" as protocol "a".
    image = os.path.abspath(path)
    bitmap = _qcow2_bitmap(name, capacity, path, image)
    with _private_nbd_export(name, path, image) as sock:
        spec = {
            "driver": "nbd",
            "server": {"type": "unix", "path": sock},
            "x-dirty-bitmap": f"qemu:dirty-bitmap:{name}",
        }
        extents = _dirty_extents(spec, capacity, path)
    return ChangedBlocks(
        capacity, extents, granularity=bitmap["granularity"], origin=f"qemu-bitmap:{name}"
    )


# -- NBD exports ---------------------------------------------------------------


def _nbd_server(uri: str) -> tuple[dict[str, str], str]:
    """Split an NBD URI into a qemu ``server`` address and an export name."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"{uri}: not a valid NBD URI: {exc}") from None
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise SourceError(f"{uri}: NBD URI has no host")
        server = {"type": "inet", "host": parts.hostname, "port": str(port or DEFAULT_NBD_PORT)}
    elif parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets or parts.netloc:
            raise SourceError(f"{uri}: an nbd+unix URI needs ?socket=PATH and no host")
        server = {"type": "unix", "path": sockets[0]}
    else:
        raise SourceError(
            f"{uri}: only nbd://, nbd+tcp:// and nbd+unix:// URIs are supported (no TLS)"
        )
    return server, export


def _list_contexts(server: dict[str, str], export: str, uri: str) -> list[str] | None:
    """Metadata contexts the server offers for ``export``, or None if unknown.

    Only used to explain a failure, so any trouble here yields None and the
    original error stands.
    """
    cmd = [QEMU_NBD, "--list"]
    if server["type"] == "unix":
        cmd += ["--socket", server["path"]]
    else:
        cmd += ["--bind", server["host"], "--port", server["port"]]
    try:
        out = _run(cmd, uri, "qemu-nbd --list")
    except SourceError:
        return None
    contexts: dict[str, list[str]] = {}
    current: str | None = None
    in_contexts = False
    for line in out.splitlines():
        m = re.match(r"^ export: '(.*)'$", line)
        if m:
            current = m.group(1)
            contexts[current] = []
            in_contexts = False
        elif current is not None and line.startswith("  available meta contexts:"):
            in_contexts = True
        elif current is not None and in_contexts and line.startswith("   "):
            contexts[current].append(line.strip())
        else:
            in_contexts = False
    return contexts.get(export)


def _load_from_nbd_uri(name: str, capacity: int, uri: str) -> ChangedBlocks:
    server, export = _nbd_server(uri)
    context = f"qemu:dirty-bitmap:{name}"
    spec = {"driver": "nbd", "server": server, "export": export, "x-dirty-bitmap": context}
    try:
        extents = _dirty_extents(spec, capacity, uri)
    except SourceError:
        contexts = _list_contexts(server, export, uri)
        if contexts is not None and context not in contexts:
            prefix = "qemu:dirty-bitmap:"
            names = ", ".join(repr(c[len(prefix) :]) for c in contexts if c.startswith(prefix))
            have = f"it exports {names}" if names else "it exports no bitmaps"
            raise SourceError(
                f"{uri}: export does not offer dirty bitmap {name!r}; {have}"
            ) from None
        raise
    return ChangedBlocks(capacity, extents, granularity=1, origin=f"qemu-bitmap:{name}")
