"""The bytes of a stream-optimized VMDK, laid out as VMware's own tools write it.

A stream-optimized extent is written front to back, never seeking back:

- sector 0: a version 3 ``KDMV`` header whose ``gdOffset`` is -1 (the grain directory is in the
  footer), flags: new-line test, compressed grains, markers;
- the embedded descriptor (``createType="streamOptimized"``), then padding up to ``overHead``;
- the grains in increasing LBA order, each a grain marker (LBA, compressed size) followed by its
  zlib stream, padded to a sector; all-zero grains are not written;
- after the last grain a grain table covers, that table, preceded by a grain table marker
  (tables without grains are not written: their directory entry stays 0);
- the grain directory preceded by its marker, the footer marker, the footer (a copy of the header
  with the real ``gdOffset``) and the end-of-stream marker.

:class:`StreamEncoder` produces these pieces; the writers (:mod:`.stream`, :mod:`.stream_append`)
only decide where the bytes go.
"""

from __future__ import annotations

import random
import struct
import zlib
from typing import Any

from imago import InvalidOptionError

__all__ = [
    "ADAPTER_TYPES",
    "DEFAULT_GRAIN_SIZE",
    "GTES_PER_GT",
    "SECTOR",
    "StreamEncoder",
    "compress_grain",
    "stream_descriptor",
]

SECTOR = 512
#: VMware's grain: 128 sectors.
DEFAULT_GRAIN_SIZE = 64 * 1024
GTES_PER_GT = 512
#: The adapter types qemu-img accepts (``adapter_type``).
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")

_FLAGS = (1 << 0) | (1 << 16) | (1 << 17)  # new-line test, compressed grains, markers
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")
_META_MARKER = struct.Struct("<QII")
_MARKER_EOS, _MARKER_GT, _MARKER_GD, _MARKER_FOOTER = 0, 1, 2, 3
# VMware reserves this many sectors for the header and descriptor before the first grain.
_OVERHEAD_ALIGN = 128
_DESCRIPTOR_MIN_SECTORS = 20


def _deflate_module() -> tuple[Any, int]:
    try:
        from isal import isal_zlib

        # ISA-L's level 1 is several times zlib's speed at a close ratio (as the qcow2 plugin).
        return isal_zlib, 1
    except ImportError:
        return zlib, zlib.Z_DEFAULT_COMPRESSION


_DEFLATE, _LEVEL = _deflate_module()


def compress_grain(data: bytes | memoryview) -> bytes:
    """One grain as a zlib stream (RFC 1950, what VMware and QEMU inflate); releases the GIL."""
    packed: bytes = _DEFLATE.compress(data, _LEVEL)
    return packed


def _pad(length: int) -> int:
    return -length % SECTOR


def _meta(sectors: int, kind: int) -> bytes:
    """A metadata marker (its size field 0) for *sectors* of metadata, padded to a sector."""
    marker = _META_MARKER.pack(sectors, 0, kind)
    return marker + bytes(SECTOR - len(marker))


def stream_descriptor(
    size: int,
    extent_name: str,
    *,
    adapter_type: str = "ide",
    hwversion: str = "4",
    toolsversion: str = "2147483647",
    cid: int | None = None,
) -> bytes:
    """The embedded descriptor of a stream-optimized disk of *size* bytes (rounded up to sectors).

    Geometry as qemu-img computes it: 16 heads for IDE, 255 for SCSI adapters, 63 sectors per
    track, the cylinders that fit.
    """
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidOptionError(
            "adapter_type", f"unknown adapter type {adapter_type!r} (one of {', '.join(ADAPTER_TYPES)})"
        )
    for option, value in (("hwversion", hwversion), ("toolsversion", toolsversion)):
        if not value or any(c in value for c in '"\n\r\0'):
            raise InvalidOptionError(option, f"invalid value {value!r}")
    if any(c in extent_name for c in '"\n\r\0'):
        raise InvalidOptionError("extent_name", f"invalid extent file name {extent_name!r}")
    sectors = -(-size // SECTOR)
    heads = 16 if adapter_type == "ide" else 255
    cylinders = size // (63 * heads * SECTOR)
    if cid is None:
        cid = random.getrandbits(32)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} SPARSE "{extent_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.longContentID = "{random.getrandbits(128):032x}"\n'
        f'ddb.toolsVersion = "{toolsversion}"\n'
        f'ddb.virtualHWVersion = "{hwversion}"\n'
    )
    return text.encode()


class StreamEncoder:
    """The pieces of one stream-optimized extent, produced in file order.

    The caller passes grains in increasing LBA order (:meth:`grain`) and finishes with
    :meth:`trailer`; every method returns the bytes to append and advances :attr:`position`
    (the file offset the next bytes go to). Only the current grain table and the grain directory
    are held in memory (4 bytes per 32 MiB of disk).
    """

    def __init__(self, size: int, descriptor: bytes, *, grain_size: int = DEFAULT_GRAIN_SIZE) -> None:
        if grain_size < SECTOR or grain_size % SECTOR or grain_size > 1 << 30:
            raise InvalidOptionError("grain_size", f"{grain_size} is not a multiple of 512 from 512 to 1 GiB")
        self.size = size
        self.grain_size = grain_size
        self.capacity_sectors = -(-size // SECTOR)
        self.grains = -(-size // grain_size)
        self.descriptor = descriptor
        self.descriptor_sectors = max(_DESCRIPTOR_MIN_SECTORS, -(-len(descriptor) // SECTOR))
        overhead = 1 + self.descriptor_sectors
        self.overhead_sectors = -(-overhead // _OVERHEAD_ALIGN) * _OVERHEAD_ALIGN
        coverage = GTES_PER_GT * grain_size // SECTOR
        self.gd_entries = -(-self.capacity_sectors // coverage)
        self.directory = [0] * self.gd_entries
        self.position = 0
        self._table: list[int] | None = None
        self._table_index = -1
        self._next_grain = 0

    @classmethod
    def after_head(cls, size: int, grain_size: int, descriptor_sectors: int, overhead_sectors: int) -> StreamEncoder:
        """An encoder for an extent whose head (header, descriptor) is already written: grains come next."""
        encoder = cls(size, b"", grain_size=grain_size)
        encoder.descriptor_sectors = descriptor_sectors
        encoder.overhead_sectors = overhead_sectors
        encoder.position = overhead_sectors * SECTOR
        return encoder

    # --- header ---------------------------------------------------------------------------

    def _header(self, gd_sector: int) -> bytes:
        fields = _HEADER.pack(
            b"KDMV",
            3,
            _FLAGS,
            self.capacity_sectors,
            self.grain_size // SECTOR,
            1,
            self.descriptor_sectors,
            GTES_PER_GT,
            0,
            gd_sector,
            self.overhead_sectors,
            0,
            b"\n \r\n",
            1,
        )
        return fields + bytes(SECTOR - len(fields))

    def head(self) -> bytes:
        """The header (``gdOffset`` -1), the descriptor and the padding up to the first grain."""
        if self.position:
            raise RuntimeError("the head is written first")
        out = self._header(_GD_AT_END) + self.descriptor
        out += bytes(self.overhead_sectors * SECTOR - len(out))
        self.position = len(out)
        return out

    # --- grains and tables ----------------------------------------------------------------

    def grain(self, index: int, packed: bytes) -> bytes:
        """A marker and the zlib stream *packed* of grain *index*, preceded by a finished table if any."""
        if index < self._next_grain or index >= self.grains:
            raise ValueError(f"grain {index} out of order or past the disk ({self.grains} grains)")
        self._next_grain = index + 1
        out = b""
        table_index = index // GTES_PER_GT
        if table_index != self._table_index:
            out = self._close_table()
            self._table = [0] * GTES_PER_GT
            self._table_index = table_index
        assert self._table is not None
        self._table[index % GTES_PER_GT] = (self.position + len(out)) // SECTOR
        record = _GRAIN_MARKER.pack(index * (self.grain_size // SECTOR), len(packed)) + packed
        out += record + bytes(_pad(len(record)))
        self.position += len(out)
        return out

    def _close_table(self) -> bytes:
        """The current grain table with its marker (nothing when there is none); position unchanged."""
        if self._table is None:
            return b""
        table = self._table
        self._table = None
        gt_bytes = GTES_PER_GT * 4
        self.directory[self._table_index] = self.position // SECTOR + 1
        return _meta(gt_bytes // SECTOR, _MARKER_GT) + struct.pack(f"<{GTES_PER_GT}I", *table)

    def trailer(self) -> bytes:
        """The last grain table, the grain directory, the footer and the end-of-stream marker."""
        table = self._close_table()
        self.position += len(table)
        gd_bytes = struct.pack(f"<{self.gd_entries}I", *self.directory)
        gd_bytes += bytes(_pad(len(gd_bytes)))
        gd_sector = self.position // SECTOR + 1
        rest = _meta(len(gd_bytes) // SECTOR, _MARKER_GD) + gd_bytes
        rest += _meta(1, _MARKER_FOOTER) + self._header(gd_sector) + _meta(0, _MARKER_EOS)
        self.position += len(rest)
        return table + rest

    def snapshot(self) -> tuple[list[int] | None, int, int, int, list[int]]:
        """The state :meth:`trailer` changes, so that a writer can emit a trailer and go on appending."""
        table = None if self._table is None else list(self._table)
        return table, self._table_index, self._next_grain, self.position, list(self.directory)

    def restore(self, state: tuple[list[int] | None, int, int, int, list[int]]) -> None:
        """Undo :meth:`trailer` (see :meth:`snapshot`)."""
        self._table, self._table_index, self._next_grain, self.position, self.directory = state
