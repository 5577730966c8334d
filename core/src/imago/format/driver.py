"""The format driver interface: metadata in, mappings out."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from ..errors import UnsupportedFeatureError
from ..storage import PreallocateMode, Storage
from .builder import FormatCreateBuilder, FormatDriverBuilder
from .capabilities import Capability
from .mapping import ShallowMapping

if TYPE_CHECKING:
    from .access import FormatAccess
    from .gates import ImplicitOpenGate

__all__ = ["FormatDriver"]


class FormatDriver(abc.ABC):
    """An opened image of some format. Owns metadata only; :class:`FormatAccess` does the I/O.

    A driver reports, for a guest offset, where the data lives (:meth:`get_mapping`) and
    prepares writes (:meth:`ensure_data_mapping`, :meth:`ensure_zero_mapping`, the
    ``discard_*`` methods). Whenever a range's mapping changes by any other path than those
    calls (snapshot revert, copy-on-write relocation, resize, ...), the driver calls
    :meth:`mappings_changed` so that cached mappings are dropped.

    The driver owns its storages (and its backing :class:`FormatAccess`): :meth:`close`
    closes them.
    """

    #: Format name, as registered and as ``qemu-img`` calls it.
    name: ClassVar[str] = ""
    #: Builder class returned by :meth:`builder` and :meth:`builder_path`.
    builder_class: ClassVar[type[FormatDriverBuilder[Any]]] = FormatDriverBuilder
    #: Builder class returned by :meth:`create_builder`.
    create_builder_class: ClassVar[type[FormatCreateBuilder[Any]]] = FormatCreateBuilder
    #: A fallback format (raw) matches any file when probing, but only if nothing else does.
    probe_fallback: ClassVar[bool] = False
    #: What the driver can do beyond reading and writing (see :class:`Capability`); checked
    #: against the methods it defines when it is registered.
    capabilities: ClassVar[frozenset[Capability[Any]]] = frozenset()
    #: The disk is the storage's bytes at the same offsets (raw): a hole in the storage
    #: (:meth:`Storage.data_extent`) is a hole in the disk. Tools mapping or copying the disk
    #: ask the storage, as QEMU asks the file under a raw image; formats that allocate (qcow2)
    #: report their data as data.
    identity_mapped: ClassVar[bool] = False

    #: Increases whenever a mapping reported earlier may have become wrong.
    mapping_epoch: int = 0

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def builder(cls, storage: Storage) -> FormatDriverBuilder[Self]:
        """A builder opening the image stored in *storage* (used as given, owned afterwards)."""
        return cls.builder_class(cls, storage=storage)

    @classmethod
    def builder_path(cls, path: str | os.PathLike[str]) -> FormatDriverBuilder[Self]:
        """A builder opening the image file at *path*, through the gate passed to ``open``."""
        return cls.builder_class(cls, path=path)

    @classmethod
    def create_builder(cls, storage: Storage) -> FormatCreateBuilder[Self]:
        """A builder writing a new image of this format into *storage*."""
        return cls.create_builder_class(cls, storage)

    @classmethod
    @abc.abstractmethod
    async def open_image(cls, builder: FormatDriverBuilder[Self], gate: ImplicitOpenGate) -> Self:
        """Open the image described by *builder* (called by ``builder.open``)."""

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Self]) -> None:
        """Write a new image as *builder* describes (called by ``builder.create``)."""
        raise UnsupportedFeatureError(f"creating {cls.name} images")

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """Whether *storage* holds an image of this format. Looks only; never writes."""
        return False

    @classmethod
    def supports(cls, capability: Capability[Any]) -> bool:
        """Whether this driver claims *capability* (``Qcow2.supports(Capability.SNAPSHOTS)``)."""
        return capability in cls.capabilities

    # --- facts -----------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual disk size in bytes."""

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """Whether the image was opened for writing."""

    @property
    @abc.abstractmethod
    def storage(self) -> Storage:
        """The storage holding the image's metadata (its file)."""

    def storages(self) -> Sequence[Storage]:
        """Every storage this layer reads or writes (not those of backing layers)."""
        return (self.storage,)

    @property
    def backing(self) -> FormatAccess | None:
        """The backing layer, if the image has one and it was opened."""
        return None

    def allocated_size(self) -> int | None:
        """Bytes the image occupies on its media (``qemu-img info``'s ``actual-size``), ``None`` if unknown.

        The default counts the image's own file, as QEMU does for most formats; a format that
        counts its other files too (VMDK's extent files) overrides it.
        """
        return self.storage.allocated_size()

    def holes_read_as_data(self, storage: Storage) -> bool:
        """Whether guest data this driver maps (:class:`ShallowRaw`) into *storage* has its holes shown as zero data.

        ``True`` for files whose bytes are the guest's as they are but which the format still
        counts as allocated (a VMDK flat extent's file): ``imago map`` then asks the storage
        for its holes and reports them as ``zero`` while keeping ``data``, as ``qemu-img map``
        does. Default: ``False``.
        """
        return False

    @property
    def writes_compressed(self) -> bool:
        """Whether data can only be written compressed: whole clusters, in increasing order.

        Such an image (a stream-optimized VMDK) takes data only through :meth:`write_compressed`
        (clusters of the ``COMPRESSED_WRITES`` capability's ``cluster_size``), each write at a
        higher offset than the one before; ranges never written read as zeros. Generic copiers
        (``imago convert``) write it so, as with ``-c``. Default: ``False``.
        """
        return False

    def mappings_changed(self) -> None:
        """Declare that mappings reported earlier may be stale (drops cached mappings)."""
        self.mapping_epoch += 1

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``imago info`` (JSON-serialisable)."""
        return {}

    # --- mappings -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """The mapping at guest *offset* and how many bytes it covers contiguously.

        *offset* lies inside the disk. The length should not exceed *max_length* unless
        reporting more costs nothing (the engine clips it, and may keep the longer mapping to
        serve later requests).
        """

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Make guest ``[offset, offset + length)`` (a prefix of it) writable in place.

        Returns a writable ``ShallowMapping.Raw`` and the length it covers. *overwrite* says
        the caller will overwrite the whole range, so existing data need not be preserved
        (no copy-on-write of it).
        """
        raise UnsupportedFeatureError(f"writing {self.name} images")

    def data_write_failed(self, offset: int, length: int) -> None:
        """Told that writing guest ``[offset, offset + length)`` through a mapping failed.

        The mapping is one :meth:`ensure_data_mapping` returned for exactly that range; the
        caller gets the error. A driver that bound new space for the write before its data
        was written (to be recorded at the next flush) may take that binding back here, so
        that the metadata never names space the failed write left unwritten, unless some
        other request has used the space since. Called synchronously, right after the failure;
        the default does nothing (the range's content is then undefined, as after any failed
        write).
        """

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Make what it can of the range read as zero through metadata alone.

        Returns ``(start, length)`` of the part handled; the engine writes zeroes to the
        rest. The default handles nothing.
        """
        return offset, 0

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Like :meth:`ensure_zero_mapping`, but may also free the space behind the range."""
        return await self.ensure_zero_mapping(offset, length)

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Free what it can of the range; its content becomes undefined. Returns the part freed."""
        return offset, 0

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """Make what it can of the range read from the backing layer again.

        Without a backing layer, the backing is all zeroes: the default delegates to
        :meth:`discard_to_zero` then.
        """
        if self.backing is None:
            return await self.discard_to_zero(offset, length)
        raise UnsupportedFeatureError(f"discarding to the backing image in {self.name} images")

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Write whole clusters compressed (``qemu-img convert -c``). Default: unsupported."""
        raise UnsupportedFeatureError(f"compressed writes to {self.name} images")

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read a ``ShallowMapping.Special`` range at guest *offset* (compressed data, ...)."""
        raise UnsupportedFeatureError(f"special mappings in {self.name} images")

    # --- maintenance ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write metadata caches back, then flush the storages."""
        for storage in self.storages():
            await storage.flush()

    async def sync(self) -> None:
        """Like :meth:`flush`, and make everything durable."""
        for storage in self.storages():
            await storage.sync()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Change the virtual disk size."""
        raise UnsupportedFeatureError(f"resizing {self.name} images")

    async def close(self) -> None:
        """Release the storages (and backing layer) this driver owns."""
        backing = self.backing
        if backing is not None:
            await backing.close()
        for storage in self.storages():
            await storage.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.storage.filename!r} size={self.size}>"
