"""The conformance suite for reading: any format driver, on images made by other tools."""

from __future__ import annotations

import abc
import asyncio
import io
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from ..errors import ClosedError, InvalidBufferError, InvalidRequestError, ReadOnlyError
from ..format.access import SyncFormatAccess
from ..format.driver import FormatDriver
from .model import check_mappings

__all__ = ["ReadOnlyFormatConformance"]


class ReadOnlyFormatConformance(abc.ABC):
    """Reading tests every format driver must pass. Subclass it as ``TestSomething``.

    :meth:`make_image` returns an image opened read-only and the bytes it must read as
    (from a reference tool such as ``qemu-img convert -O raw``).
    """

    @abc.abstractmethod
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        """An image under *directory*, opened read-only, and its expected content."""

    @pytest.fixture
    def image(self, tmp_path: Path) -> tuple[SyncFormatAccess, bytes]:
        """The image, wrapped for synchronous use, with its expected content."""
        driver, expected = self.make_image(tmp_path)
        return SyncFormatAccess(driver), expected

    @staticmethod
    def _read(image: SyncFormatAccess, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        image.read(buf, offset)
        return bytes(buf)

    def test_whole_disk(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        assert access.size == len(expected)
        assert not access.writable
        assert self._read(access, 0, access.size) == expected
        access.close()

    def test_random_reads(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        rng = random.Random(21)
        for _ in range(300):
            offset = rng.randrange(len(expected))
            length = rng.randrange(1, min(200000, len(expected) - offset) + 1)
            assert self._read(access, offset, length) == expected[offset : offset + length], (offset, length)
        access.close()

    def test_vectored_reads(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        pieces = [bytearray(n) for n in (1, 4095, 65537, 3)]
        offset = len(expected) // 3
        total = sum(map(len, pieces))
        access.readv(pieces, offset)
        assert b"".join(pieces) == expected[offset : offset + total]
        access.close()

    def test_async_concurrent_reads(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        rng = random.Random(22)
        requests = [(rng.randrange(len(expected) - 5000), rng.randrange(1, 5000)) for _ in range(64)]

        async def main() -> list[bytes]:
            bufs = [bytearray(length) for _, length in requests]
            await asyncio.gather(*(access.access.read(b, o) for b, (o, _) in zip(bufs, requests, strict=True)))
            return [bytes(b) for b in bufs]

        for (offset, length), got in zip(requests, asyncio.run(main()), strict=True):
            assert got == expected[offset : offset + length]
        access.close()

    def test_sync_reads_inside_running_loop(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image

        async def main() -> bytes:
            return self._read(access, 0, min(len(expected), 70000))

        assert asyncio.run(main()) == expected[:70000]
        access.close()

    def test_mappings_cover_the_disk(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        check_mappings(access, expected)
        access.close()

    def test_writes_are_refused(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        changes: list[Callable[[], None]] = [
            lambda: access.write(b"x", 0),
            lambda: access.write_zeroes(0, 512),
            lambda: access.discard_to_zero(0, 512),
            lambda: access.discard_to_any(0, 512),
            lambda: access.resize(access.size * 2),
        ]
        for call in changes:
            with pytest.raises(ReadOnlyError):
                call()
        assert self._read(access, 0, 16) == expected[:16]
        access.close()

    def test_bad_requests(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, _ = image
        with pytest.raises(InvalidRequestError):
            access.read(bytearray(2), access.size - 1)
        with pytest.raises(InvalidRequestError):
            access.read(bytearray(1), -1)
        with pytest.raises(InvalidBufferError):
            access.read(b"immutable", 0)
        access.close()
        with pytest.raises(ClosedError):
            access.read(bytearray(1), 0)

    def test_as_file(self, image: tuple[SyncFormatAccess, bytes]) -> None:
        access, expected = image
        with access.as_file() as f:
            assert isinstance(f, io.RawIOBase)
            f.seek(len(expected) // 2)
            assert f.read(1000) == expected[len(expected) // 2 : len(expected) // 2 + 1000]
            f.seek(0)
            assert io.BufferedReader(f).read() == expected
        access.close()
