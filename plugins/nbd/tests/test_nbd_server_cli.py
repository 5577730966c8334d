"""``imago serve`` as a command: qemu-nbd's options, client limits, persistence, signals, --fork, TLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ._serving import IMAGO, SYSTEM_PYTHON, CliServer, libnbd, run, short_dir, tool, uri, wait_for

MIB = 1 << 20


def _qcow2(path: Path, size: str = "4M") -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    return path


def _serve(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMAGO, "serve", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["-p", "99999"], "--port"),
        (["-p", "ten"], "--port"),
        (["-k", "/tmp/x.sock", "-p", "1"], "--socket"),
        (["-e", "-1"], "--shared"),
        (["--object", "secret,id=s0,data=x"], "--object"),
        (["--object", "tls-creds-x509,id=t0"], "--object"),
        (["--tls-creds", "/nonexistent-dir"], "--tls-creds"),
        (["--cache", "bogus"], "--cache"),
        (["--bogus"], "--bogus"),
        (["-x", "n" * 5000], "--export-name"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], named: str) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    result = _serve([*args, str(image)])
    assert result.returncode == 1, result
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_image_and_bad_format(tmp_path: Path) -> None:
    result = _serve(["-k", str(tmp_path / "s"), str(tmp_path / "missing.qcow2")])
    assert result.returncode == 1
    assert "missing.qcow2" in result.stderr
    image = _qcow2(tmp_path / "disk.qcow2")
    result = _serve(["-f", "nosuchformat", "-k", str(tmp_path / "s"), str(image)])
    assert result.returncode == 1
    assert "nosuchformat" in result.stderr
    assert not (tmp_path / "s").exists()


def test_exits_after_the_last_client(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    with short_dir() as sockets:
        sock = sockets / "s"
        pid_file = sockets / "pid"
        args = ["-f", "qcow2", "-x", "vda", "-D", "a disk", "-k", str(sock), "--pid-file", str(pid_file), str(image)]
        server = CliServer(args, sock=sock)
        try:
            server.wait_listening()
            listing = json.loads(run(["nbdinfo", "--list", "--json", uri(sock)]).stdout)
            (export,) = listing["exports"]
            assert (export["export-name"], export["description"]) == ("vda", "a disk")
            assert export["export-size"] == 4 * MIB
            assert export["can_multi_conn"] is False  # one client at a time (-e 1): no multi-conn
            assert export["can_trim"] is True
            status, _, err = server.wait()
            assert status == 0, err
            assert not sock.exists()
        finally:
            server.kill()


def test_tcp(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = CliServer(["-f", "qcow2", "-r", "-b", "127.0.0.1", "-p", str(port), "-t", str(image)])
    try:
        address = f"nbd://127.0.0.1:{port}/"
        wait_for(lambda: run(["nbdinfo", "--size", address], check=False).returncode == 0, "imago serve on TCP")
        assert run(["nbdinfo", "--is", "read-only", address], check=False).returncode == 0
        server.signal(signal.SIGHUP)
        status, _, err = server.wait()
        assert status == 0, err
    finally:
        server.kill()


def test_persistent_shared_limit_and_sigterm(tmp_path: Path) -> None:
    """-t keeps serving; -e 1 holds a second client back until the first leaves; SIGTERM ends cleanly."""
    image = _qcow2(tmp_path / "disk.qcow2")
    holder = r"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
h.shutdown()
"""
    with short_dir() as sockets:
        sock = sockets / "s"
        pid_file = sockets / "pid"
        server = CliServer(
            ["-f", "qcow2", "-k", str(sock), "-t", "-e", "1", "--pid-file", str(pid_file), str(image)], sock=sock
        )
        first = None
        second = None
        try:
            server.wait_listening()
            wait_for(pid_file.exists, "the pid file")
            assert int(pid_file.read_text()) == server.process.pid
            for _ in range(2):  # persistent: clients come and go
                run(["nbdinfo", "--size", uri(sock)])
            first = subprocess.Popen(
                [SYSTEM_PYTHON, "-c", holder, uri(sock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert first.stdout is not None
            assert first.stdout.readline().strip() == "connected"
            second = subprocess.Popen(
                [tool("nbdinfo"), "--size", uri(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            time.sleep(0.5)
            assert second.poll() is None, "the second client was served while the first held the only slot"
            first.communicate("\n", timeout=30)
            out, _ = second.communicate(timeout=30)
            assert out.strip() == str(4 * MIB)
            server.signal(signal.SIGTERM)
            status, _, err = server.wait()
            assert status == 0, err
            assert not sock.exists()
            assert not pid_file.exists()
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.communicate()
            server.kill()


_WRITER = r"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
acknowledged = []
def done(index):
    def completion(error):
        if error.value == 0:
            acknowledged.append(index)
            print(index, flush=True)
        return 1
    return completion
buffers = [nbd.Buffer.from_bytearray(bytearray([0x10 + i % 200]) * 262144) for i in range(64)]
for i in range(64):
    h.aio_pwrite(buffers[i], i * 262144, completion=done(i))
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
print("end", flush=True)
"""


def test_sigterm_with_writes_in_flight(tmp_path: Path) -> None:
    """Every write the server acknowledged before SIGTERM is in the image, which stays consistent."""
    image = _qcow2(tmp_path / "disk.qcow2", "16M")
    with short_dir() as sockets:
        sock = sockets / "s"
        server = CliServer(["-f", "qcow2", "-k", str(sock), "-t", str(image)], sock=sock)
        writer = None
        try:
            server.wait_listening()
            writer = subprocess.Popen(
                [SYSTEM_PYTHON, "-c", _WRITER, uri(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            assert writer.stdout is not None
            writer.stdout.readline()  # the first acknowledgement
            server.signal(signal.SIGTERM)
            out, _ = writer.communicate(timeout=30)
            status, _, err = server.wait()
            assert status == 0, err
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
                writer.communicate()
            server.kill()
    acknowledged = [int(line) for line in out.split() if line.isdigit()]
    checks = []
    for index in acknowledged:
        checks += ["-c", f"read -P {0x10 + index % 200} {index * 262144} 256k"]
    if checks:
        result = run(["qemu-io", "-f", "qcow2", *checks, str(image)])
        assert "Pattern verification failed" not in result.stdout
    run(["qemu-img", "check", str(image)])


def test_fork_returns_once_listening(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    with short_dir() as sockets:
        sock = sockets / "s"
        pid_file = sockets / "pid"
        result = _serve(["--fork", "-t", "-f", "qcow2", "-k", str(sock), "--pid-file", str(pid_file), str(image)])
        assert result.returncode == 0, result.stderr
        pid = int(pid_file.read_text())
        try:
            assert sock.exists()
            assert run(["nbdinfo", "--size", uri(sock)]).stdout.strip() == str(4 * MIB)
        finally:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not sock.exists(), "the forked server to exit")
        wait_for(lambda: not pid_file.exists(), "the forked server to remove its pid file")
    # A fork that cannot start reports the error in the parent.
    result = _serve(["--fork", "-f", "qcow2", "-k", "/nonexistent-dir/s", str(image)])
    assert result.returncode == 1
    assert "/nonexistent-dir/s" in result.stderr


def _certificates(directory: Path) -> Path:
    """A CA, a server certificate for localhost and a client certificate, made by openssl."""
    directory.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        run(["openssl", *args], cwd=directory)

    openssl(
        "req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
        "-subj", "/CN=imago test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for role, usage, names in (
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "DNS:client.localhost"),
    ):
        openssl(
            "req", *key, "-keyout", f"{role}-key.pem", "-out", f"{role}.csr", "-subj", f"/CN={names.split(',')[0][4:]}"
        )
        (directory / f"{role}.ext").write_text(
            f"subjectAltName={names}\nextendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        )
        openssl(
            "x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{role}-cert.pem", "-days", "2", "-extfile", f"{role}.ext",
        )  # fmt: skip
    return directory


_TLS_READER = """
import sys, nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print(h.pread(4, 0).hex())
h.shutdown()
"""


def test_tls(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(image)])
    certs = _certificates(tmp_path / "certs")
    with short_dir() as sockets:
        sock = sockets / "s"
        server = CliServer(
            [
                "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                "--tls-creds", "tls0", "-f", "qcow2", "-k", str(sock), "-t", "-e", "0", "-x", "disk", str(image),
            ],
            sock=sock,
        )  # fmt: skip
        try:
            server.wait_listening()
            secure = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs}&tls-hostname=localhost"
            assert run(["nbdinfo", "--size", secure]).stdout.strip() == str(4 * MIB)
            # Without TLS the export is not given out.
            assert run(["nbdinfo", "--size", uri(sock, "disk")], check=False).returncode != 0
            # qemu-img as a TLS client.
            opts = f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=c0,tls-hostname=localhost"
            client = ["--object", f"tls-creds-x509,id=c0,dir={certs},endpoint=client"]
            local = f"driver=qcow2,file.driver=file,file.filename={image},file.locking=off"
            run(["qemu-img", "compare", *client, "--image-opts", opts, local])
            # Without a client certificate the server refuses (verify-peer is on, as with qemu-nbd).
            bare = tmp_path / "ca-only"
            bare.mkdir()
            (bare / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
            anonymous = f"nbds+unix:///disk?socket={sock}&tls-certificates={bare}&tls-hostname=localhost"
            assert run(["nbdinfo", "--size", anonymous], check=False).returncode != 0
            server.signal(signal.SIGINT)
            status, _, err = server.wait()
            assert status == 0, err
        finally:
            server.kill()
        # The simple form: --tls-creds DIR.
        sock = sockets / "t"
        pid_file = sockets / "pid"
        args = ["--tls-creds", str(certs), "-f", "qcow2", "-k", str(sock), "--pid-file", str(pid_file), str(image)]
        server = CliServer(args, sock=sock)
        try:
            server.wait_listening()
            secure = f"nbds+unix:///?socket={sock}&tls-certificates={certs}&tls-hostname=localhost"
            out = libnbd(_TLS_READER, secure).stdout
            assert out.strip() == "61616161"
            status, _, err = server.wait()
            assert status == 0, err
        finally:
            server.kill()


@pytest.mark.parametrize(("options", "freed"), [([], False), (["--discard=unmap", "--cache=writethrough"], True)])
def test_discard_option(tmp_path: Path, options: list[str], freed: bool) -> None:
    """TRIM frees clusters only with --discard=unmap (qemu-nbd's default is ignore)."""
    image = _qcow2(tmp_path / "disk.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(image)])
    with short_dir() as sockets:
        sock = sockets / "s"
        server = CliServer([*options, "-f", "qcow2", "-k", str(sock), "-t", str(image)], sock=sock)
        try:
            server.wait_listening()
            run(["qemu-io", "-f", "raw", "-c", "discard 0 512k", "-c", "write -P 0x66 1M 64k", uri(sock)])
            server.signal(signal.SIGTERM)
            status, _, err = server.wait()
            assert status == 0, err
        finally:
            server.kill()
    mapping = json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout)
    assert (mapping[0]["start"], mapping[0]["data"]) == (0, not freed)
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x66 1M 64k", "-c", "read -P 0x55 512k 512k", str(image)])
    assert "Pattern verification failed" not in out.stdout
