"""A plain in-memory model of a disk, and checks of a driver against known content."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ..format.mapping import Mapping, ShallowMapping

if TYPE_CHECKING:
    from ..format.access import SyncFormatAccess

__all__ = ["DiskModel", "check_mappings"]


class DiskModel:
    """What a disk should contain: bytes, plus which bytes are undefined (after a discard)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.undefined = bytearray(size)  # 1 where any content is acceptable

    @property
    def size(self) -> int:
        """Model disk size."""
        return len(self.data)

    def write(self, offset: int, data: bytes) -> None:
        """Record a write."""
        self.data[offset : offset + len(data)] = data
        self.undefined[offset : offset + len(data)] = bytes(len(data))

    def zero(self, offset: int, length: int) -> None:
        """Record that a range reads as zero."""
        self.write(offset, bytes(length))

    def forget(self, offset: int, length: int) -> None:
        """Record that a range's content is now undefined."""
        self.undefined[offset : offset + length] = b"\x01" * length

    def resize(self, size: int) -> None:
        """Record a resize; new space reads as zero."""
        if size < len(self.data):
            del self.data[size:]
            del self.undefined[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
            self.undefined.extend(bytes(size - len(self.undefined)))

    def check(self, actual: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Assert that *actual*, read at *offset*, agrees with the model (undefined bytes excepted)."""
        actual = bytes(actual)
        expected = bytes(self.data[offset : offset + len(actual)])
        if actual == expected:
            return
        undefined = self.undefined[offset : offset + len(actual)]
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            if got != want and not undefined[index]:
                raise AssertionError(
                    f"byte at offset {offset + index} is {got:#04x}, expected {want:#04x} "
                    f"(first difference of a {len(actual)}-byte read at {offset})"
                )


def random_bytes(rng: random.Random, length: int) -> bytes:
    """Deterministic pseudo-random data (never all zero, so zeroing is visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def check_mappings(image: SyncFormatAccess, content: bytes) -> None:
    """Walk every mapping of *image* and check it against the disk's known *content*.

    Raw mappings must hold the bytes, zero mappings must read zero; the mappings must tile the
    disk exactly, and past its end lies ``Eof``.
    """
    offset = 0
    while offset < image.size:
        mapping, length = image.get_mapping(offset, image.size - offset)
        assert 0 < length <= image.size - offset
        assert isinstance(mapping, Mapping)
        expected = content[offset : offset + length]
        if isinstance(mapping, Mapping.Raw):
            raw = bytearray(length)
            mapping.storage.readv_inline([memoryview(raw)], mapping.offset)
            assert bytes(raw) == expected, f"mapping at {offset} does not hold the data"
        elif isinstance(mapping, Mapping.Zero):
            assert expected == bytes(length), f"zero mapping at {offset} holds data"
        else:
            assert isinstance(mapping, Mapping.Special)
        shallow, shallow_length = image.get_shallow_mapping(offset, length)
        assert isinstance(shallow, ShallowMapping)
        assert 0 < shallow_length <= length
        offset += length
    assert offset == image.size
    assert isinstance(image.get_mapping(image.size, 4096)[0], Mapping.Eof)
