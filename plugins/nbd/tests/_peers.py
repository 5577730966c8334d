"""Real NBD servers for the client tests: qemu-nbd, nbdkit and nbd-server on Unix sockets (or TCP).

Each ``start_*`` returns a :class:`Peer` whose ``stop`` kills the server; the tests register it
as a finalizer. Sockets live in short directories under /tmp (AF_UNIX paths are limited), TCP
ports are chosen free by binding port 0. A missing tool fails the test (never skips).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

_START_TIMEOUT = 15.0


@attrs.define
class Peer:
    """A running server: its process (or daemon pid), the URI of its export, its socket."""

    uri: str
    socket_path: str | None
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    workdir: str | None = None

    def uri_for(self, export: str) -> str:
        """The URI of another export of the same server."""
        assert self.socket_path is not None
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None

    def stop(self) -> None:
        """Stop the server and remove its socket directory."""
        self.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def tool(name: str) -> str:
    """The path of a required tool; a missing tool fails the test."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (the NBD interoperability tests need it)"
    return path


def short_dir() -> str:
    """A fresh directory with a short path, for Unix sockets."""
    return tempfile.mkdtemp(prefix="nbd", dir="/tmp")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(command: list[str], workdir: str) -> subprocess.Popen[bytes]:
    """Start a server, its messages to ``workdir/log`` (a pipe nobody drains could block a chatty server)."""
    log = os.open(os.path.join(workdir, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    finally:
        os.close(log)


def _exited(process: subprocess.Popen[bytes], workdir: str) -> AssertionError:
    log = Path(workdir, "log")
    text = log.read_text(errors="replace") if log.exists() else ""
    return AssertionError(f"the server exited with status {process.returncode} before listening: {text}")


def _wait_unix(path: str, process: subprocess.Popen[bytes] | None) -> None:
    workdir = os.path.dirname(path)
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise _exited(process, workdir)
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise AssertionError(f"the server did not listen on {path} within {_START_TIMEOUT} s")


def _wait_tcp(port: int, process: subprocess.Popen[bytes], workdir: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _exited(process, workdir)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"the server did not listen on port {port} within {_START_TIMEOUT} s")


def start_qemu_nbd(
    image: str | os.PathLike[str],
    *args: str,
    export: str = "",
    fmt: str = "raw",
    tls_dir: str | None = None,
    tcp: bool = False,
) -> Peer:
    """``qemu-nbd`` serving *image* (persistent: clients may come and go) with extra *args*.

    Probing of the qemu-nbd connection itself counts as a client, so ``-t`` is always given.
    """
    workdir = short_dir()
    command = [tool("qemu-nbd"), "-f", fmt, "-t", *args]
    if export:
        command += ["-x", export]
    if tls_dir is not None:
        command += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server", "--tls-creds", "tls0"]
    if tcp:
        port = free_port()
        command += ["-b", "127.0.0.1", "-p", str(port), os.fspath(image)]
        process = _spawn(command, workdir)
        scheme = "nbds" if tls_dir else "nbd"
        peer = Peer(uri=f"{scheme}://127.0.0.1:{port}/{export}", socket_path=None, process=process, workdir=workdir)
        try:
            _wait_tcp(port, process, workdir)
        except BaseException:
            peer.stop()
            raise
        return peer
    path = os.path.join(workdir, "s")
    command += ["-k", path, os.fspath(image)]
    process = _spawn(command, workdir)
    scheme = "nbds+unix" if tls_dir else "nbd+unix"
    peer = Peer(uri=f"{scheme}:///{export}?socket={path}", socket_path=path, process=process, workdir=workdir)
    try:
        _wait_unix(path, process)
    except BaseException:
        peer.stop()
        raise
    return peer


def start_nbdkit(plugin: str, *args: str, filters: Sequence[str] = (), options: Sequence[str] = ()) -> Peer:
    """``nbdkit`` running *plugin* with its *args*, *filters* stacked and extra server *options*."""
    workdir = short_dir()
    path = os.path.join(workdir, "s")
    command = [tool("nbdkit"), "-f", "--exit-with-parent", "-U", path, *options]
    command += [f"--filter={name}" for name in filters]
    command += [plugin, *args]
    process = _spawn(command, workdir)
    peer = Peer(uri=f"nbd+unix:///?socket={path}", socket_path=path, process=process, workdir=workdir)
    try:
        _wait_unix(path, process)
    except BaseException:
        peer.stop()
        raise
    return peer


def start_nbd_server(image: str | os.PathLike[str], *, export: str = "disk", readonly: bool = False) -> Peer:
    """``nbd-server`` (simple replies only) serving *image* as *export* on a Unix socket.

    It daemonises (its no-daemon mode serves one client and exits); the pid file says whom to kill.
    """
    workdir = short_dir()
    path = os.path.join(workdir, "s")
    pid_file = os.path.join(workdir, "pid")
    config = Path(workdir, "config")
    config.write_text(
        f"[generic]\n    unixsock = {path}\n    allowlist = true\n"
        f"[{export}]\n    exportname = {os.fspath(image)}\n    readonly = {'true' if readonly else 'false'}\n"
    )
    subprocess.run([tool("nbd-server"), "-C", str(config), "-p", pid_file], check=True, timeout=_START_TIMEOUT)
    peer = Peer(uri=f"nbd+unix:///{export}?socket={path}", socket_path=path, workdir=workdir)
    deadline = time.monotonic() + _START_TIMEOUT
    while not os.path.exists(pid_file) or not Path(pid_file).read_text().strip():
        if time.monotonic() > deadline:
            peer.stop()
            raise AssertionError("nbd-server wrote no pid file")
        time.sleep(0.02)
    peer.pid = int(Path(pid_file).read_text())
    try:
        _wait_unix(path, None)
    except BaseException:
        peer.stop()
        raise
    return peer


def make_certificates(directory: Path) -> tuple[str, str]:
    """A CA, a server and a client certificate made with ``openssl``; returns (server dir, client dir).

    Laid out as QEMU's tls-creds-x509 directories (``ca-cert.pem``, ``server-cert.pem``, ...).
    """
    openssl = tool("openssl")
    server = directory / "server"
    client = directory / "client"
    server.mkdir()
    client.mkdir()
    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca-cert.pem"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2", "-subj", "/CN=imago test CA")
    for role, target in (("server", server), ("client", client)):
        key, csr, cert = target / f"{role}-key.pem", target / f"{role}.csr", target / f"{role}-cert.pem"
        run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN=localhost {role}")
        extensions = target / "ext.cnf"
        usage = "serverAuth" if role == "server" else "clientAuth"
        extensions.write_text(
            f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"
            "keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
        )
        run(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extensions),
        )  # fmt: skip
        shutil.copy(ca_cert, target / "ca-cert.pem")
    return str(server), str(client)
