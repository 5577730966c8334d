"""The NBD server (library entry point) against the real clients: nbdinfo, nbdcopy, qemu-img, qemu-io, libnbd.

Images are small; each server runs in-process on a loop in a thread (:class:`ThreadServer`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

import imago
from imago import Storage
from imago_nbd.server import Export, NbdServer, serve

from ._serving import RawClient, ThreadServer, libnbd, make_chain, run, short_dir, tool, uri, wait_for

MIB = 1 << 20
EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75


def _raw(path: Path, size: int = 4 * MIB) -> Path:
    data = bytearray(size)
    data[MIB : 2 * MIB] = os.urandom(MIB)
    data[3 * MIB : 3 * MIB + 4096] = b"\x5a" * 4096
    path.write_bytes(bytes(data))
    return path


def _qcow2(path: Path, size: str = "4M") -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    return path


def test_list_info_and_flags(tmp_path: Path) -> None:
    image = _raw(tmp_path / "disk.raw")
    with (
        short_dir() as sockets,
        ThreadServer(
            image, "raw", sockets / "s", export_name="disk", description="the test disk", allocation_depth=True
        ) as server,
    ):
        listing = run(["nbdinfo", "--list", "--json", uri(server.sock)]).stdout
        (export,) = json.loads(listing)["exports"]
        assert export["export-name"] == "disk"
        assert export["description"] == "the test disk"
        assert export["export-size"] == 4 * MIB
        assert set(export["contexts"]) == {"base:allocation", "qemu:allocation-depth"}
        assert export["block_size_maximum"] == 32 * MIB
        for feature in ("flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "df", "structured-reply"):
            assert run(["nbdinfo", "--can", feature, uri(server.sock, "disk")], check=False).returncode == 0, feature
        assert run(["nbdinfo", "--is", "read-only", uri(server.sock, "disk")], check=False).returncode == 2
        # Another name is not served.
        assert run(["nbdinfo", "--size", uri(server.sock, "other")], check=False).returncode != 0


def test_read_only_export(tmp_path: Path) -> None:
    image = _raw(tmp_path / "disk.raw")
    before = image.read_bytes()
    with short_dir() as sockets, ThreadServer(image, "raw", sockets / "s", read_only=True) as server:
        assert run(["nbdinfo", "--is", "read-only", uri(server.sock)], check=False).returncode == 0
        assert run(["nbdinfo", "--can", "trim", uri(server.sock)], check=False).returncode == 2
        client = RawClient(server.sock)
        client.request(1, 0, 512, data=b"x" * 512)
        assert client.reply()[0] == EPERM
        client.request(6, 0, 512)  # WRITE_ZEROES
        assert client.reply()[0] == EINVAL  # not advertised
        client.request(0, MIB, 16)
        assert client.reply(data_length=16)[2] == before[MIB : MIB + 16]
        client.close()
    assert image.read_bytes() == before


def test_map_equals_qemu_nbd(tmp_path: Path) -> None:
    """The differential: base:allocation and qemu:allocation-depth of a qcow2 chain as qemu-nbd -A reports them."""
    top = make_chain(tmp_path)
    with short_dir() as sockets:
        qemu_sock = sockets / "q"
        qemu_nbd = subprocess.Popen(
            [tool("qemu-nbd"), "-r", "-A", "-t", "-f", "qcow2", "-k", str(qemu_sock), str(top)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            with ThreadServer(top, "qcow2", sockets / "i", read_only=True, allocation_depth=True) as server:
                wait_for(qemu_sock.exists, "qemu-nbd to listen")
                for context in ("base:allocation", "qemu:allocation-depth"):
                    ours = run(["nbdinfo", f"--map={context}", uri(server.sock)]).stdout
                    theirs = run(["nbdinfo", f"--map={context}", uri(qemu_sock)]).stdout
                    assert ours == theirs, context
                    assert len(ours.splitlines()) > 3
                ours = run(["qemu-img", "map", "--output=json", "-f", "raw", uri(server.sock)]).stdout
                theirs = run(["qemu-img", "map", "--output=json", "-f", "raw", uri(qemu_sock)]).stdout
                assert ours == theirs
        finally:
            qemu_nbd.kill()
            qemu_nbd.communicate(timeout=30)


def test_qemu_img_info_compare_convert(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    with short_dir() as sockets, ThreadServer(top, "qcow2", sockets / "s", read_only=True) as server:
        info = json.loads(run(["qemu-img", "info", "--output=json", uri(server.sock)]).stdout)
        assert info["virtual-size"] == 8 * MIB
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), uri(server.sock)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(server.sock), str(tmp_path / "copy.qcow2")])
    run(["qemu-img", "compare", str(top), str(tmp_path / "copy.qcow2")])


def test_qemu_io_writes_reach_the_image(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2")
    with short_dir() as sockets, ThreadServer(image, "qcow2", sockets / "s") as server:
        run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0xcd 100 1000",
                "-c",
                "write -z 2M 1M",
                "-c",
                "write -z -u 1M 4k",
                "-c",
                "flush",
                uri(server.sock),
            ]
        )
    out = run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "read -P 0 1M 4k",
            "-c",
            "read -P 0xab 1028k 60k",
            "-c",
            "read -P 0xcd 100 1000",
            "-c",
            "read -P 0 2M 1M",
            str(image),
        ]
    ).stdout
    assert "Pattern verification failed" not in out
    run(["qemu-img", "check", str(image)])


def test_nbdcopy_both_directions(tmp_path: Path) -> None:
    source = _raw(tmp_path / "source.raw")
    target = _qcow2(tmp_path / "target.qcow2")
    with short_dir() as sockets, ThreadServer(target, "qcow2", sockets / "s", max_clients=0) as server:
        run(["nbdcopy", "--connections=4", "--requests=16", "--request-size=65536", str(source), uri(server.sock)])
        run(["nbdcopy", "--connections=4", uri(server.sock), str(tmp_path / "back.raw")])
        run(["nbdcopy", uri(server.sock), "null:"])
    run(["qemu-img", "check", str(target)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(target)])
    assert (tmp_path / "back.raw").read_bytes() == source.read_bytes()


def test_malformed_and_hostile_requests(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2", "40M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", str(image)])
    with short_dir() as sockets, ThreadServer(image, "qcow2", sockets / "s") as server:
        bystander = RawClient(server.sock)
        client = RawClient(server.sock)
        size = client.size
        assert size == 40 * MIB
        cases = [
            (dict(command=42, offset=0, length=512), EINVAL),  # unknown command
            (dict(command=0, offset=size - 512, length=1024), EINVAL),  # READ past the end
            (dict(command=0, offset=(1 << 64) - 512, length=1024), EINVAL),  # offset + length overflows
            (dict(command=0, offset=0, length=64 * MIB), EINVAL),  # past the end and oversized
            (dict(command=0, offset=0, length=33 * MIB), EOVERFLOW),  # oversized
            (dict(command=0, offset=0, length=512, flags=1 << 9), EINVAL),  # unknown flag
            (dict(command=3, offset=512, length=0), EINVAL),  # FLUSH with an offset
            (dict(command=7, offset=0, length=4096), EINVAL),  # BLOCK_STATUS with no context selected
            (dict(command=4, offset=size, length=4096), ENOSPC),  # TRIM past the end
            (dict(command=6, offset=size - 4096, length=8192), ENOSPC),  # WRITE_ZEROES past the end
            (dict(command=6, offset=0, length=512, flags=1 << 3), EINVAL),  # REQ_ONE is not a zeroing flag
        ]
        for cookie, (request, expected) in enumerate(cases, 1):
            client.request(**request, cookie=cookie)  # type: ignore[arg-type]
            assert client.reply() == (expected, cookie, b""), request
        client.request(1, size - 512, 1024, cookie=99, data=b"\xee" * 1024)  # WRITE past the end
        assert client.reply() == (ENOSPC, 99, b"")
        # An oversized WRITE: its payload is read and dropped, the connection goes on.
        client.request(1, 0, 33 * MIB, cookie=100, data=b"\xee" * (33 * MIB))
        assert client.reply() == (EOVERFLOW, 100, b"")
        client.request(0, 0, 4096, cookie=101)
        assert client.reply(data_length=4096) == (0, 101, b"\x77" * 4096)
        # A bad magic ends that connection only.
        client.sock.sendall(b"\x00" * 28)
        assert client.closed()
        # A client that leaves in the middle of a WRITE's payload.
        leaving = RawClient(server.sock)
        leaving.request(1, 8192, MIB, data=b"\xaa" * 4096)
        leaving.close()
        # A client that sends half a header and leaves.
        leaving = RawClient(server.sock)
        leaving.sock.sendall(b"\x25\x60\x95")
        leaving.close()
        bystander.request(1, 65536, 4096, cookie=7, data=b"\x42" * 4096)
        assert bystander.reply() == (0, 7, b"")
        bystander.request(0, 65536, 4096, cookie=8)
        assert bystander.reply(data_length=4096) == (0, 8, b"\x42" * 4096)
        bystander.request(2)  # DISC
        assert bystander.closed()
    run(["qemu-img", "check", str(image)])
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0 64k", "-c", "read -P 0x42 64k 4k", str(image)]).stdout
    assert "Pattern verification failed" not in out


_LIBNBD_EDGES = r"""
import errno, sys
import nbd

h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
size = h.get_size()

def error_of(call):
    try:
        call()
    except nbd.Error as error:
        return errno.errorcode.get(error.errno, error.errno)
    return "ok"

print("read-past-end", error_of(lambda: h.pread(4096, size - 1024)))
print("write-past-end", error_of(lambda: h.pwrite(b"x" * 4096, size - 1024)))
print("zero-past-end", error_of(lambda: h.zero(8192, size - 4096)))
print("fast-zero", error_of(lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)))
print("zero-no-hole", error_of(lambda: h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)))
print("trim", error_of(lambda: h.trim(65536, 131072, nbd.CMD_FLAG_FUA)))
print("cache", error_of(lambda: h.cache(65536, 0)))
print("flush", error_of(lambda: h.flush()))
print("fua-write", error_of(lambda: h.pwrite(b"\x99" * 512, 1 << 20, nbd.CMD_FLAG_FUA)))
print("read-df", h.pread(512, 1 << 20, nbd.CMD_FLAG_DF) == b"\x99" * 512)
print("oversized-read", error_of(lambda: h.pread(33 << 20, 0)))

chunks = []
def chunk(buf, offset, status, error):
    chunks.append((status, offset, len(buf)))
    return 0
h.pread_structured(2 << 20, 0, chunk)
kinds = sorted({status for status, _, _ in chunks})
print("chunk-kinds", kinds == [nbd.READ_DATA, nbd.READ_HOLE])
print("chunks-cover", sum(length for _, _, length in chunks) == 2 << 20)

extents = []
def got(metacontext, offset, entries, error):
    extents.append((metacontext, list(entries)))
    return 0
h.block_status(8 << 20, 0, got, nbd.CMD_FLAG_REQ_ONE)
print("req-one", len(extents) == 1 and len(extents[0][1]) == 2)

# Many requests in flight at once, completed in whatever order the server answers.
buffers = [nbd.Buffer(8192) for _ in range(32)]
for i in range(32):
    h.aio_pread(buffers[i], (1 << 20) + 4096 + i * 8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("pipelined", all(buffers[i].to_bytearray()[:4] == b"\x31" * 4 for i in range(32)))
h.shutdown()
"""


def test_libnbd_edge_cases(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2", "40M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 1M 512k", str(image)])
    with short_dir() as sockets, ThreadServer(image, "qcow2", sockets / "s", discard=True) as server:
        out = libnbd(_LIBNBD_EDGES, uri(server.sock)).stdout
    results = dict(line.split(" ", 1) for line in out.splitlines())
    assert results == {
        "read-past-end": "EINVAL",
        "write-past-end": "ENOSPC",
        "zero-past-end": "ENOSPC",
        "fast-zero": "ok",
        "zero-no-hole": "ok",
        "trim": "ok",
        "cache": "ok",
        "flush": "ok",
        "fua-write": "ok",
        "read-df": "True",
        "oversized-read": "EOVERFLOW",
        "chunk-kinds": "True",
        "chunks-cover": "True",
        "req-one": "True",
        "pipelined": "True",
    }
    run(["qemu-img", "check", str(image)])
    # The trim (discard on) freed the clusters: they read as zero and are unallocated.
    mapping = json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout)
    trimmed = [e for e in mapping if e["start"] <= 65536 < e["start"] + e["length"]]
    assert trimmed[0]["data"] is False


_ZEROING = r"""
import errno
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x42" * 131072, 0)
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("fast-zero ok")
except nbd.Error as error:
    print("fast-zero", errno.errorcode.get(error.errno, error.errno))
print("still-data", h.pread(65536, 0) == b"\x42" * 65536)
h.zero(65536, 0)
print("slow-zero", h.pread(131072, 0) == bytes(65536) + b"\x42" * 65536)
h.shutdown()
"""


def _zeroing_slowly(access: imago.FormatAccess) -> None:
    """Give the raw image a storage that zeroes by writing zero buffers (the base class's way)."""
    storage = access.driver.storage
    storage.__class__ = type("SlowZeroing", (type(storage),), {"write_zeroes": Storage.write_zeroes})


def test_fast_zero_is_refused_where_zeroing_writes_data(tmp_path: Path) -> None:
    """FAST_ZERO gets ENOTSUP, with nothing changed, when zeroing would write zero buffers; plain zeroing works."""
    image = _raw(tmp_path / "disk.raw")
    with short_dir() as sockets, ThreadServer(image, "raw", sockets / "s", prepare=_zeroing_slowly) as server:
        out = libnbd(_ZEROING, uri(server.sock)).stdout
    assert out.splitlines() == ["fast-zero ENOTSUP", "still-data True", "slow-zero True"]
    assert image.read_bytes()[:131072] == bytes(65536) + b"\x42" * 65536


def test_several_clients_write_at_once(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2", "8M")
    script = r"""
import sys
import nbd
handles = []
for i in range(4):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
pending = []
for round in range(8):
    for i, h in enumerate(handles):
        offset = (round * 4 + i) * 65536
        pending.append((h, h.aio_pwrite(bytes([0x40 + i]) * 65536, offset)))
for h, cookie in pending:
    while not h.aio_command_completed(cookie):
        h.poll(-1)
handles[0].flush()
for h in handles:
    h.shutdown()
print("done")
"""
    with short_dir() as sockets, ThreadServer(image, "qcow2", sockets / "s") as server:
        assert libnbd(script, uri(server.sock)).stdout.strip() == "done"
        assert server.server is not None
    checks = []
    for round in range(8):
        for i in range(4):
            checks += ["-c", f"read -P {0x40 + i} {(round * 4 + i) * 65536} 64k"]
    out = run(["qemu-io", "-f", "qcow2", *checks, str(image)]).stdout
    assert "Pattern verification failed" not in out
    run(["qemu-img", "check", str(image)])


def test_a_client_that_stalls_in_the_handshake_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake time limit (10 s, shortened here) closes a silent or half-done client; others go on."""
    from imago_nbd.server import connection

    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.5)
    image = _raw(tmp_path / "disk.raw")
    with short_dir() as sockets, ThreadServer(image, "raw", sockets / "s") as server:
        served = RawClient(server.sock)  # (its handshake finished before the limit: it stays)
        silent = socket.socket(socket.AF_UNIX)
        halfway = socket.socket(socket.AF_UNIX)
        for stalled in (silent, halfway):
            stalled.settimeout(30)
            stalled.connect(str(server.sock))
            assert stalled.recv(18)[:16] == b"NBDMAGICIHAVEOPT"
        halfway.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 10) + b"dis")
        for stalled in (silent, halfway):
            assert stalled.recv(1) == b"", "the server kept a stalled handshake open"
            stalled.close()
        served.request(0, 0, 4096, cookie=7)
        assert served.reply(data_length=4096) == (0, 7, bytes(4096))
        served.close()


def test_library_misuse(tmp_path: Path) -> None:
    asyncio.run(_misuse(tmp_path))


async def _misuse(tmp_path: Path) -> None:
    image = _raw(tmp_path / "disk.raw")
    access = await imago.open_async(image, "raw")
    try:
        with pytest.raises(imago.InvalidRequestError, match="not both"):
            serve(access, unix_socket=str(tmp_path / "s"), port=1)
        with pytest.raises(imago.InvalidRequestError, match="max_clients"):
            serve(access, unix_socket=str(tmp_path / "s"), max_clients=-1)
        with pytest.raises(imago.InvalidRequestError, match="4096 bytes"):
            Export(access, name="x" * 5000)
        with pytest.raises(imago.InvalidRequestError, match="FormatAccess"):
            Export(object())  # type: ignore[arg-type]
        server = serve(access, host="127.0.0.1", port=0)
        with pytest.raises(imago.InvalidRequestError, match="not started"):
            _ = server.address
        async with server:
            assert isinstance(server, NbdServer)
            _, port = server.address  # type: ignore[misc]
            assert port > 0
            assert server.uri == f"nbd://127.0.0.1:{port}/"
            assert Export(access).read_only  # opened read-only: served read-only
    finally:
        await access.close()
    with pytest.raises(imago.InvalidRequestError, match="closed"):
        Export(access)


_LIBNBD_OPTIONS = r"""
import errno, sys
import nbd

def error_of(call):
    try:
        call()
    except nbd.Error as error:
        return errno.errorcode.get(error.errno, error.errno)
    return "ok"

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
listed = []
h.opt_list(lambda name, description: listed.append((name, description)) or 0)
print("list", listed)
h.set_export_name("nope")
print("info-unknown", error_of(h.opt_info))
h.set_export_name("vd")
h.set_full_info(True)
h.opt_info()
name, description = h.get_canonical_export_name(), h.get_export_description()
print("info", h.get_size(), name, description, h.get_block_size(nbd.SIZE_MAXIMUM))
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
print("contexts", sorted(contexts))
h.add_meta_context("qemu:")
h.opt_go()
print("selected", h.can_meta_context("qemu:allocation-depth"), h.can_meta_context("base:allocation"))
h.shutdown()

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.opt_abort()
print("aborted", h.aio_is_closed() or h.aio_is_dead() or True)
"""


def test_option_haggling_with_libnbd(tmp_path: Path) -> None:
    image = _raw(tmp_path / "disk.raw")
    with (
        short_dir() as sockets,
        ThreadServer(
            image, "raw", sockets / "s", export_name="vd", description="the disk", allocation_depth=True
        ) as server,
    ):
        out = libnbd(_LIBNBD_OPTIONS, uri(server.sock, "vd")).stdout.splitlines()
    assert out == [
        "list [('vd', 'the disk')]",
        "info-unknown ENOENT",
        f"info {4 * MIB} vd the disk {32 * MIB}",
        "contexts ['base:allocation', 'qemu:allocation-depth']",
        "selected True False",
        "aborted True",
    ]


def test_raw_option_errors(tmp_path: Path) -> None:
    """Options answered with the protocol's errors: STARTTLS without TLS, unknown options, bad bodies."""
    image = _raw(tmp_path / "disk.raw")
    with short_dir() as sockets, ThreadServer(image, "raw", sockets / "s") as server:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(server.sock))

        def recv(length: int) -> bytes:
            data = b""
            while len(data) < length:
                chunk = sock.recv(length - len(data))
                assert chunk
                data += chunk
            return data

        def option(number: int, body: bytes = b"") -> tuple[int, int, bytes]:
            sock.sendall(struct.pack(">QII", 0x49484156454F5054, number, len(body)) + body)
            magic, echoed, reply, length = struct.unpack(">QIII", recv(20))
            assert (magic, echoed) == (0x3E889045565A9, number)
            return number, reply, recv(length)

        assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
        sock.sendall(struct.pack(">I", 3))
        assert option(5)[1] == (1 << 31) + 2  # STARTTLS: ERR_POLICY (no TLS configured)
        assert option(99, b"junk")[1] == (1 << 31) + 1  # unknown: ERR_UNSUP
        assert option(6, b"\x00\x00")[1] == (1 << 31) + 3  # INFO with a truncated body: ERR_INVALID
        assert option(10, struct.pack(">II", 0, 0))[1] == (1 << 31) + 3  # meta context before structured
        assert option(8)[1] == 1  # STRUCTURED_REPLY: ACK
        assert option(8)[1] == (1 << 31) + 3  # twice: ERR_INVALID
        assert option(2)[1] == 1  # ABORT: ACK, then the server closes
        assert sock.recv(1) == b""
        sock.close()


def test_pipelined_options(tmp_path: Path) -> None:
    """Options sent without waiting for replies are answered in order."""
    image = _raw(tmp_path / "disk.raw")
    with short_dir() as sockets, ThreadServer(image, "raw", sockets / "s", export_name="vd") as server:
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(30)
        client.connect(str(server.sock))
        magic = struct.pack(">Q", 0x49484156454F5054)
        client.sendall(
            struct.pack(">I", 3)
            + magic + struct.pack(">II", 3, 0)  # LIST
            + magic + struct.pack(">II", 8, 0)  # STRUCTURED_REPLY
            + magic + struct.pack(">II", 2, 0)  # ABORT
        )  # fmt: skip
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        client.close()
    replies = []
    position = 18
    while position < len(data):
        _, option, reply, length = struct.unpack_from(">QIII", data, position)
        replies.append((option, reply))
        position += 20 + length
    assert replies == [(3, 2), (3, 1), (8, 1), (2, 1)]


def test_image_errors_become_eio(tmp_path: Path) -> None:
    """A corrupt L2 table: reads through it fail with EIO, the connection and the server go on."""
    image = _qcow2(tmp_path / "disk.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 64k", "-c", "write -P 0x22 2M 64k", str(image)])
    with image.open("r+b") as file:
        header = file.read(104)
        (l1_offset,) = struct.unpack_from(">Q", header, 40)
        file.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", file.read(8))
        l2_offset = l1_entry & 0x00FFFFFFFFFFFE00
        file.seek(l2_offset + 8)  # guest cluster 1: a host offset inside a cluster
        file.write(struct.pack(">Q", (1 << 63) | 0x50200))
    with short_dir() as sockets, ThreadServer(image, "qcow2", sockets / "s", read_only=True) as server:
        client = RawClient(server.sock)
        client.request(0, 65536, 4096, cookie=1)
        assert client.reply(data_length=4096)[:2] == (5, 1)  # EIO
        client.request(0, 0, 4096, cookie=2)
        error, _, data = client.reply(data_length=4096)
        assert error in (0, 5)
        assert error or data == b"\x21" * 4096
        client.request(2)
        assert client.closed()
        # Other clients are still served.
        assert run(["nbdinfo", "--size", uri(server.sock)]).stdout.strip() == str(4 * MIB)


_RANDOM_WORKLOAD = r"""
import random, sys
import nbd

uri, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
handles = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
model = bytearray(size)
known = bytearray(b"\x01") * size  # 0 where a trim left the content undefined
SLOT = 65536
mismatches = 0
for batch in range(40):
    slots = rng.sample(range(size // SLOT), 12)
    pending = []
    for slot in slots:
        h = rng.choice(handles)
        start = slot * SLOT + rng.randrange(0, SLOT // 2)
        length = rng.randrange(1, SLOT - (start - slot * SLOT))
        kind = rng.choice(["write", "write", "zero", "zero-no-hole", "trim", "read"])
        if kind == "write":
            data = rng.randbytes(length)
            flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
            pending.append((h, h.aio_pwrite(data, start, flags=flags), None))
            model[start : start + length] = data
            known[start : start + length] = b"\x01" * length
        elif kind.startswith("zero"):
            flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero-no-hole" else 0
            pending.append((h, h.aio_zero(length, start, flags=flags), None))
            model[start : start + length] = bytes(length)
            known[start : start + length] = b"\x01" * length
        elif kind == "trim":
            pending.append((h, h.aio_trim(length, start), None))
            known[start : start + length] = bytes(length)
        else:
            buf = nbd.Buffer(length)
            pending.append((h, h.aio_pread(buf, start), (buf, start, length)))
    for h, cookie, read in pending:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        if read is not None:
            buf, start, length = read
            got = buf.to_bytearray()
            for i in range(length):
                if known[start + i] and got[i] != model[start + i]:
                    mismatches += 1
                    break
    if rng.random() < 0.3:
        rng.choice(handles).flush()
whole = handles[0].pread(size, 0)
bad = sum(1 for i in range(0, size, 4096) if any(
    known[j] and whole[j] != model[j] for j in range(i, min(i + 4096, size))))
for h in handles:
    h.shutdown()
sys.stdout.buffer.write(b"%d %d\n" % (mismatches, bad))
"""


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_random_workload_matches_a_model(tmp_path: Path, fmt: str) -> None:
    """Random writes, zeroes, trims and reads over three connections read back as a bytearray model says."""
    size = 2 * MIB
    image = tmp_path / f"disk.{fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(size)])
    with short_dir() as sockets, ThreadServer(image, fmt, sockets / "s", discard=True) as server:
        out = libnbd(_RANDOM_WORKLOAD, uri(server.sock), "7", str(size), timeout=120).stdout
    assert out.split() == ["0", "0"]
    if fmt == "qcow2":
        run(["qemu-img", "check", str(image)])
