"""The storage conformance suite."""

from __future__ import annotations

import abc
import asyncio
import os
import random
from pathlib import Path
from typing import ClassVar

import pytest

from .. import runtime
from ..errors import ClosedError, ImagoError, ReadOnlyError
from ..storage import PreallocateMode, Storage
from .model import DiskModel, random_bytes

__all__ = ["StorageConformance"]

_SIZE = 1 << 20


def _read(storage: Storage, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def _write(storage: Storage, offset: int, data: bytes) -> None:
    runtime.run_sync(storage.writev([memoryview(data)], offset))


class StorageConformance(abc.ABC):
    """Tests every storage driver must pass. Subclass it as ``TestSomething``.

    Class attributes describe the driver: :attr:`stores_data` (false for a storage that
    drops writes), :attr:`grows_on_write` (writes past the end extend it).
    """

    #: Whether written data reads back (false for ``null``).
    stores_data: ClassVar[bool] = True
    #: Whether writing past the end grows the storage.
    grows_on_write: ClassVar[bool] = True

    @abc.abstractmethod
    def create_storage(self, directory: Path, size: int) -> Storage:
        """A new, writable storage of *size* bytes reading as zero, kept under *directory*."""

    def reopen_read_only(self, storage: Storage) -> Storage | None:
        """The same storage opened again read-only (``None``: not supported by this driver)."""
        return None

    # --- helpers ---------------------------------------------------------------------------------

    def _expect(self, model: DiskModel, storage: Storage, offset: int = 0, length: int | None = None) -> None:
        length = model.size - offset if length is None else length
        actual = _read(storage, offset, length)
        if self.stores_data:
            model.check(actual, offset)
        else:
            assert actual == bytes(length)

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        """A fresh storage of 1 MiB."""
        return self.create_storage(tmp_path, _SIZE)

    # --- tests ---------------------------------------------------------------------------------------

    def test_name_and_size(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)
        assert type(storage).name
        assert storage.size == _SIZE
        assert storage.mem_align >= 1
        assert storage.req_align >= 1

    def test_fresh_storage_reads_zero(self, storage: Storage) -> None:
        assert _read(storage, 0, _SIZE) == bytes(_SIZE)

    def test_write_read_roundtrip(self, storage: Storage) -> None:
        rng = random.Random(1)
        model = DiskModel(_SIZE)
        for offset, length in [(0, 4096), (1, 1), (511, 1025), (65536, 131072), (_SIZE - 100, 100)]:
            data = random_bytes(rng, length)
            _write(storage, offset, data)
            model.write(offset, data)
        self._expect(model, storage)
        self._expect(model, storage, 510, 3)

    def test_vectored_io(self, storage: Storage) -> None:
        rng = random.Random(2)
        parts = [random_bytes(rng, n) for n in (100, 4096, 1, 3000)]
        runtime.run_sync(storage.writev([memoryview(p) for p in parts], 1000))
        model = DiskModel(_SIZE)
        model.write(1000, b"".join(parts))
        pieces = [bytearray(n) for n in (7, 5000, 2190)]
        runtime.run_sync(storage.readv([memoryview(p) for p in pieces], 1000))
        if self.stores_data:
            model.check(b"".join(pieces), 1000)
        else:
            assert b"".join(pieces) == bytes(7197)

    def test_readv_inline_matches_readv(self, storage: Storage) -> None:
        data = random_bytes(random.Random(3), 20000)
        _write(storage, 12345, data)
        inline = bytearray(30000)
        storage.readv_inline([memoryview(inline)], 10000)
        assert bytes(inline) == _read(storage, 10000, 30000)

    def test_reads_past_end_are_zero(self, storage: Storage) -> None:
        _write(storage, _SIZE - 10, b"\xff" * 10)
        tail = _read(storage, _SIZE - 10, 20)
        assert tail[10:] == bytes(10)
        assert _read(storage, _SIZE + 4096, 512) == bytes(512)

    @pytest.mark.parametrize("unmap", [False, True])
    def test_write_zeroes(self, storage: Storage, unmap: bool) -> None:
        rng = random.Random(4)
        model = DiskModel(_SIZE)
        data = random_bytes(rng, 200000)
        _write(storage, 0, data)
        model.write(0, data)
        for offset, length in [(1, 1000), (4096, 65536), (150000, 49999)]:
            runtime.run_sync(storage.write_zeroes(offset, length, unmap=unmap))
            model.zero(offset, length)
        self._expect(model, storage, 0, 200001)

    def test_discard_keeps_neighbours(self, storage: Storage) -> None:
        data = random_bytes(random.Random(5), 3 * 65536)
        _write(storage, 0, data)
        model = DiskModel(_SIZE)
        model.write(0, data)
        runtime.run_sync(storage.discard(65536, 65536))
        model.forget(65536, 65536)
        self._expect(model, storage, 0, 3 * 65536)
        _write(storage, 65536 + 7, b"after discard")
        model.write(65536 + 7, b"after discard")
        self._expect(model, storage, 0, 3 * 65536)

    @pytest.mark.parametrize("mode", list(PreallocateMode))
    def test_resize(self, storage: Storage, mode: PreallocateMode) -> None:
        data = random_bytes(random.Random(6), 4096)
        _write(storage, _SIZE - 4096, data)
        runtime.run_sync(storage.resize(2 * _SIZE + 123, mode))
        assert storage.size == 2 * _SIZE + 123
        model = DiskModel(2 * _SIZE + 123)
        model.write(_SIZE - 4096, data)
        self._expect(model, storage, _SIZE - 4096)
        runtime.run_sync(storage.resize(_SIZE - 2048, mode))
        assert storage.size == _SIZE - 2048
        model.resize(_SIZE - 2048)
        self._expect(model, storage, _SIZE - 4096)
        runtime.run_sync(storage.resize(_SIZE, mode))
        model.resize(_SIZE)
        self._expect(model, storage, _SIZE - 4096)  # what was cut off does not come back

    def test_write_past_end(self, storage: Storage) -> None:
        _write(storage, _SIZE + 100, b"beyond")
        if self.grows_on_write:
            assert storage.size == _SIZE + 106
            assert _read(storage, _SIZE + 98, 8) == (b"\0\0beyond" if self.stores_data else bytes(8))
        else:
            assert storage.size == _SIZE

    def test_flush_and_sync(self, storage: Storage) -> None:
        _write(storage, 0, b"durable")
        runtime.run_sync(storage.flush())
        runtime.run_sync(storage.sync())
        self._expect_prefix(storage, b"durable")

    def _expect_prefix(self, storage: Storage, data: bytes) -> None:
        assert _read(storage, 0, len(data)) == (data if self.stores_data else bytes(len(data)))

    def test_closed_storage_refuses_io(self, storage: Storage) -> None:
        runtime.run_sync(storage.close())
        runtime.run_sync(storage.close())  # closing twice is fine
        with pytest.raises(ClosedError):
            _read(storage, 0, 10)
        with pytest.raises(ClosedError):
            _write(storage, 0, b"x")

    def test_read_only_refuses_writes(self, storage: Storage) -> None:
        _write(storage, 0, b"original")
        runtime.run_sync(storage.flush())
        read_only = self.reopen_read_only(storage)
        if read_only is None:
            pytest.skip(f"{type(storage).name} storages cannot be reopened read-only")
        try:
            assert not read_only.writable
            with pytest.raises(ReadOnlyError):
                _write(read_only, 0, b"changed")
            with pytest.raises(ReadOnlyError):
                runtime.run_sync(read_only.write_zeroes(0, 8))
            with pytest.raises(ReadOnlyError):
                runtime.run_sync(read_only.resize(10))
            self._expect_prefix(read_only, b"original")
        finally:
            runtime.run_sync(read_only.close())

    def test_concurrent_io_under_event_loop(self, storage: Storage) -> None:
        rng = random.Random(7)
        chunks = {index * 8192 + rng.randrange(100): random_bytes(rng, 5000) for index in range(64)}

        async def main() -> list[bytes]:
            assert not runtime.inline()
            await asyncio.gather(*(storage.writev([memoryview(d)], o) for o, d in chunks.items()))
            bufs = {o: bytearray(len(d)) for o, d in chunks.items()}
            await asyncio.gather(*(storage.readv([memoryview(b)], o) for o, b in bufs.items()))
            return [bytes(bufs[o]) for o in chunks]

        results = asyncio.run(main())
        for (offset, data), got in zip(chunks.items(), results, strict=True):
            assert got == (data if self.stores_data else bytes(len(data))), f"mismatch at {offset}"

    def test_sync_driving_inside_running_loop(self, storage: Storage) -> None:
        async def main() -> bytes:
            _write(storage, 4096, b"inside a loop")
            return _read(storage, 4096, 13)

        got = asyncio.run(main())
        assert got == (b"inside a loop" if self.stores_data else bytes(13))

    def test_random_workload_matches_model(self, storage: Storage) -> None:
        rng = random.Random(8)
        model = DiskModel(_SIZE)
        for _ in range(200):
            offset = rng.randrange(_SIZE)
            length = rng.randrange(1, min(70000, _SIZE - offset) + 1)
            action = rng.random()
            if action < 0.6:
                data = random_bytes(rng, length)
                _write(storage, offset, data)
                model.write(offset, data)
            elif action < 0.8:
                runtime.run_sync(storage.write_zeroes(offset, length, unmap=rng.random() < 0.5))
                model.zero(offset, length)
            else:
                self._expect(model, storage, offset, length)
        self._expect(model, storage)

    def test_repr_and_resolve_relative_path(self, storage: Storage) -> None:
        assert type(storage).__name__ in repr(storage)
        assert storage.resolve_relative_path("/abs/name") == "/abs/name"
        resolved = storage.resolve_relative_path("backing.img")
        assert os.path.basename(resolved) == "backing.img"
        if storage.filename:
            assert os.path.dirname(resolved) == os.path.dirname(storage.filename)

    def test_errors_are_imago_errors(self, storage: Storage) -> None:
        runtime.run_sync(storage.close())
        with pytest.raises(ImagoError):
            _read(storage, 0, 1)
