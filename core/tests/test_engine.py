"""The generic I/O engine (FormatAccess) driven by a test format driver with every mapping kind."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

import imago
from imago import (
    DenyImplicitOpenGate,
    FormatAccess,
    FormatDriver,
    FormatDriverBuilder,
    ImagoError,
    ImplicitOpenGate,
    InvalidRequestError,
    Mapping,
    ReadOnlyError,
    ShallowIndirect,
    ShallowMapping,
    ShallowRaw,
    ShallowSpecial,
    ShallowZero,
    Storage,
    SyncFormatAccess,
    UnsupportedFeatureError,
    runtime,
)
from imago_null import Null
from imago_raw import Raw

BLOCK = 4096


class MemoryStorage(Storage):
    """A storage over a bytearray, with alignment settable for tests."""

    name = "memory-test"

    def __init__(self, size: int, align: int = 1) -> None:
        self.data = bytearray(size)
        self._align = align

    @classmethod
    async def open(cls, options):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def mem_align(self) -> int:
        return self._align

    @property
    def req_align(self) -> int:
        return self._align

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        for view in bufs:
            chunk = self.data[offset : offset + view.nbytes]
            view[: len(chunk)] = chunk
            view[len(chunk) :] = bytes(view.nbytes - len(chunk))
            offset += view.nbytes

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        for view in bufs:
            end = offset + view.nbytes
            if end > len(self.data):
                self.data.extend(bytes(end - len(self.data)))
            self.data[offset:end] = view
            offset = end

    async def resize(self, new_size, prealloc=None):  # type: ignore[no-untyped-def]
        del self.data[new_size:]
        self.data.extend(bytes(new_size - len(self.data)))


class BlockDriver(FormatDriver):
    """A toy format: a table says, per 4 KiB block, where its data is.

    Table values: ("data", host_block) | ("zero", explicit) | ("backing",) | ("special",).
    Special blocks read as the byte value (block index % 251) repeated. Writes allocate a new
    host block (copying the backing or special content when not overwritten).
    """

    name = "blocktest"

    def __init__(self, storage: Storage, size: int, backing: FormatAccess | None, writable: bool) -> None:
        self._storage = storage
        self._size = size
        self._backing = backing
        self._writable = writable
        self.table: list[tuple[object, ...]] = [("backing",) if backing else ("zero", False)] * (size // BLOCK)
        self.next_host = 0
        self.get_mapping_calls = 0

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[BlockDriver], gate: ImplicitOpenGate) -> BlockDriver:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def storage(self) -> Storage:
        return self._storage

    @property
    def backing(self) -> FormatAccess | None:
        return self._backing

    def _run(self, offset: int, max_length: int) -> tuple[tuple[object, ...], int]:
        index = offset // BLOCK
        entry = self.table[index]
        length = BLOCK - offset % BLOCK
        while length < max_length and index + 1 < len(self.table):
            following = self.table[index + 1]
            contiguous = (
                following[0] == entry[0] == "data" and following[1] == entry[1] + (length + offset % BLOCK) // BLOCK  # type: ignore[operator]
            ) or (following == entry and entry[0] != "data")
            if not contiguous:
                break
            index += 1
            length += BLOCK
        return entry, length

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        self.get_mapping_calls += 1
        entry, length = self._run(offset, max_length)
        within = offset % BLOCK
        if entry[0] == "data":
            return ShallowRaw(self._storage, entry[1] * BLOCK + within, self._writable), length  # type: ignore[operator]
        if entry[0] == "zero":
            return ShallowZero(bool(entry[1])), length
        if entry[0] == "special":
            return ShallowSpecial(offset), min(length, BLOCK - within)
        assert self._backing is not None
        return ShallowIndirect(self._backing, offset), length

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        for view in bufs:
            view[:] = bytes([(offset // BLOCK) % 251]) * view.nbytes
            offset += view.nbytes

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        index = offset // BLOCK
        entry = self.table[index]
        if entry[0] != "data":
            host = self.next_host
            self.next_host += 1
            old = bytearray(BLOCK)
            if entry[0] != "zero":
                await FormatAccess(self)._readv_mapped([memoryview(old)], index * BLOCK, BLOCK)
            await self._storage.writev([memoryview(old)], host * BLOCK)
            self.table[index] = ("data", host)
            self.mappings_changed()
        mapping, _ = await self.get_mapping(offset, length)
        return mapping, min(length, BLOCK - offset % BLOCK)

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        first = -(-offset // BLOCK)
        last = (offset + length) // BLOCK
        for index in range(first, last):
            self.table[index] = ("zero", True)
        if last <= first:
            return offset, 0
        return first * BLOCK, (last - first) * BLOCK

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        if offset % BLOCK or length % BLOCK:
            return offset, 0
        for index in range(offset // BLOCK, (offset + length) // BLOCK):
            self.table[index] = ("backing",) if self._backing else ("zero", False)
        return offset, length


def make_chain(size: int = 64 * BLOCK, backing_size: int = 40 * BLOCK) -> tuple[BlockDriver, bytes]:
    backing_storage = MemoryStorage(backing_size)
    backing_storage.data[:] = random.Random(1).randbytes(backing_size)
    backing = Raw(backing_storage, writable=False)
    top = BlockDriver(MemoryStorage(0), size, FormatAccess(backing), writable=True)
    return top, bytes(backing_storage.data)


def read(access: SyncFormatAccess, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    access.read(buf, offset)
    return bytes(buf)


def test_reads_through_backing_with_short_backing_file() -> None:
    top, base = make_chain()
    access = SyncFormatAccess(top)
    expected = base + bytes(top.size - len(base))
    assert read(access, 0, top.size) == expected
    assert read(access, 39 * BLOCK + 100, 2 * BLOCK) == expected[39 * BLOCK + 100 : 41 * BLOCK + 100]


def test_mixed_mappings_are_split_and_served() -> None:
    top, base = make_chain()
    access = SyncFormatAccess(top)
    access.write(b"\x11" * 100, 5 * BLOCK + 10)  # allocates block 5 with COW from backing
    top.table[7] = ("special",)
    top.table[8] = ("zero", True)
    expected = bytearray(base + bytes(top.size - len(base)))
    expected[5 * BLOCK + 10 : 5 * BLOCK + 110] = b"\x11" * 100
    expected[7 * BLOCK : 8 * BLOCK] = bytes([7]) * BLOCK
    expected[8 * BLOCK : 9 * BLOCK] = bytes(BLOCK)
    assert read(access, 0, top.size) == expected
    pieces = [bytearray(n) for n in (1, 5 * BLOCK, 3 * BLOCK + 17, 1000)]
    access.readv(pieces, 2 * BLOCK)
    assert b"".join(pieces) == expected[2 * BLOCK : 2 * BLOCK + sum(map(len, pieces))]


def test_deep_and_shallow_mappings() -> None:
    top, _ = make_chain()
    access = SyncFormatAccess(top)
    access.write(b"x" * BLOCK, 3 * BLOCK)
    top.table[9] = ("special",)
    top.table[10] = ("zero", True)

    shallow, length = access.get_shallow_mapping(0, top.size)
    assert isinstance(shallow, ShallowMapping.Indirect)
    assert length == 3 * BLOCK
    deep, length = access.get_mapping(0, top.size)
    assert isinstance(deep, Mapping.Raw)
    assert deep.offset == 0
    assert deep.storage is top.backing.driver.storage  # type: ignore[union-attr]
    assert length == 3 * BLOCK

    deep, length = access.get_mapping(3 * BLOCK + 5, top.size)
    assert isinstance(deep, Mapping.Raw)
    assert deep.storage is top.storage
    assert (deep.offset, length) == (5, BLOCK - 5)

    deep, length = access.get_mapping(9 * BLOCK, BLOCK)
    assert isinstance(deep, Mapping.Special)
    assert deep.layer is access.access
    deep, length = access.get_mapping(10 * BLOCK, 100 * BLOCK)
    assert deep == Mapping.Zero(True)
    assert length == BLOCK
    # Past the backing file's end: zero, not allocated.
    deep, length = access.get_mapping(50 * BLOCK, BLOCK)
    assert deep == Mapping.Zero(False)
    assert length == BLOCK
    assert access.get_mapping(top.size, 10) == (Mapping.Eof(), 10)
    assert access.get_mapping(5, 0)[0] == Mapping.Eof()


def test_write_zeroes_uses_metadata_for_whole_blocks_and_data_for_the_rest() -> None:
    top, base = make_chain()
    access = SyncFormatAccess(top)
    access.write_zeroes(BLOCK + 100, 3 * BLOCK)
    assert top.table[2] == top.table[3] == ("zero", True)
    assert top.table[1][0] == top.table[4][0] == "data"
    expected = bytearray(base)
    expected[BLOCK + 100 : 4 * BLOCK + 100] = bytes(3 * BLOCK)
    assert read(access, 0, len(base)) == expected


def test_discard_to_backing_whole_and_partial_blocks() -> None:
    top, base = make_chain()
    access = SyncFormatAccess(top)
    access.write(b"y" * 3 * BLOCK, 0)
    access.discard_to_backing(0, BLOCK)
    assert top.table[0] == ("backing",)  # whole blocks are given back to the backing layer
    assert read(access, 0, BLOCK) == base[:BLOCK]
    # Partial blocks stay allocated but read as the backing layer does.
    access.discard_to_backing(BLOCK + 10, BLOCK)
    assert read(access, BLOCK, 2 * BLOCK) == b"y" * 10 + base[BLOCK + 10 : 2 * BLOCK + 10] + b"y" * (BLOCK - 10)


def test_discard_to_backing_without_backing_reads_zero() -> None:
    driver = BlockDriver(MemoryStorage(0), 8 * BLOCK, None, writable=True)
    access = SyncFormatAccess(driver)
    access.write(b"z" * 2 * BLOCK, 0)
    access.discard_to_backing(100, BLOCK)
    assert read(access, 0, 2 * BLOCK) == b"z" * 100 + bytes(BLOCK) + b"z" * (BLOCK - 100)


def test_mapping_cache_follows_mapping_changes() -> None:
    top, _ = make_chain()
    access = SyncFormatAccess(top)
    access.write(b"a" * 2 * BLOCK, 20 * BLOCK)
    assert read(access, 20 * BLOCK, 10) == b"a" * 10
    calls = top.get_mapping_calls
    assert read(access, 20 * BLOCK + 100, 10) == b"a" * 10
    assert top.get_mapping_calls == calls  # served from the cached extent
    # The driver moves block 20 elsewhere and says so: the cache must not serve stale data.
    top.storage.data.extend(b"b" * BLOCK)  # type: ignore[attr-defined]
    top.table[20] = ("data", len(top.storage.data) // BLOCK - 1)  # type: ignore[attr-defined]
    top.mappings_changed()
    assert read(access, 20 * BLOCK, 10) == b"b" * 10


def test_async_concurrent_requests_against_model() -> None:
    top, base = make_chain()
    access = FormatAccess(top)
    model = bytearray(base + bytes(top.size - len(base)))
    rng = random.Random(5)
    writes = []
    for index in range(32):
        offset = index * 2 * BLOCK + rng.randrange(BLOCK)
        data = rng.randbytes(rng.randrange(1, BLOCK))
        writes.append((offset, data))
        model[offset : offset + len(data)] = data

    async def main() -> bytes:
        await asyncio.gather(*(access.write(data, offset) for offset, data in writes))
        buf = bytearray(top.size)
        await access.read(buf, 0)
        return bytes(buf)

    assert asyncio.run(main()) == model


class BadDriver(BlockDriver):
    """Returns broken answers, to check the engine's defences."""

    mode = ""

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        if self.mode == "empty":
            return ShallowZero(False), 0
        if self.mode == "unknown":
            return ShallowMapping(), BLOCK
        return await super().get_mapping(offset, max_length)

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        if self.mode == "readonly-mapping":
            return ShallowRaw(self._storage, 0, False), length
        return await super().ensure_data_mapping(offset, length, overwrite)

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        if self.mode == "zero-outside":
            return offset - BLOCK, length
        return await super().ensure_zero_mapping(offset, length)


@pytest.mark.parametrize(
    ("mode", "call"),
    [
        ("empty", lambda a: a.read(bytearray(10), 0)),
        ("unknown", lambda a: a.read(bytearray(10), 0)),
        ("readonly-mapping", lambda a: a.write(b"x", 0)),
        ("zero-outside", lambda a: a.write_zeroes(BLOCK, BLOCK)),
    ],
)
def test_engine_rejects_driver_misbehaviour(mode: str, call) -> None:  # type: ignore[no-untyped-def]
    driver = BadDriver(MemoryStorage(0), 8 * BLOCK, None, writable=True)
    driver.mode = mode
    with pytest.raises(ImagoError, match="blocktest driver"):
        call(SyncFormatAccess(driver))


def test_driver_defaults() -> None:
    driver = BlockDriver(MemoryStorage(0), 8 * BLOCK, None, writable=True)
    access = SyncFormatAccess(driver)
    with pytest.raises(UnsupportedFeatureError, match="resizing blocktest"):
        access.resize(BLOCK)
    assert driver.info() == {}
    assert runtime.run_sync(BlockDriver.probe(Null(10))) is False
    with pytest.raises(UnsupportedFeatureError, match="creating blocktest"):
        BlockDriver.create_builder(Null(10)).size(10).create_sync()
    discarded = runtime.run_sync(driver.discard_to_any(0, BLOCK))
    assert discarded == (0, 0)
    assert "BlockDriver" in repr(driver)


def test_alignment_is_the_maximum_over_the_chain() -> None:
    backing = FormatAccess(Raw(MemoryStorage(BLOCK, align=512), writable=False))
    top = BlockDriver(MemoryStorage(0, align=4096), 4 * BLOCK, backing, writable=True)
    access = SyncFormatAccess(top)
    assert access.mem_align == 4096
    assert access.req_align == 4096
    assert backing.mem_align == 512


def test_read_only_and_bounds() -> None:
    driver = BlockDriver(MemoryStorage(0), 8 * BLOCK, None, writable=False)
    access = SyncFormatAccess(driver)
    with pytest.raises(ReadOnlyError):
        access.write(b"x", 0)
    with pytest.raises(InvalidRequestError, match="past the end"):
        access.read(bytearray(2), 8 * BLOCK - 1)
    with pytest.raises(InvalidRequestError, match="integer"):
        access.read(bytearray(2), 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        FormatAccess("driver")  # type: ignore[arg-type]


def test_close_closes_backing_chain() -> None:
    top, _ = make_chain()
    access = SyncFormatAccess(top)
    access.close()
    assert top.backing is not None
    assert top.backing.closed


def test_raw_over_null_from_the_issue_example() -> None:
    async def main() -> tuple[Mapping, int]:
        null = await Raw.builder(Null(1 << 30)).open(DenyImplicitOpenGate())
        a = FormatAccess(null)
        buf = bytearray(4096)
        await a.read(buf, 0)
        return await a.get_mapping(0, 1 << 20)

    mapping, length = asyncio.run(main())
    assert isinstance(mapping, Mapping.Raw)
    assert length == 1 << 20


@pytest.mark.parametrize(
    ("mode", "call", "offset"),
    [
        ("empty", lambda a: a.read(bytearray(10), 0), 0),
        ("readonly-mapping", lambda a: a.write(b"x", BLOCK), BLOCK),
        ("zero-outside", lambda a: a.write_zeroes(BLOCK, BLOCK), BLOCK),
    ],
)
def test_driver_misbehaviour_is_a_contract_error(mode: str, call, offset: int) -> None:  # type: ignore[no-untyped-def]
    driver = BadDriver(MemoryStorage(0), 8 * BLOCK, None, writable=True)
    driver.mode = mode
    with pytest.raises(imago.DriverContractError) as caught:
        call(SyncFormatAccess(driver))
    assert isinstance(caught.value, RuntimeError)
    assert caught.value.driver == "blocktest"
    assert caught.value.offset == offset
    assert caught.value.problem in str(caught.value)


class FailingDataWrites(BlockDriver):
    """Records what the engine reports of failed data writes; the storage fails writes at chosen host blocks."""

    def __init__(self) -> None:
        super().__init__(FailingStorage(0), 16 * BLOCK, None, writable=True)
        self.failed: list[tuple[int, int]] = []

    def data_write_failed(self, offset: int, length: int) -> None:
        self.failed.append((offset, length))


class FailingStorage(MemoryStorage):
    """Writes into host block ``fail_at`` fail (writes of zeroes too), but for the first ``let_through``."""

    fail_at = -1
    let_through = 0

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        if offset // BLOCK == self.fail_at:
            if not self.let_through:
                raise OSError(5, "injected", "failing")
            self.let_through -= 1
        await super().writev(bufs, offset)

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self.writev([memoryview(bytes(length))], offset)


def test_a_failed_data_write_is_reported_to_the_driver_and_raised() -> None:
    driver = FailingDataWrites()
    storage = driver.storage
    assert isinstance(storage, FailingStorage)
    access = SyncFormatAccess(driver)
    access.write(b"\x01" * BLOCK, 0)  # host block 0
    # The write spans guest blocks 1 and 2; the copy into new host block 1 succeeds, the data fails.
    storage.fail_at, storage.let_through = 1, 1
    with pytest.raises(OSError, match="injected"):
        access.write(b"\x02" * (BLOCK + 100), BLOCK + 10)
    assert driver.failed == [(BLOCK + 10, BLOCK - 10)]  # the one mapping whose write failed, as ensured
    # The zeroing fallback (a partial block written as zeroes through its mapping) reports it too.
    storage.fail_at, storage.let_through = 2, 1
    with pytest.raises(OSError, match="injected"):
        access.write_zeroes(3 * BLOCK + 7, 100)
    assert driver.failed[1:] == [(3 * BLOCK + 7, 100)]
    # Successful writes report nothing.
    storage.fail_at = -1
    access.write(b"\x03" * 10, 5 * BLOCK)
    assert len(driver.failed) == 2


def test_failed_data_writes_need_no_driver_support() -> None:
    """The default does nothing: the error still reaches the caller."""
    top = BlockDriver(FailingStorage(0), 4 * BLOCK, None, writable=True)
    storage = top.storage
    assert isinstance(storage, FailingStorage)
    storage.fail_at = 0
    with pytest.raises(OSError, match="injected"):
        SyncFormatAccess(top).write(b"\x01" * 100, 0)
