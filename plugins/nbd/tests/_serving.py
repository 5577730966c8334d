"""Helpers for the server tests: serving an image in-process or as ``imago serve``, and running clients.

Every wait has a timeout, every server is stopped by the fixture that started it, and sockets
live in short directories under /tmp (AF_UNIX paths are limited to 107 bytes).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import imago
from imago_nbd.server import NbdServer, serve

TIMEOUT = 30.0
#: The system Python, where python3-libnbd is installed (not the venv).
SYSTEM_PYTHON = "/usr/bin/python3"
IMAGO = str(Path(sys.executable).with_name("imago"))


def tool(name: str) -> str:
    """The path of an interoperability tool; a missing one fails the test (never skips it)."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: the interoperability tests need it"
    return path


def run(
    args: Sequence[str], *, check: bool = True, timeout: float = TIMEOUT, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, capturing its output; with *check*, fail on a non-zero status."""
    result = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, f"{args} failed ({result.returncode}): {result.stdout}{result.stderr}"
    return result


def libnbd(script: str, *args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a python3-libnbd *script* under the system Python (``sys.argv[1:]`` = *args*)."""
    return run([SYSTEM_PYTHON, "-c", script, *args], check=check, timeout=timeout)


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (for Unix sockets), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="nbd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def uri(sock: Path | str, name: str = "") -> str:
    """The ``nbd+unix`` URI of export *name* on *sock*."""
    return f"nbd+unix:///{name}?socket={sock}"


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll *predicate* until it is true; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class ThreadServer:
    """An image served by the library (:func:`imago_nbd.server.serve`) on a loop in a thread."""

    def __init__(
        self,
        image: Path,
        fmt: str,
        sock: Path,
        *,
        prepare: Callable[[imago.FormatAccess], None] | None = None,
        **options: Any,
    ) -> None:
        self.image = image
        self._prepare = prepare  # (called on the opened image before it is served)
        self.sock = sock
        self._fmt = fmt
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: NbdServer | None = None
        self.access: imago.FormatAccess | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as error:  # reported to the test thread
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        write = not self._options.get("read_only", False)
        self.access = await imago.open_async(self.image, self._fmt, write=write)
        try:
            if self._prepare is not None:
                self._prepare(self.access)
            async with serve(self.access, unix_socket=self.sock, **self._options) as server:
                self.server = server
                self._ready.set()
                await server.serve_forever()
        finally:
            await self.access.close()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the server did not start"
        if self._error is not None:
            raise self._error
        return self

    @property
    def uri(self) -> str:
        """The export's URI."""
        assert self.server is not None
        return self.server.uri

    def stop(self) -> None:
        """Stop serving, close the image, join the thread."""
        if self.server is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.stop)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the server thread did not stop"
        self._loop.close()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CliServer:
    """``imago serve ARGS`` as a subprocess, killed at the end if still running."""

    def __init__(self, args: Sequence[str], *, sock: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.args = [IMAGO, "serve", *args]
        self.sock = sock
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_listening(self) -> None:
        """Wait until the Unix socket accepts connections."""
        assert self.sock is not None

        def ready() -> bool:
            assert self.process.poll() is None, f"imago serve exited: {self.process.communicate()}"
            if not self.sock or not self.sock.exists():
                return False
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
            finally:
                probe.close()
            return True

        # The probe is a client: without -t the server would exit when it leaves. Then the pid
        # file (written once the server listens) is waited for, or else the socket's existence.
        if "-t" in self.args or "--persistent" in self.args:
            wait_for(ready, "imago serve to listen")
        elif "--pid-file" in self.args:
            pid_file = Path(self.args[self.args.index("--pid-file") + 1])
            wait_for(pid_file.exists, "imago serve to write its pid file")
        else:
            wait_for(lambda: self.sock is not None and self.sock.exists(), "imago serve to listen")

    def signal(self, number: int = signal.SIGTERM) -> None:
        """Send a signal to the server."""
        self.process.send_signal(number)

    def wait(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """Wait for the server to exit: its status, stdout, stderr."""
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def kill(self) -> None:
        """Kill the server if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=TIMEOUT)


# --- a bare client for malformed traffic ---------------------------------------------------------

REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


class RawClient:
    """A minimal NBD client on a socket: EXPORT_NAME handshake, simple replies, any bytes sent."""

    def __init__(self, sock: Path, name: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(sock))
        greeting = self.recv(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        raw = name.encode()
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(raw)) + raw)
        self.size, self.flags = struct.unpack(">QH", self.recv(10))

    def recv(self, length: int) -> bytes:
        """Exactly *length* bytes (fails on a closed connection)."""
        data = b""
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            assert chunk, f"connection closed after {len(data)} of {length} bytes"
            data += chunk
        return data

    def request(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1, data: bytes = b""
    ) -> None:
        """Send one request (and *data* after it)."""
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + data)

    def reply(self, *, data_length: int = 0) -> tuple[int, int, bytes]:
        """One simple reply: (error, cookie, data); *data_length* bytes follow a successful READ."""
        magic, error, cookie = SIMPLE.unpack(self.recv(SIMPLE.size))
        assert magic == SIMPLE_MAGIC
        data = self.recv(data_length) if data_length and not error else b""
        return error, cookie, data

    def closed(self) -> bool:
        """Whether the server closed the connection (waits for it, up to the timeout); closes ours then."""
        try:
            gone = self.sock.recv(1) == b""
        except ConnectionResetError:
            gone = True
        if gone:
            self.sock.close()
        return gone

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def make_chain(directory: Path) -> Path:
    """A three-image qcow2 chain made with qemu-img/qemu-io: data, zeroes and holes at each depth."""
    base, mid, top = directory / "base.qcow2", directory / "mid.qcow2", directory / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "6M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -z 3M 512k", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 1M", "-c", "write -z 64k 64k", str(mid)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top), "8M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 256k", "-c", "write -P 0x44 7M 64k", str(top)])
    return top


def environ_without_venv() -> dict[str, str]:
    """The environment for tools (the venv's Python must not leak into the system one)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env
