"""Where guest data clusters live: in the image file, or in an external data file.

One of the two strategies is chosen when the image is opened. In the image file, data
clusters are allocated through the refcounts and released when no entry uses them any more.
In an external data file, a guest cluster lives at its guest offset (host offset = guest
offset), no refcounts count it, and the file is kept reading as the image does (a raw data
file must stay a valid raw image of the disk).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from imago import Storage, UnsupportedFeatureError

from .l2_entries import ZeroMode
from .layout import NO_LIMIT
from .tables import OFLAG_COMPRESSED, entry_clusters

if TYPE_CHECKING:
    from .overlap import Metadata
    from .state import Qcow2State

__all__ = ["DataPlacement", "ExternalDataFile", "ImageFileData"]


class DataPlacement(abc.ABC):
    """How data clusters are placed, released and kept, for one image."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state

    @property
    def storage(self) -> Storage:
        """The storage data clusters live in."""
        return self._state.data_storage

    def _release_clusters(self, entry: int) -> None:
        clusters = entry_clusters(entry, self._state.cluster_bits)
        if clusters:
            self._state.frees.append((clusters.start, len(clusters)))

    @abc.abstractmethod
    async def allocate(self, first_guest: int, count: int) -> tuple[int, int]:
        """Host clusters for up to *count* guest clusters from *first_guest*: ``(host offset, clusters)``."""

    @abc.abstractmethod
    def release(self, entry: int) -> None:
        """Schedule the image-file clusters an L2 descriptor held for release at the next flush."""

    @abc.abstractmethod
    def data_limit(self) -> int:
        """Where data clusters must end (L2 tables are checked against it when loaded)."""

    @abc.abstractmethod
    def metadata_under(self, host: int, length: int) -> tuple[int, Metadata] | None:
        """Where a data write to ``[host, host + length)`` would overwrite metadata: the first such cluster, and what.

        ``None``: nowhere.
        """

    @abc.abstractmethod
    async def zeroed(self, start: int, length: int, mode: ZeroMode) -> None:
        """Told that the entries of guest ``[start, start + length)`` were zeroed with *mode*."""

    @abc.abstractmethod
    async def resized(self, size: int) -> None:
        """Told that the disk now has *size* bytes."""

    @abc.abstractmethod
    def require_image_file(self, feature: str) -> None:
        """Refuse *feature* (raising :class:`~imago.UnsupportedFeatureError`) unless data is in the image file."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Flush the data storage, if it is not the image file (which is flushed anyway)."""


class ImageFileData(DataPlacement):
    """Data clusters in the image file, counted by the refcounts."""

    async def allocate(self, first_guest: int, count: int) -> tuple[int, int]:
        """Free clusters from the refcounts (possibly fewer than asked)."""
        return await self._state.refcounts.allocate(count)

    def release(self, entry: int) -> None:
        """The data (or compressed data) clusters of the descriptor."""
        self._release_clusters(entry)

    def data_limit(self) -> int:
        """The end of the image file."""
        return self._state.storage.size

    def metadata_under(self, host: int, length: int) -> tuple[int, Metadata] | None:
        """Data and metadata share the image file: the overlap checks' answer."""
        return self._state.guard.data_overlap(host, length)

    async def zeroed(self, start: int, length: int, mode: ZeroMode) -> None:
        """Nothing to do: zeroed entries read as zero by themselves."""

    async def resized(self, size: int) -> None:
        """Nothing to do: the image file grows as clusters are allocated."""

    def require_image_file(self, feature: str) -> None:
        """Every feature is available."""

    async def flush(self) -> None:
        """Nothing beyond the image file's own flush."""


class ExternalDataFile(DataPlacement):
    """Data clusters in an external data file, each at its guest offset, without refcounts."""

    async def allocate(self, first_guest: int, count: int) -> tuple[int, int]:
        """The guest clusters' own offsets."""
        return first_guest, count

    def release(self, entry: int) -> None:
        """Only compressed data lies in the image file (data clusters are not counted)."""
        if entry & OFLAG_COMPRESSED:
            self._release_clusters(entry)

    def data_limit(self) -> int:
        """None: a sparse data file may end before clusters mapped into it; it reads zero there."""
        return NO_LIMIT

    def metadata_under(self, host: int, length: int) -> tuple[int, Metadata] | None:
        """None: no metadata lies in the data file."""
        return None

    async def zeroed(self, start: int, length: int, mode: ZeroMode) -> None:
        """Keep the data file reading as the image does (a raw data file must)."""
        if mode is not ZeroMode.UNMAP or self._state.header.data_file_raw:
            await self._state.data_storage.write_zeroes(start, length, unmap=True)

    async def resized(self, size: int) -> None:
        """A raw data file is the disk: it is sized like it."""
        if self._state.header.data_file_raw:
            await self._state.data_storage.resize(size)

    def require_image_file(self, feature: str) -> None:
        """Refused: data clusters here have no refcounts (to share them by, say), as in QEMU."""
        raise UnsupportedFeatureError(feature, self._state.filename)

    async def flush(self) -> None:
        """Flush the data file."""
        await self._state.data_storage.flush()
