"""The ``nbd`` storage driver against nbdkit (plugins and filters) and nbd-server (simple replies)."""

from __future__ import annotations

import asyncio
import errno
import random
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imago import ImagoError, runtime
from imago_nbd.client import Nbd
from imago_nbd.constants import TransmissionFlag
from imago_nbd.errors import NbdConnectionError, NbdServerError

from ._client import extents, nbdinfo_map, open_nbd, read_all
from ._peers import Peer, start_nbd_server, start_nbdkit, tool

SIZE = 4 << 20


@pytest.fixture
def stop_later() -> Iterator[list[Peer]]:
    """Peers to stop when the test ends."""
    peers: list[Peer] = []
    yield peers
    for peer in peers:
        peer.stop()


def _closing(storage: Nbd) -> None:
    runtime.run_sync(storage.close())


def test_nbdkit_memory_multi_conn(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("memory", f"size={SIZE}")
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    try:
        assert storage.transmission_flags & TransmissionFlag.CAN_MULTI_CONN
        assert storage.connections == 4
        rng = random.Random(5)
        model = bytearray(SIZE)
        for _ in range(30):
            offset = rng.randrange(SIZE - 100000)
            data = rng.randbytes(rng.randrange(1, 100000))
            runtime.run_sync(storage.writev([memoryview(data)], offset))
            model[offset : offset + len(data)] = data
        runtime.run_sync(storage.write_zeroes(1000, 200000, unmap=True))
        model[1000:201000] = bytes(200000)
        runtime.run_sync(storage.discard(1 << 20, 1 << 20))  # contents undefined afterwards
        model[1 << 20 : 2 << 20] = bytes(1 << 20)  # nbdkit memory reads trimmed space as zero
        runtime.run_sync(storage.flush())
        assert read_all(storage) == bytes(model)

        async def spread() -> bytes:
            buffers = [bytearray(65536) for _ in range(SIZE // 65536)]
            await asyncio.gather(
                *(storage.readv([memoryview(buf)], index * 65536) for index, buf in enumerate(buffers))
            )
            return b"".join(buffers)

        assert asyncio.run(spread()) == bytes(model)
        ours = extents(storage)
        assert ours == nbdinfo_map(peer.uri)
    finally:
        _closing(storage)


def test_nbdkit_file(stop_later: list[Peer], tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random.Random(2).randbytes(SIZE - 12345)  # not a multiple of anything
    path.write_bytes(data)
    peer = start_nbdkit("file", str(path))
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    try:
        assert storage.size == len(data)
        assert read_all(storage) == data
        runtime.run_sync(storage.writev([memoryview(b"tail!")], len(data) - 5))
        runtime.run_sync(storage.flush())
    finally:
        _closing(storage)
    assert path.read_bytes() == data[:-5] + b"tail!"


def test_nbdkit_sparse_random(stop_later: list[Peer], tmp_path: Path) -> None:
    peer = start_nbdkit("sparse-random", "size=8M", "seed=42", "percent=30", "runlength=65536")
    stop_later.append(peer)
    reference = tmp_path / "reference.raw"
    subprocess.run([tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", peer.uri, str(reference)], check=True)
    expected_map = nbdinfo_map(peer.uri)
    storage = open_nbd(peer.uri)
    try:
        assert read_all(storage) == reference.read_bytes()
        ours = extents(storage)
    finally:
        _closing(storage)
    assert ours == expected_map
    assert any(not is_data for _, _, is_data in ours)
    assert any(is_data for _, _, is_data in ours)


def test_nbdkit_pattern(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("pattern", f"size={SIZE}")
    stop_later.append(peer)
    storage = open_nbd(peer.uri)
    try:
        expected = b"".join(struct.pack(">Q", offset) for offset in range(0, SIZE, 8))
        assert read_all(storage) == expected
        piece = bytearray(1001)
        runtime.run_sync(storage.readv([memoryview(piece)], 4093))
        assert bytes(piece) == expected[4093:5094]
    finally:
        _closing(storage)


def test_nbdkit_error_filter(stop_later: list[Peer]) -> None:
    peer = start_nbdkit(
        "memory",
        f"size={SIZE}",
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        filters=["error"],
    )
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    try:
        with pytest.raises(NbdServerError) as caught:
            read_all(storage)
        assert caught.value.errno == errno.EIO
        assert caught.value.command == "READ"
        assert peer.uri in str(caught.value)
        with pytest.raises(NbdServerError) as caught:
            runtime.run_sync(storage.writev([memoryview(b"x" * 4096)], 8192))
        assert caught.value.errno == errno.ENOSPC
        assert (caught.value.command, caught.value.offset, caught.value.length) == ("WRITE", 8192, 4096)
        assert isinstance(caught.value, OSError)
        # The connection survives error replies.
        runtime.run_sync(storage.write_zeroes(0, 4096))

        async def under_loop() -> None:
            buf = bytearray(8192)
            await storage.readv([memoryview(buf)], 0)

        with pytest.raises(NbdServerError, match="READ"):
            asyncio.run(under_loop())
    finally:
        _closing(storage)


def test_server_killed_mid_request(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("memory", f"size={SIZE}", "delay-read=30", filters=["delay"])
    stop_later.append(peer)
    storage = open_nbd(peer.uri, connections=1)
    outcome: list[BaseException] = []

    def reader() -> None:
        try:
            read_all(storage)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=reader, daemon=True)  # a hung read must not hang the run
    thread.start()
    try:
        # Kill the server while the read waits for its (delayed) reply.
        threading.Event().wait(0.3)
        peer.kill()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the read hung after the server died"
        assert len(outcome) == 1
        assert isinstance(outcome[0], NbdConnectionError)
        assert isinstance(outcome[0], ImagoError)
        with pytest.raises(NbdConnectionError, match="broken"):
            read_all(storage)
    finally:
        thread.join(timeout=20)
        _closing(storage)


def test_server_killed_under_asyncio(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("memory", f"size={SIZE}", "delay-read=30", filters=["delay"])
    stop_later.append(peer)
    storage = open_nbd(peer.uri)

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.3, peer.kill)
        reads = [storage.readv([memoryview(bytearray(4096))], index * 4096) for index in range(40)]
        await asyncio.wait_for(asyncio.gather(*reads), timeout=20)

    try:
        with pytest.raises(NbdConnectionError):
            asyncio.run(main())
    finally:
        _closing(storage)


def test_nbdkit_noextents_and_nozero(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("memory", f"size={SIZE}", filters=["noextents", "nozero"])
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    try:
        assert not storage.transmission_flags & TransmissionFlag.SEND_WRITE_ZEROES
        runtime.run_sync(storage.writev([memoryview(b"\x77" * 10000)], 0))
        runtime.run_sync(storage.write_zeroes(10, 5000))  # written as zero buffers
        expected = b"\x77" * 10 + bytes(5000) + b"\x77" * 4990 + bytes(SIZE - 10000)
        assert read_all(storage) == expected
        assert extents(storage) == [(0, SIZE, True)]  # no holes reported
    finally:
        _closing(storage)
    assert nbdinfo_map(peer.uri) == [(0, SIZE, True)]


def test_nbdkit_blocksize_policy(stop_later: list[Peer]) -> None:
    peer = start_nbdkit(
        "memory",
        f"size={SIZE}",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
        filters=["blocksize-policy"],
    )
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    rng = random.Random(9)
    model = bytearray(SIZE)
    try:
        assert (storage.block_size.minimum, storage.block_size.maximum) == (4096, 65536)
        assert storage.req_align == 4096
        for _ in range(15):
            offset = rng.randrange(SIZE - 300000)
            data = rng.randbytes(rng.randrange(1, 300000))  # unaligned, over the maximum
            runtime.run_sync(storage.writev([memoryview(data)], offset))
            model[offset : offset + len(data)] = data
        runtime.run_sync(storage.write_zeroes(4097, 200000))
        model[4097:204097] = bytes(200000)
        runtime.run_sync(storage.discard(100, 100000))  # only whole blocks: contents there undefined
        runtime.run_sync(storage.writev([memoryview(bytes(100000))], 100))
        model[100:100100] = bytes(100000)
        assert read_all(storage) == bytes(model)
        for _ in range(10):
            offset = rng.randrange(SIZE - 200000)
            piece = bytearray(rng.randrange(1, 200000))
            runtime.run_sync(storage.readv([memoryview(piece)], offset))
            assert bytes(piece) == model[offset : offset + len(piece)]
    finally:
        _closing(storage)


def test_nbd_server_simple_replies(stop_later: list[Peer], tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    data = random.Random(4).randbytes(SIZE)
    path.write_bytes(data)
    peer = start_nbd_server(path)
    stop_later.append(peer)
    storage = open_nbd(peer.uri, writable=True)
    try:
        assert storage.size == SIZE
        assert read_all(storage) == data
        assert extents(storage) == [(0, SIZE, True)]  # no block status without structured replies
        runtime.run_sync(storage.writev([memoryview(b"written by imago")], 1 << 20))
        runtime.run_sync(storage.write_zeroes(2 << 20, 8192))
        runtime.run_sync(storage.flush())

        async def under_loop() -> bytes:
            buf = bytearray(SIZE)
            await storage.readv([memoryview(buf)], 0)
            return bytes(buf)

        expected = bytearray(data)
        expected[1 << 20 : (1 << 20) + 16] = b"written by imago"
        expected[2 << 20 : (2 << 20) + 8192] = bytes(8192)
        assert asyncio.run(under_loop()) == bytes(expected)
    finally:
        _closing(storage)
    assert path.read_bytes() == bytes(expected)
    with pytest.raises(NbdConnectionError, match="no export named 'nope'"):
        open_nbd(peer.uri_for("nope"))


def test_blocking_call_inside_a_running_loop_with_reads_in_flight(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("pattern", f"size={SIZE}")
    stop_later.append(peer)
    storage = open_nbd(peer.uri, connections=2, requests=2)
    expected = b"".join(struct.pack(">Q", offset) for offset in range(0, SIZE, 8))

    async def main() -> None:
        buffers = [bytearray(32768) for _ in range(32)]
        tasks = [
            asyncio.ensure_future(storage.readv([memoryview(buf)], index * 32768)) for index, buf in enumerate(buffers)
        ]
        await asyncio.sleep(0)  # the tasks send their first requests
        # Driven synchronously (inline) while the tasks' replies are on the same connections.
        assert runtime.run_sync(_read(storage, 12345, 100000)) == expected[12345:112345]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        for index, buf in enumerate(buffers):
            assert bytes(buf) == expected[index * 32768 : (index + 1) * 32768]

    try:
        asyncio.run(main())
    finally:
        _closing(storage)


async def _read(storage: Nbd, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


def test_cancelled_read_leaves_the_buffer_alone(stop_later: list[Peer]) -> None:
    peer = start_nbdkit("pattern", f"size={SIZE}", "delay-read=400ms", filters=["delay"])
    stop_later.append(peer)
    storage = open_nbd(peer.uri, connections=1)
    abandoned = bytearray(b"\xee" * 65536)

    async def main() -> bytes:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(storage.readv([memoryview(abandoned)], 0), timeout=0.05)
        # The next read's reply comes after the abandoned one's, on the same connection.
        return await _read(storage, 65536, 8)

    try:
        assert asyncio.run(main()) == struct.pack(">Q", 65536)
        assert abandoned == b"\xee" * 65536
    finally:
        _closing(storage)
