"""The ``nbd`` storage driver against qemu-nbd: data, allocation, writes, qcow2 on NBD, misuse."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import imago
from imago import (
    ClosedError,
    ImagoError,
    ImplicitOpenDeniedError,
    InvalidOptionError,
    InvalidRequestError,
    PermissiveImplicitOpenGate,
    ReadOnlyError,
    StorageOpenOptions,
    UnsupportedFeatureError,
    runtime,
)
from imago_nbd.client import Nbd
from imago_nbd.constants import TransmissionFlag
from imago_nbd.errors import NbdConnectionError

from ._client import extents, nbdinfo_map, open_nbd, read_all
from ._peers import Peer, short_dir, start_qemu_nbd, tool

SIZE = 4 << 20


def _image(path: Path, seed: int = 1) -> bytes:
    """A sparse raw image: random data at 0..1 MiB and 2.5..3 MiB, holes elsewhere."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for start, end in ((0, 1 << 20), (5 << 19, 3 << 20)):
        data[start:end] = rng.randbytes(end - start)
    with open(path, "wb") as file:
        file.truncate(SIZE)
        for start, end in ((0, 1 << 20), (5 << 19, 3 << 20)):
            file.seek(start)
            file.write(data[start:end])
    return bytes(data)


def _read_disk(disk: imago.SyncFormatAccess) -> bytes:
    buf = bytearray(disk.size)
    disk.read(buf, 0)
    return bytes(buf)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    return path, _image(path)


@pytest.fixture
def qemu_nbd(image: tuple[Path, bytes]) -> Iterator[Peer]:
    peer = start_qemu_nbd(image[0])
    yield peer
    peer.stop()


def test_reads_what_the_file_holds(qemu_nbd: Peer, image: tuple[Path, bytes]) -> None:
    storage = open_nbd(qemu_nbd.uri)
    try:
        assert storage.size == SIZE
        assert not storage.writable
        assert storage.filename == qemu_nbd.uri
        assert storage.allocated_size() is None
        assert read_all(storage) == image[1]
        # Unaligned, vectored, through the coroutine.
        a, b = bytearray(1000), bytearray(70001)
        runtime.run_sync(storage.readv([memoryview(a), memoryview(b)], 12345))
        assert bytes(a + b) == image[1][12345 : 12345 + 71001]
        # Past the end reads zeroes.
        with pytest.raises(InvalidRequestError, match="negative offset"):
            runtime.run_sync(storage.readv([memoryview(bytearray(10))], -1))
        tail = bytearray(b"\xff" * 8192)
        runtime.run_sync(storage.readv([memoryview(tail)], SIZE - 4096))
        assert bytes(tail) == image[1][-4096:] + bytes(4096)
    finally:
        runtime.run_sync(storage.close())


def test_allocation_matches_nbdinfo(qemu_nbd: Peer) -> None:
    storage = open_nbd(qemu_nbd.uri)
    try:
        ours = extents(storage)
    finally:
        runtime.run_sync(storage.close())
    assert ours == nbdinfo_map(qemu_nbd.uri)
    assert ours == [(0, 1 << 20, True), (1 << 20, 5 << 19, False), (5 << 19, 3 << 20, True), (3 << 20, SIZE, False)]


def test_writes_reach_the_file(qemu_nbd: Peer, image: tuple[Path, bytes]) -> None:
    path, original = image
    model = bytearray(original)
    storage = open_nbd(qemu_nbd.uri, writable=True)
    rng = random.Random(7)
    try:
        assert storage.writable
        for _ in range(20):
            offset = rng.randrange(SIZE - 70000)
            data = rng.randbytes(rng.randrange(1, 70000))
            runtime.run_sync(storage.writev([memoryview(data)], offset))
            model[offset : offset + len(data)] = data
        big = rng.randbytes(5 << 20 >> 1)  # over one request: split and pipelined
        runtime.run_sync(storage.writev([memoryview(big[:1000]), memoryview(big[1000:])], 4096))
        model[4096 : 4096 + len(big)] = big
        runtime.run_sync(storage.write_zeroes(100, 300000))
        model[100:300100] = bytes(300000)
        runtime.run_sync(storage.write_zeroes(3 << 20, 1 << 20, unmap=True))
        model[3 << 20 :] = bytes(1 << 20)
        runtime.run_sync(storage.discard(0, 0))
        runtime.run_sync(storage.flush())
        runtime.run_sync(storage.sync())
        assert read_all(storage) == bytes(model)
        with pytest.raises(InvalidRequestError, match="past the end"):
            runtime.run_sync(storage.writev([memoryview(b"x")], SIZE))
        runtime.run_sync(storage.resize(SIZE))
        with pytest.raises(UnsupportedFeatureError, match="resizing an NBD export"):
            runtime.run_sync(storage.resize(SIZE * 2))
    finally:
        runtime.run_sync(storage.close())
    assert path.read_bytes() == bytes(model)


def test_async_many_reads_in_flight(qemu_nbd: Peer, image: tuple[Path, bytes]) -> None:
    storage = open_nbd(qemu_nbd.uri, writable=True, requests=4)
    rng = random.Random(3)
    ranges = [(rng.randrange(SIZE - 65536), rng.randrange(1, 65536)) for _ in range(200)]

    async def main() -> list[bytes]:
        async def one(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            await storage.readv([memoryview(buf)], offset)
            return bytes(buf)

        results = await asyncio.gather(*(one(offset, length) for offset, length in ranges))
        # Writes and zeroes under the loop too, then everything read back in one go.
        await storage.writev([memoryview(b"async!" * 1000)], 777)
        await storage.write_zeroes(SIZE - 8192, 8192)
        await storage.flush()
        whole = bytearray(SIZE)
        await storage.readv([memoryview(whole)], 0)
        return [*results, bytes(whole)]

    try:
        *results, whole = asyncio.run(main())
        for (offset, length), data in zip(ranges, results, strict=True):
            assert data == image[1][offset : offset + length]
        expected = bytearray(image[1])
        expected[777 : 777 + 6000] = b"async!" * 1000
        expected[SIZE - 8192 :] = bytes(8192)
        assert whole == bytes(expected)
        # The blocking path still works on the same connection after the loop is gone.
        assert read_all(storage) == bytes(expected)
    finally:
        runtime.run_sync(storage.close())


def test_read_only_export(image: tuple[Path, bytes]) -> None:
    peer = start_qemu_nbd(image[0], "-r")
    try:
        with pytest.raises(ReadOnlyError, match="read-only") as caught:
            open_nbd(peer.uri, writable=True)
        assert peer.uri in str(caught.value)
        storage = open_nbd(peer.uri)
        try:
            assert storage.transmission_flags & TransmissionFlag.READ_ONLY
            with pytest.raises(ReadOnlyError, match="nbd"):
                runtime.run_sync(storage.writev([memoryview(b"x")], 0))
            with pytest.raises(ReadOnlyError):
                runtime.run_sync(storage.write_zeroes(0, 512))
            assert read_all(storage) == image[1]
        finally:
            runtime.run_sync(storage.close())
    finally:
        peer.stop()


@pytest.mark.parametrize("args", [["-A"], ["-e", "2"], ["-r", "-e", "3"]])
def test_qemu_nbd_options(image: tuple[Path, bytes], args: list[str]) -> None:
    peer = start_qemu_nbd(image[0], *args)
    try:
        storage = open_nbd(peer.uri, connections=3)
        try:
            multi = bool(storage.transmission_flags & TransmissionFlag.CAN_MULTI_CONN)
            # qemu-nbd -e 2 takes two clients: the third connection is given up.
            assert storage.connections == ((2 if "2" in args else 3) if multi else 1)
            assert read_all(storage) == image[1]
            ours = extents(storage)
        finally:
            runtime.run_sync(storage.close())
        assert ours == nbdinfo_map(peer.uri)  # after closing: qemu-nbd serves one client at a time
    finally:
        peer.stop()


def test_named_export_and_unknown_names(image: tuple[Path, bytes]) -> None:
    peer = start_qemu_nbd(image[0], export="vol 1")
    try:
        uri = peer.uri.replace("vol 1", "vol%201")
        storage = open_nbd(uri)
        try:
            assert read_all(storage)[:4096] == image[1][:4096]
        finally:
            runtime.run_sync(storage.close())
        with pytest.raises(NbdConnectionError, match="no export named 'other'") as caught:
            open_nbd(peer.uri_for("other"))
        assert "other" in caught.value.uri
    finally:
        peer.stop()


def test_qcow2_on_an_nbd_export(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    subprocess.run(
        [tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 64k 200k", "-c", "write -z 1M 64k", str(qcow2)],
        check=True,
        capture_output=True,
    )
    # An export cannot grow: room for the clusters the writes allocate, past the image's end.
    os.truncate(qcow2, 8 << 20)
    reference = tmp_path / "reference.raw"
    subprocess.run([tool("qemu-img"), "convert", "-O", "raw", str(qcow2), str(reference)], check=True)
    expected = bytearray(reference.read_bytes())
    peer = start_qemu_nbd(qcow2)  # -f raw: the container's bytes are the export
    try:
        with imago.open(peer.uri, format="qcow2", write=True) as disk:
            assert disk.size == 4 << 20
            assert _read_disk(disk) == bytes(expected)
            disk.write(b"\xa5" * 70000, 3 << 20)
            disk.write(b"hello", 5)
        expected[3 << 20 : (3 << 20) + 70000] = b"\xa5" * 70000
        expected[5:10] = b"hello"
        with imago.open(peer.uri, format="qcow2") as disk:
            assert _read_disk(disk) == bytes(expected)
    finally:
        peer.stop()
    result = subprocess.run([tool("qemu-img"), "check", "-f", "qcow2", str(qcow2)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    converted = tmp_path / "after.raw"
    subprocess.run([tool("qemu-img"), "convert", "-O", "raw", str(qcow2), str(converted)], check=True)
    assert converted.read_bytes() == bytes(expected)


def test_names_inside_images_on_nbd_never_connect(tmp_path: Path) -> None:
    # A listening socket that counts connections: the backing "URI" points at it.
    directory = short_dir()
    listener_path = os.path.join(directory, "trap")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listener_path)
    listener.listen(8)
    listener.setblocking(False)
    try:
        for backing in (f"nbd+unix:///?socket={listener_path}", "relative-base.qcow2"):
            top = tmp_path / "top.qcow2"
            subprocess.run(
                [tool("qemu-img"), "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(top), "1M"],
                check=True,
            )
            peer = start_qemu_nbd(top)
            try:
                for gate in (None, PermissiveImplicitOpenGate()):
                    with pytest.raises((ImplicitOpenDeniedError, FileNotFoundError)):
                        imago.open(peer.uri, format="qcow2", gate=gate)
            finally:
                peer.stop()
            top.unlink()
        # The local file that holds the URI-looking name is never the trap either.
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        os.unlink(listener_path)
        os.rmdir(directory)


def test_relative_names_are_refused(qemu_nbd: Peer) -> None:
    storage = open_nbd(qemu_nbd.uri)
    try:
        assert storage.resolve_relative_path("/abs/base.qcow2") == "/abs/base.qcow2"
        with pytest.raises(ImplicitOpenDeniedError, match="relative"):
            storage.resolve_relative_path("base.qcow2")
    finally:
        runtime.run_sync(storage.close())


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("nbd://", "needs a host"),
        ("nbd+unix:///export", "socket=PATH"),
        ("nbd+unix://host/export?socket=/s", "has no host"),
        ("nbd://host:99999/", "out of range"),
        ("nbd://host/?socket=/s", "socket= is for nbd"),
        ("nbd://host/?bogus=1", "unknown query parameter 'bogus'"),
        ("nbd://host/?tls-certificates=/d", "needs a TLS scheme"),
        ("nbds://host/?tls-type=psk", "only x509"),
        ("nbd://user@host/", "user names"),
        ("nbd://host/#frag", "fragment"),
        ("http://host/", "scheme must be one of"),
        ("nbd://host/a%00b", "NUL"),
    ],
)
def test_malformed_uris(uri: str, problem: str) -> None:
    with pytest.raises(InvalidOptionError, match=problem) as caught:
        open_nbd(uri)
    assert uri in str(caught.value)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"connections": 0}, "connections"),
        ({"requests": "many"}, "requests"),
        ({"timeout": -1}, "timeout"),
        ({"tls_certificates": 5}, "tls_certificates"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_driver_options(options: dict[str, object], option: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        open_nbd("nbd+unix:///?socket=/nonexistent", **options)
    assert caught.value.option == option


def test_connection_refused_and_closed_storage(qemu_nbd: Peer) -> None:
    missing = os.path.join(short_dir(), "none")
    with pytest.raises(NbdConnectionError, match="cannot connect"):
        open_nbd(f"nbd+unix:///?socket={missing}")
    os.rmdir(os.path.dirname(missing))
    with pytest.raises(InvalidOptionError, match="filename"):
        Nbd.open_sync(StorageOpenOptions(driver="nbd"))
    storage = open_nbd(qemu_nbd.uri)
    runtime.run_sync(storage.close())
    runtime.run_sync(storage.close())  # idempotent
    with pytest.raises(ClosedError):
        read_all(storage)
    with pytest.raises(ClosedError):
        runtime.run_sync(storage.data_extent(0, 512))
    with pytest.raises(ImagoError):
        runtime.run_sync(storage.flush())


def test_tcp(image: tuple[Path, bytes]) -> None:
    peer = start_qemu_nbd(image[0], "-e", "2", export="disk", tcp=True)
    try:
        assert peer.uri.startswith("nbd://127.0.0.1:")
        storage = open_nbd(peer.uri, connections=2)
        try:
            assert storage.connections == 2
            assert read_all(storage) == image[1]
        finally:
            runtime.run_sync(storage.close())
    finally:
        peer.stop()
