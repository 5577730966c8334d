"""The ``raw`` format driver: guest offset N is byte N of the storage."""

from __future__ import annotations

from typing import Any

from imago import (
    Capability,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    PreallocateMode,
    ReadOnlyError,
    ShallowMapping,
    Storage,
)

from .create import RawCreateBuilder

__all__ = ["Raw"]


class Raw(FormatDriver):
    """A raw image: an identity mapping onto its storage.

    ``Raw.builder(storage).write(True).open_sync(gate)`` or ``Raw.builder_path(path)``;
    ``Raw.create_builder(storage).size(n).preallocate(mode).create_sync()``.
    """

    name = "raw"
    probe_fallback = True
    create_builder_class = RawCreateBuilder
    capabilities = frozenset({Capability.RESIZE})
    identity_mapped = True

    def __init__(self, storage: Storage, *, writable: bool) -> None:
        self._storage = storage
        self._writable = writable

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Raw], gate: ImplicitOpenGate) -> Raw:
        """Open the storage (by path through *gate*, or as given)."""
        storage = await builder.open_storage(gate)
        if builder.writable and not storage.writable:
            raise ReadOnlyError(f"storage {storage.filename or storage!r}")
        return cls(storage, writable=builder.writable)

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Raw]) -> None:
        """Empty the storage, then size it with the requested preallocation."""
        storage = builder.storage
        await storage.resize(0)
        await storage.resize(builder.virtual_size, builder.preallocation)

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """Any file is a raw image; raw is only chosen when no other format matches."""
        return True

    @property
    def size(self) -> int:
        """The storage's size."""
        return self._storage.size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def storage(self) -> Storage:
        """The storage holding the disk."""
        return self._storage

    def info(self) -> dict[str, Any]:
        """Raw images have no format-specific facts."""
        return {}

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Identity: the rest of the disk is one contiguous mapping."""
        size = self._storage.size
        if offset >= size:
            return ShallowMapping.Eof(), max_length
        return ShallowMapping.Raw(self._storage, offset, self._writable), size - offset

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Identity; raw data is always allocated where it is."""
        if not self._writable:
            raise ReadOnlyError(self._storage.filename or "raw image")
        return ShallowMapping.Raw(self._storage, offset, True), length

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Zero the range in the storage, keeping it allocated."""
        await self._storage.write_zeroes(offset, length, unmap=False)
        return offset, length

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Zero the range in the storage, releasing the space where the storage can."""
        await self._storage.write_zeroes(offset, length, unmap=True)
        return offset, length

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Pass the discard to the storage."""
        await self._storage.discard(offset, length)
        return offset, length

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Resize the storage; new space is prepared as *prealloc* says."""
        if not self._writable:
            raise ReadOnlyError(self._storage.filename or "raw image")
        await self._storage.resize(new_size, prealloc)
        self.mappings_changed()
