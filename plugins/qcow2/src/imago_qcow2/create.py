"""Creating qcow2 images: ``Qcow2.create_builder(storage)...create()``.

Options, defaults and validation follow ``qemu-img create -f qcow2 -o ...``. The layout is
QEMU's: header cluster, refcount table, refcount blocks, L1 table, then (when preallocating)
the L2 tables and the data clusters, contiguously.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from imago import (
    FormatCreateBuilder,
    InvalidOptionError,
    Measurement,
    PreallocateMode,
    Storage,
    StorageCreateOptions,
    check_local_file_name,
)

from .header import Header, build_header
from .layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    CREATED_V3_HEADER_LENGTH,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTENDED_L2,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_NAME_BYTES,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    ImageLayout,
    l1_entries,
    plan_image,
)
from .measure import measure as measure_image
from .refcounts import RefcountBlock
from .tables import OFLAG_COPIED

if TYPE_CHECKING:
    from .driver import Qcow2

__all__ = ["Qcow2CreateBuilder"]

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": 0, "zstd": 1}


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise InvalidOptionError(option, f"must be on or off, got {value!r}")


def _recorded_name(option: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(option, f"must be a non-empty file name, got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidOptionError(option, f"names are at most {MAX_NAME_BYTES} bytes long")
    try:
        check_local_file_name(name)
    except Exception as error:
        raise InvalidOptionError(option, str(error)) from None
    return name


class Qcow2CreateBuilder(FormatCreateBuilder["Qcow2"]):
    """The options of a new qcow2 image (``qemu-img create -f qcow2 -o ...``)."""

    option_names: ClassVar[tuple[str, ...]] = (
        *FormatCreateBuilder.option_names,
        "cluster_size",
        "refcount_width",
        "compat",
        "lazy_refcounts",
        "compression_type",
        "extended_l2",
        "backing_file",
        "backing_format",
        "data_file",
        "data_file_raw",
    )
    option_aliases: ClassVar[dict[str, str]] = {
        **FormatCreateBuilder.option_aliases,
        "refcount_bits": "refcount_width",
        "backing_fmt": "backing_format",
    }

    _O = FormatCreateBuilder.Option
    #: qemu-img's qcow2 creation options, in the order ``qemu-img create`` reports them.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        _O("cluster_size", "size", "Bytes per qcow2 cluster", "65536"),
        _O("extended_l2", "bool", "Extended L2 entries with 32 subclusters", "off"),
        _O(
            "preallocation",
            "str",
            "Preallocation mode (allowed values: off, metadata, falloc, full)",
            choices=("off", "metadata", "falloc", "full"),
        ),
        _O(
            "compression_type",
            "str",
            "Compression method of compressed clusters (zlib, zstd)",
            "zlib",
            ("zlib", "zstd"),
        ),
        _O("size", "size", "Virtual disk size"),
        _O("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])", choices=tuple(_COMPAT)),
        _O("backing_file", "str", "File name of a base image"),
        _O("backing_fmt", "str", "Image format of the base image"),
        _O("data_file", "str", "File name of an external data file"),
        _O("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
        _O("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
        _O("refcount_bits", "int", "Width of a reference count entry in bits", "16"),
    )
    del _O

    def __init__(self, driver: type[Qcow2], storage: Storage) -> None:
        super().__init__(driver, storage)
        self._cluster_bits = 16
        self._refcount_order = 4
        self._version = 3
        self._lazy_refcounts = False
        self._compression_type = 0
        self._extended_l2 = False
        self._backing_file: str | None = None
        self._backing_format: str | None = None
        self._data_file: str | None = None
        self._data_storage: Storage | None = None
        self._data_file_raw = False

    # --- options --------------------------------------------------------------------------------

    def size(self, size: int) -> Self:
        """Virtual disk size in bytes, rounded up to whole 512-byte sectors as ``qemu-img`` does."""
        super().size(size)  # (validates it)
        return super().size(-(-self.virtual_size // 512) * 512)

    def cluster_size(self, size: int) -> Self:
        """Bytes per cluster: a power of two from 512 to 2 MiB (default 64 KiB)."""
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size <= 0
            or size & (size - 1)
            or not MIN_CLUSTER_BITS <= size.bit_length() - 1 <= MAX_CLUSTER_BITS
        ):
            raise InvalidOptionError("cluster_size", f"must be a power of two between 512 and 2048k, got {size!r}")
        self._cluster_bits = size.bit_length() - 1
        return self

    def refcount_width(self, bits: int) -> Self:
        """Bits per refcount: a power of two up to 64 (default 16)."""
        if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0 or bits & (bits - 1) or bits > 64:
            raise InvalidOptionError(
                "refcount_bits", f"must be a power of two and may not exceed 64 bits, got {bits!r}"
            )
        self._refcount_order = bits.bit_length() - 1
        return self

    def compat(self, level: str) -> Self:
        """Compatibility level: ``0.10`` (version 2) or ``1.1`` (version 3, the default)."""
        if level not in _COMPAT:
            raise InvalidOptionError("compat", f"must be 0.10 or 1.1, got {level!r}")
        self._version = _COMPAT[level]
        return self

    def lazy_refcounts(self, enabled: bool | str) -> Self:
        """Postpone refcount updates (needs compat 1.1)."""
        self._lazy_refcounts = _flag("lazy_refcounts", enabled)
        return self

    def compression_type(self, name: str) -> Self:
        """Compression for compressed clusters: ``zlib`` (default) or ``zstd`` (needs compat 1.1)."""
        if name not in _COMPRESSION:
            raise InvalidOptionError("compression_type", f"must be zlib or zstd, got {name!r}")
        self._compression_type = _COMPRESSION[name]
        return self

    def extended_l2(self, enabled: bool | str) -> Self:
        """Extended L2 entries with 32 subclusters (needs compat 1.1 and clusters of 16 KiB or more)."""
        self._extended_l2 = _flag("extended_l2", enabled)
        return self

    def backing_file(self, name: str) -> Self:
        """Record a backing file name (resolved relative to the image when opened)."""
        self._backing_file = _recorded_name("backing_file", name)
        return self

    def backing_format(self, name: str) -> Self:
        """Record the backing file's format."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:
            raise InvalidOptionError("backing_format", f"must be a format name, got {name!r}")
        self._backing_format = name
        return self

    def backing(self, name: str, format: str) -> Self:
        """Record a backing file and its format (nothing is opened)."""
        return self.backing_file(name).backing_format(format)

    def data_file(self, name: str, data_storage: Storage | None = None, raw: bool | None = None) -> Self:
        """Keep guest data in the external file *name* (needs compat 1.1).

        *data_storage* is that file, opened for writing; without it the file is created (or
        emptied) next to the image. *raw* keeps it valid as a raw image (``data_file_raw``).
        """
        self._data_file = _recorded_name("data_file", name)
        if data_storage is not None and not isinstance(data_storage, Storage):
            raise InvalidOptionError("data_file", f"expected a Storage, got {type(data_storage).__name__}")
        self._data_storage = data_storage
        if raw is not None:
            self.data_file_raw(raw)
        return self

    def data_file_raw(self, raw: bool | str) -> Self:
        """Keep the external data file valid as a raw image (needs ``data_file``)."""
        self._data_file_raw = _flag("data_file_raw", raw)
        return self

    def validate(self) -> None:
        """The cross-option rules of ``qemu-img create``."""
        v3_only = (
            ("lazy_refcounts", self._lazy_refcounts, "Lazy refcounts"),
            ("extended_l2", self._extended_l2, "Extended L2 entries"),
            ("compression_type", self._compression_type != 0, "Compression types other than zlib"),
            ("data_file", self._data_file is not None, "External data files"),
            ("refcount_bits", self._refcount_order != 4, "Refcount widths other than 16 bits"),
        )
        if self._version < 3:
            for option, used, what in v3_only:
                if used:
                    raise InvalidOptionError(option, f"{what} require compatibility level 1.1 (compat=1.1)")
        if self._extended_l2 and self._cluster_bits < 14:
            raise InvalidOptionError("extended_l2", "extended L2 entries need clusters of at least 16 KiB")
        if self._data_file_raw and self._data_file is None:
            raise InvalidOptionError("data_file_raw", "data_file_raw requires data_file")
        if self._data_file_raw and self._backing_file is not None:
            raise InvalidOptionError("data_file_raw", "a backing file and data_file_raw cannot be used together")
        if self.preallocation is PreallocateMode.ZERO:
            raise InvalidOptionError(
                "preallocation", "qcow2 does not accept the value 'zero' (off, metadata, falloc, full)"
            )
        if self._backing_file is not None and self._backing_format is None:
            raise InvalidOptionError("backing_format", "a backing file needs its format recorded (backing_format)")
        if self._backing_format is not None and self._backing_file is None:
            raise InvalidOptionError("backing_format", "a backing format needs a backing file")
        if self._backing_file is not None and self.preallocation is not PreallocateMode.NONE and not self._extended_l2:
            raise InvalidOptionError(
                "preallocation", "a backing file and preallocation can only be used together with extended_l2"
            )
        if l1_entries(self.virtual_size, self._cluster_bits, self._extended_l2) * 8 > MAX_L1_BYTES:
            raise InvalidOptionError("size", f"{self.virtual_size} bytes is too large for this cluster size")

    @property
    def backing_file_name(self) -> str | None:
        """The backing file name to record, if any."""
        return self._backing_file

    @property
    def backing_format_name(self) -> str | None:
        """The backing file's format to record, if any."""
        return self._backing_format

    def measure(self, data: Sequence[tuple[int, int]] | None) -> Measurement:
        """The file size this image needs, as ``qemu-img measure -O qcow2`` computes it."""
        return measure_image(
            size=self.virtual_size,
            data=data,
            cluster_bits=self._cluster_bits,
            refcount_order=self._refcount_order,
            extended_l2=self._extended_l2,
            version=self._version,
            preallocate_data=self.preallocation in (PreallocateMode.FALLOC, PreallocateMode.FULL),
            has_backing_file=self._backing_file is not None,
        )

    # --- writing ---------------------------------------------------------------------------------

    async def write_image(self) -> None:
        """Write the image (called by ``Qcow2.create_image`` after :meth:`validate`)."""
        storage = self.storage
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        size = self.virtual_size
        prealloc = self.preallocation
        # data_file_raw maps every cluster to the same offset of the data file, as QEMU does.
        layout = plan_image(
            size=size,
            cluster_bits=cluster_bits,
            refcount_order=self._refcount_order,
            extended_l2=self._extended_l2,
            mapped=prealloc is not PreallocateMode.NONE or self._data_file_raw,
            data_in_file=self._data_file is None,
        )
        l1_size = layout.l1_entries
        # The data area: sparse (metadata), reserved (falloc) or written (full).
        data_mode = prealloc if prealloc in (PreallocateMode.FALLOC, PreallocateMode.FULL) else PreallocateMode.NONE

        data_storage = self._data_storage
        if self._data_file is not None and data_storage is None:
            from imago import storage_driver  # the registry: imported when needed, not with the driver

            name = storage.resolve_relative_path(self._data_file)
            data_storage = await storage_driver("file").create(StorageCreateOptions(filename=name, overwrite=True))
            created_data = True
        else:
            created_data = False
        try:
            await storage.resize(0)
            incompat = (
                (INCOMPAT_DATA_FILE if self._data_file is not None else 0)
                | (INCOMPAT_COMPRESSION if self._compression_type else 0)
                | (INCOMPAT_EXTENDED_L2 if self._extended_l2 else 0)
            )
            header = Header(
                version=self._version,
                backing_file_offset=0,
                backing_file_size=0,
                cluster_bits=cluster_bits,
                size=size,
                crypt_method=0,
                l1_size=l1_size,
                l1_table_offset=layout.l1_offset if l1_size else 0,
                refcount_table_offset=layout.refcount_table_offset,
                refcount_table_clusters=layout.refcount_table_clusters,
                nb_snapshots=0,
                snapshots_offset=0,
                incompatible_features=incompat,
                compatible_features=COMPAT_LAZY_REFCOUNTS if self._lazy_refcounts else 0,
                autoclear_features=AUTOCLEAR_DATA_FILE_RAW if self._data_file_raw else 0,
                refcount_order=self._refcount_order,
                header_length=CREATED_V3_HEADER_LENGTH if self._version >= 3 else V2_HEADER_LENGTH,
                compression_type=self._compression_type,
                backing_file=self._backing_file,
                backing_format=self._backing_format,
                data_file=self._data_file,
            )
            try:
                header_bytes = build_header(header)
            except ValueError as error:
                raise InvalidOptionError("backing_file", str(error)) from None
            await storage.writev([memoryview(header_bytes)], 0)
            await self._write_refcounts(storage, layout)

            l1 = bytearray(l1_size * 8)
            if layout.l2_tables:
                struct.pack_into(
                    f">{l1_size}Q",
                    l1,
                    0,
                    *((layout.l2_offset + i * cluster_size) | OFLAG_COPIED for i in range(l1_size)),
                )
                await self._write_l2_tables(storage, layout)
            if l1:
                await storage.writev([memoryview(l1)], layout.l1_offset)

            if layout.data_clusters:
                await storage.resize(layout.data_offset + layout.data_clusters * cluster_size, data_mode)
            elif storage.size < layout.data_offset:
                await storage.resize(layout.data_offset)
            if data_storage is not None:
                await data_storage.resize(0)
                # Sized like the disk, as QEMU does: sparse unless preallocated.
                await data_storage.resize(size, data_mode)
                await data_storage.flush()
            await storage.flush()
        finally:
            if created_data and data_storage is not None:
                await data_storage.close()

    async def _write_refcounts(self, storage: Storage, layout: ImageLayout) -> None:
        """The refcount table and blocks: every cluster the layout uses counted once."""
        cluster_size = 1 << layout.cluster_bits
        blocks = layout.refcount_blocks
        blocks_offset = layout.refcount_blocks_offset
        reftable = bytearray(layout.refcount_table_clusters * cluster_size)
        struct.pack_into(f">{blocks}Q", reftable, 0, *(blocks_offset + i * cluster_size for i in range(blocks)))
        await storage.writev([memoryview(reftable)], layout.refcount_table_offset)
        per_block = cluster_size * 8 >> self._refcount_order
        total = layout.clusters_in_use
        for index in range(blocks):
            block = RefcountBlock(bytearray(cluster_size), offset=0, refcount_order=self._refcount_order)
            first = index * per_block
            for entry in range(min(per_block, total - first)):
                block.set(entry, 1)
            await storage.writev([memoryview(block.data)], blocks_offset + index * cluster_size)

    async def _write_l2_tables(self, storage: Storage, layout: ImageLayout) -> None:
        """L2 tables mapping every guest cluster: to the data area, or guest = host in a data file."""
        cluster_size = 1 << layout.cluster_bits
        per_table = layout.entries_per_table
        for table in range(layout.l2_tables):
            first = table * per_table
            words: list[int] = []
            for cluster in range(first, min(first + per_table, layout.guest_clusters)):
                words.append(layout.data_host(cluster) | OFLAG_COPIED)
                if self._extended_l2:
                    # As QEMU does: the host cluster is reserved, its subclusters stay unallocated
                    # (reading as zero, or as the backing file).
                    words.append(0)
            raw = bytearray(cluster_size)
            struct.pack_into(f">{len(words)}Q", raw, 0, *words)
            await storage.writev([memoryview(raw)], layout.l2_offset + table * cluster_size)
