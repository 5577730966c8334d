"""The ``file`` storage with ``direct=True`` (``O_DIRECT``): alignment probing and bounce buffers."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random

import pytest

import imago
from imago import PreallocateMode, runtime
from imago.io_buffers import aligned_buffer
from imago_file import File, syscalls

ALIGNMENTS = (1, 512, 1024, 2048, 4096)
SIZE = 256 * 1024 + 123  # deliberately not a multiple of any alignment


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def read(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xa5") * length
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def write(storage: File, data: bytes, offset: int) -> None:
    runtime.run_sync(storage.writev([memoryview(data)], offset))


def expected_read(data: bytes, offset: int, length: int) -> bytes:
    chunk = data[offset : offset + length]
    return chunk + bytes(length - len(chunk))


def apply(model: bytearray, data: bytes, offset: int) -> None:
    end = offset + len(data)
    if end > len(model):
        model.extend(bytes(end - len(model)))
    model[offset:end] = data


@pytest.fixture
def data() -> bytes:
    return pattern(SIZE, seed=42)


@pytest.fixture
def image(make_image, data):
    return make_image(data)


@pytest.fixture
def direct(image, open_file) -> File:
    storage = open_file(image, writable=True, direct=True)
    assert storage.direct
    return storage


# --- alignment probing ------------------------------------------------------------------------------


@pytest.fixture
def without_statx(monkeypatch):
    """Hide ``statx(STATX_DIOALIGN)``, as on kernels before 6.1: the driver must probe by reading."""
    monkeypatch.setattr(syscalls, "direct_io_alignment", lambda fd: None)


def check_alignment_against_kernel(path, mem_align: int, req_align: int, data_at: int = 0) -> None:
    """The alignment works for O_DIRECT reads of data, and half the request alignment does not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned_buffer(3 * 4096, 4096)
        assert os.preadv(fd, [buf[:req_align]], data_at + req_align) == req_align
        assert os.preadv(fd, [buf[mem_align : mem_align + req_align]], data_at) == req_align
        with pytest.raises(OSError) as info:  # noqa: PT011
            os.preadv(fd, [buf[: req_align // 2]], data_at)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_alignment_is_what_the_kernel_reports(direct, image):
    assert direct.req_align in ALIGNMENTS
    assert direct.req_align > 1  # no local file system does byte-granular O_DIRECT
    assert direct.mem_align in ALIGNMENTS
    reported = syscalls.direct_io_alignment(direct.fileno())
    if reported is not None:
        assert (direct.mem_align, direct.req_align) == reported
    check_alignment_against_kernel(image, direct.mem_align, direct.req_align)


def test_alignment_probed_by_reading(image, open_file, without_statx):
    storage = open_file(image, writable=True, direct=True)
    assert storage.req_align in ALIGNMENTS
    assert storage.req_align > 1
    assert storage.mem_align in ALIGNMENTS
    check_alignment_against_kernel(image, storage.mem_align, storage.req_align)


def test_probing_finds_data_after_a_hole(tmp_path, open_file, without_statx):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(pattern(64 * 1024))
    storage = open_file(path, direct=True)
    check_alignment_against_kernel(path, storage.mem_align, storage.req_align, data_at=1 << 20)


@pytest.mark.parametrize("size", [0, 1, 100, 4095])
def test_small_files_fall_back_to_4096(make_image, open_file, without_statx, size):
    storage = open_file(make_image(pattern(size)), direct=True)
    assert (storage.mem_align, storage.req_align) == (4096, 4096)


def test_sparse_files_fall_back_to_4096(tmp_path, open_file, without_statx):
    # Reads of holes succeed at any alignment: they cannot tell what O_DIRECT needs.
    path = tmp_path / "hole.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    storage = open_file(path, direct=True)
    assert (storage.mem_align, storage.req_align) == (4096, 4096)
    assert read(storage, 3, 5000) == bytes(5000)


def test_file_descriptor_is_direct(direct, open_file, image):
    assert fcntl.fcntl(direct.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    buffered = open_file(image, force_share=True)  # *direct* holds the image for writing
    assert not fcntl.fcntl(buffered.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    assert "direct" in repr(direct)


def test_non_direct_needs_no_alignment(image, open_file):
    storage = open_file(image)
    assert (storage.mem_align, storage.req_align) == (1, 1)


@pytest.mark.parametrize("statx", [True, False], ids=["statx", "probe"])
@pytest.mark.parametrize("size", [0, 100, 4096, SIZE])
@pytest.mark.parametrize("writable", [False, True])
def test_probing_never_writes(make_image, monkeypatch, statx, size, writable):
    if not statx:
        monkeypatch.setattr(syscalls, "direct_io_alignment", lambda fd: None)
    content = pattern(size)
    path = make_image(content)
    past = 1_000_000_000_000_000_000  # an mtime far in the past: any write would move it to now
    os.utime(path, ns=(past, past))
    storage = File.open_sync(imago.StorageOpenOptions(filename=path, writable=writable, direct=True))
    runtime.run_sync(storage.close())
    stat = path.stat()
    assert stat.st_mtime_ns == past
    assert stat.st_size == size
    assert path.read_bytes() == content


# --- reads ------------------------------------------------------------------------------------------


def test_aligned_reads(direct, data):
    align = direct.req_align
    for offset in (0, align, 10 * align, SIZE // align * align):  # the last one straddles the end
        for blocks in (1, 3, 16):
            buf = aligned_buffer(blocks * align, max(direct.mem_align, 4096))
            buf[:] = b"\xee" * buf.nbytes
            runtime.run_sync(direct.readv([buf], offset))
            assert bytes(buf) == expected_read(data, offset, blocks * align)


READ_CASES = [
    (0, 1),
    (1, 1),
    (3, 509),
    (511, 2),
    (511, 514),
    (1000, 5000),
    (4095, 4097),
    (12_345, 67_891),
    (SIZE - 1, 1),
    (SIZE - 100, 300),  # straddles the end
    (SIZE, 1000),  # at the end
    (SIZE + 7, 33),  # past it
    (0, SIZE),
    (1, SIZE + 1000),
]


@pytest.mark.parametrize(("offset", "length"), READ_CASES)
def test_misaligned_reads(direct, data, offset, length):
    assert read(direct, offset, length) == expected_read(data, offset, length)
    buf = bytearray(length)
    direct.readv_inline([memoryview(buf)], offset)
    assert buf == expected_read(data, offset, length)


@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (512, 8192), (7, 5000), (SIZE - 10, 4096)])
@pytest.mark.parametrize("shift", [1, 3, 64, 511, 512, 513])
def test_misaligned_buffer_addresses(direct, data, offset, length, shift):
    base = aligned_buffer(length + 2 * 4096, 4096)
    view = base[shift : shift + length]
    view[:] = b"\x77" * length
    runtime.run_sync(direct.readv([view], offset))
    assert bytes(view) == expected_read(data, offset, length)


def test_mixed_vector_read(direct, data):
    base = aligned_buffer(64 * 1024, 4096)
    align = direct.req_align
    # An aligned piece, a misaligned address, an odd length, an empty one and another aligned piece.
    parts = [
        base[0:align],
        base[4096 + 1 : 4096 + 1 + align],
        base[16384 : 16384 + 3],
        base[20000:20000],
        base[24576:28672],
    ]
    for part in parts:
        part[:] = b"\x99" * part.nbytes
    runtime.run_sync(direct.readv(parts, align))
    total = sum(p.nbytes for p in parts)
    assert b"".join(bytes(p) for p in parts) == expected_read(data, align, total)


def test_large_misaligned_read_crosses_bounce_chunks(make_image, open_file):
    big = pattern(9 * (1 << 20) + 1, seed=3)
    storage = open_file(make_image(big), direct=True)
    assert read(storage, 5, len(big) - 3) == big[5:] + bytes(2)


def test_read_only_direct(image, open_file, data):
    storage = open_file(image, direct=True)
    assert read(storage, 3, 1000) == data[3:1003]
    with pytest.raises(imago.ReadOnlyError):
        write(storage, b"x", 0)
    with pytest.raises(imago.ReadOnlyError):
        write(storage, b"x" * storage.req_align, 0)


# --- writes -----------------------------------------------------------------------------------------


def test_aligned_write(direct, image, data):
    align = direct.req_align
    buf = aligned_buffer(4 * align, max(direct.mem_align, 4096))
    buf[:] = pattern(4 * align, seed=1)
    runtime.run_sync(direct.writev([buf], 2 * align))
    model = bytearray(data)
    apply(model, bytes(buf), 2 * align)
    assert image.read_bytes() == model
    assert direct.size == SIZE


@pytest.mark.parametrize(("offset", "length"), [(513, 1), (511, 2), (1023, 1), (1024, 1), (4095, 2), (100, 9000)])
def test_read_modify_write_keeps_neighbours(direct, image, data, offset, length):
    new = b"\xff" * length if data[offset : offset + length] != b"\xff" * length else b"\0" * length
    write(direct, new, offset)
    content = image.read_bytes()
    assert content[offset : offset + length] == new
    assert content[:offset] == data[:offset]
    assert content[offset + length :] == data[offset + length :]
    assert len(content) == SIZE


def test_random_writes_match_buffered_reference(make_image, open_file, data):
    direct_path = make_image(data, "direct.img")
    reference_path = make_image(data, "reference.img")
    direct = open_file(direct_path, writable=True, direct=True)
    reference = open_file(reference_path, writable=True)
    rng = random.Random(7)
    base = aligned_buffer(80 * 1024, 4096)
    for step in range(150):
        length = rng.choice([1, 2, 3, 511, 512, 513, 1000, 4096, 4097, rng.randrange(1, 70_000)])
        offset = rng.choice([rng.randrange(0, SIZE + 5000), rng.randrange(0, 600) * 512])
        shift = rng.choice([0, 0, 1, 7, 512, 4096])
        view = base[shift : shift + length]
        view[:] = pattern(length, seed=step)
        if rng.random() < 0.3:
            cut = rng.randrange(0, length + 1)
            bufs = [view[:cut], view[cut:]]
        else:
            bufs = [view]
        runtime.run_sync(direct.writev(bufs, offset))
        runtime.run_sync(reference.writev(bufs, offset))
        assert direct.size == reference.size
        if step % 10 == 0:
            assert direct_path.read_bytes() == reference_path.read_bytes()
        probe_offset, probe_length = rng.randrange(0, direct.size + 100), rng.randrange(1, 20_000)
        assert read(direct, probe_offset, probe_length) == read(reference, probe_offset, probe_length)
    assert direct_path.read_bytes() == reference_path.read_bytes()
    assert direct_path.stat().st_size == reference.size


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE, 1),  # appending one byte
        (SIZE - 5, 10),  # straddling the end
        (SIZE + 3, 5),  # leaving a gap in the same block
        (SIZE + 10_001, 77),  # leaving a gap of several blocks
        (SIZE + 1, 5 * (1 << 20) + 3),  # several bounce chunks
        ((SIZE // 4096 + 3) * 4096, 4096),  # aligned, past the end
    ],
)
def test_write_past_eof_has_exact_size(direct, image, data, offset, length):
    new = pattern(length, seed=offset)
    write(direct, new, offset)
    model = bytearray(data)
    apply(model, new, offset)
    assert direct.size == offset + length
    assert image.stat().st_size == offset + length
    assert image.read_bytes() == model
    assert read(direct, SIZE - 10, offset + length - SIZE + 1000) == expected_read(
        bytes(model), SIZE - 10, offset + length - SIZE + 1000
    )


def test_misaligned_write_to_small_file(make_image, open_file):
    path = make_image(b"abc")
    storage = open_file(path, writable=True, direct=True)
    write(storage, b"XY", 1)
    assert path.read_bytes() == b"aXY"
    write(storage, b"!", 5)
    assert path.read_bytes() == b"aXY\0\0!"
    assert storage.size == 6


def test_writes_from_read_only_buffers(direct, image, data):
    write(direct, bytes(range(256)) * 8, 1024)  # bytes: never passed to O_DIRECT as they are
    write(direct, b"odd", 7)
    model = bytearray(data)
    apply(model, bytes(range(256)) * 8, 1024)
    apply(model, b"odd", 7)
    assert image.read_bytes() == model


def test_bounce_path_for_misaligned_memory(direct, image, data):
    """Force the memory-alignment bounce path even where the kernel accepts any address."""
    direct._mem_align = 4096  # white box: the probe may find 1 on kernels that allow it
    base = aligned_buffer(3 * 4096, 4096)
    base[:] = pattern(3 * 4096, seed=5)
    view = base[1 : 1 + 8192]
    runtime.run_sync(direct.writev([view], 4096))
    model = bytearray(data)
    apply(model, bytes(view), 4096)
    assert image.read_bytes() == model
    target = base[3 : 3 + 8192]
    runtime.run_sync(direct.readv([target], 4096))
    assert bytes(target) == model[4096 : 4096 + 8192]


# --- concurrency ------------------------------------------------------------------------------------


def _pieces(rng: random.Random, start: int, end: int, largest: int) -> list[tuple[int, bytes]]:
    """Split ``[start, end)`` into adjacent pieces of 1..largest bytes, each with its own bytes."""
    pieces = []
    pos = start
    while pos < end:
        length = min(rng.randint(1, largest), end - pos)
        pieces.append((pos, pattern(length, seed=pos)))
        pos += length
    return pieces


@pytest.mark.parametrize("largest", [1, 40, 700])
def test_concurrent_misaligned_writes_in_shared_blocks(direct, image, data, largest):
    rng = random.Random(largest)
    pieces = _pieces(rng, 100, 12_000 if largest > 1 else 3_000, largest)
    rng.shuffle(pieces)

    async def main():
        await asyncio.gather(*(direct.writev([memoryview(chunk)], offset) for offset, chunk in pieces))

    asyncio.run(main())
    model = bytearray(data)
    for offset, chunk in pieces:
        apply(model, chunk, offset)
    assert image.read_bytes() == model


def test_concurrent_writes_with_reads(direct, image, data):
    rng = random.Random(11)
    pieces = _pieces(rng, 0, 20_000, 300)
    rng.shuffle(pieces)
    untouched = (100_000, 50_000)

    async def check_untouched():
        buf = bytearray(untouched[1])
        await direct.readv([memoryview(buf)], untouched[0] + 3)
        return bytes(buf)

    async def main():
        writes = [direct.writev([memoryview(chunk)], offset) for offset, chunk in pieces]
        reads = [check_untouched() for _ in range(20)]
        return await asyncio.gather(*writes, *reads)

    results = asyncio.run(main())
    for result in results[len(pieces) :]:
        assert result == data[untouched[0] + 3 : untouched[0] + 3 + untouched[1]]
    model = bytearray(data)
    for offset, chunk in pieces:
        apply(model, chunk, offset)
    assert image.read_bytes() == model


@pytest.mark.parametrize("spacing", [600, 4096 + 100])
def test_concurrent_misaligned_writes_past_eof(direct, image, data, spacing):
    """Writes past the end in different blocks: none may cut off another's data."""
    rng = random.Random(spacing)
    pieces = [(SIZE + 50 + i * spacing, pattern(10 + i, seed=i)) for i in range(40)]
    rng.shuffle(pieces)

    async def main():
        await asyncio.gather(*(direct.writev([memoryview(chunk)], offset) for offset, chunk in pieces))

    asyncio.run(main())
    model = bytearray(data)
    for offset, chunk in pieces:
        apply(model, chunk, offset)
    assert direct.size == len(model)
    assert image.stat().st_size == len(model)
    assert image.read_bytes() == model


def test_concurrent_aligned_and_misaligned_writes_past_eof(direct, image, data):
    align = direct.req_align
    end_block = -(-SIZE // align) * align
    aligned = aligned_buffer(align, max(direct.mem_align, 4096))
    aligned[:] = b"A" * align
    jobs = [(SIZE + 1, b"misaligned"), (end_block + 4 * align, bytes(aligned))]

    async def main():
        await asyncio.gather(
            direct.writev([memoryview(b"misaligned")], SIZE + 1),
            direct.writev([aligned], end_block + 4 * align),
        )

    asyncio.run(main())
    model = bytearray(data)
    for offset, chunk in jobs:
        apply(model, chunk, offset)
    assert image.read_bytes() == model
    assert direct.size == len(model)


@pytest.mark.parametrize("unmap", [False, True])
def test_concurrent_write_zeroes_and_misaligned_writes_in_shared_blocks(direct, image, data, unmap):
    """Zeroing must not be undone by a read-modify-write of the same block that read the old data."""
    jobs = []
    for block in range(0, 256 * 1024, 512):
        jobs.append(("write", block + 10, pattern(20, seed=block)))
        jobs.append(("zero", block + 100, 50))

    async def main():
        await asyncio.gather(
            *(
                direct.writev([memoryview(arg)], offset)
                if kind == "write"
                else direct.write_zeroes(offset, arg, unmap=unmap)
                for kind, offset, arg in jobs
            )
        )

    asyncio.run(main())
    model = bytearray(data)
    for kind, offset, arg in jobs:
        apply(model, arg if kind == "write" else bytes(arg), offset)
    assert image.read_bytes() == model


def test_sync_write_inside_a_loop_while_the_block_is_busy(direct, image, data):
    """A synchronous call cannot wait for an async write holding the same block: it says so."""

    async def main():
        busy = asyncio.ensure_future(direct.writev([memoryview(b"async")], 1001))
        await asyncio.sleep(0)  # let it take its range lock and hand its I/O to a thread
        with pytest.raises(imago.SuspendedInSyncModeError):
            runtime.run_sync(direct.writev([memoryview(b"sync")], 1010))
        await busy
        # Once the block is free again, synchronous use works inside the loop.
        runtime.run_sync(direct.writev([memoryview(b"sync")], 1010))

    asyncio.run(main())
    model = bytearray(data)
    apply(model, b"async", 1001)
    apply(model, b"sync", 1010)
    assert image.read_bytes() == model


# --- zeroes, discard, resize with O_DIRECT ----------------------------------------------------------


@pytest.mark.parametrize("unmap", [False, True])
def test_direct_write_zeroes(direct, image, data, unmap):
    runtime.run_sync(direct.write_zeroes(1001, 30_000, unmap=unmap))
    runtime.run_sync(direct.write_zeroes(SIZE - 3, 10, unmap=unmap))
    model = bytearray(data)
    apply(model, bytes(30_000), 1001)
    apply(model, bytes(10), SIZE - 3)
    assert image.read_bytes() == model
    assert read(direct, 0, len(model)) == model
    assert direct.size == SIZE + 7


@pytest.mark.parametrize("mode", list(PreallocateMode), ids=lambda m: m.name)
def test_direct_resize(direct, image, data, mode):
    runtime.run_sync(direct.resize(SIZE + 100_003, mode))
    assert image.read_bytes() == data + bytes(100_003)
    assert direct.size == SIZE + 100_003
    runtime.run_sync(direct.resize(1001, mode))
    assert image.read_bytes() == data[:1001]
    write(direct, b"tail", 2000)
    assert image.read_bytes() == data[:1001] + bytes(999) + b"tail"


def test_direct_discard(direct, image, data):
    runtime.run_sync(direct.discard(8192, 65_536))
    content = image.read_bytes()
    assert content[:8192] == data[:8192]
    assert content[8192 + 65_536 :] == data[8192 + 65_536 :]
    assert direct.size == SIZE


@pytest.mark.parametrize("unmap", [False, True])
def test_direct_write_zeroes_without_fallocate(direct, image, data, monkeypatch, unmap):
    def fallocate(*args):
        raise OSError(errno.EOPNOTSUPP, "injected: not supported")

    monkeypatch.setattr(syscalls, "fallocate", fallocate)
    runtime.run_sync(direct.write_zeroes(1001, 30_000, unmap=unmap))
    runtime.run_sync(direct.write_zeroes(SIZE - 3, 10, unmap=unmap))
    model = bytearray(data)
    apply(model, bytes(30_000), 1001)
    apply(model, bytes(10), SIZE - 3)
    assert image.read_bytes() == model
    assert direct.size == SIZE + 7


@pytest.mark.parametrize("offset", [0, 7, SIZE, SIZE + 5, SIZE + 10_000])
def test_direct_empty_write(direct, image, data, offset):
    runtime.run_sync(direct.writev([memoryview(b"")], offset))
    runtime.run_sync(direct.writev([], offset))
    assert direct.size == SIZE
    assert image.read_bytes() == data


def test_direct_short_read_is_taken_as_the_end_of_file(tmp_path, monkeypatch):
    # A short O_DIRECT read means the file ended there (it may have grown since, under
    # concurrent writes): the rest reads as zero instead of a retry at an unaligned offset,
    # which O_DIRECT refuses with EINVAL.
    import os

    import imago
    import imago_file.storage
    from imago_file import File

    path = tmp_path / "grows.img"
    data = bytes(range(256)) * 32  # 8 KiB
    path.write_bytes(data)
    storage = File.open_sync(imago.StorageOpenOptions(filename=path, direct=True))
    real_preadv = os.preadv
    calls = []

    def short_first(fd, bufs, offset, *flags):
        calls.append(offset)
        if len(calls) == 1:  # as if the file had ended 700 bytes into this read
            count = real_preadv(fd, bufs, offset, *flags)
            return min(count, 700)
        return real_preadv(fd, bufs, offset, *flags)

    monkeypatch.setattr(imago_file.storage.os, "preadv", short_first)
    try:
        buf = bytearray(1000)
        imago.runtime.run_sync(storage.readv([memoryview(buf)], 100))  # misaligned: bounced
        assert bytes(buf[:600]) == data[100:700]
        assert bytes(buf[600:]) == bytes(400)
        assert len(calls) == 1
    finally:
        imago.runtime.run_sync(storage.close())
