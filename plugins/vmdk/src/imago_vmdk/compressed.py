"""Compressed grains (stream-optimized extents): reading and inflating them, bounded.

A compressed grain is a zlib stream (RFC 1950, as QEMU's ``uncompress`` and VMware write it),
preceded by a grain marker (its LBA and compressed size) when the extent has markers. Input is
bounded (a marker's size up to two grains, as QEMU's reader allows for data that does not
shrink) and so is output (at most one grain: more is refused), so a deflate bomb costs one
grain of memory and the time to inflate one grain. Inflating runs on all cores, with ISA-L's
inflate when it is installed (as the qcow2 plugin does).
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, cast

from imago import CorruptImageError, runtime

from .extents import RunKind, SparseExtent

__all__ = ["INFLATE", "CompressedReader", "inflate_grain"]

_MARKER = struct.Struct("<QI")


def _inflate_module() -> tuple[Any, tuple[type[Exception], ...]]:
    try:
        from isal import isal_zlib

        return isal_zlib, (cast(type[Exception], isal_zlib.error), zlib.error)
    except ImportError:
        return zlib, (zlib.error,)


#: The inflate module in use (``isal.isal_zlib`` or ``zlib``).
INFLATE, _ERRORS = _inflate_module()
# Decompressed grains kept, so that small reads of one grain inflate it once.
_KEPT_GRAINS = 16


def inflate_grain(data: bytes | memoryview, grain_size: int, needed: int, where: str | None, host: int) -> bytes:
    """Inflate one grain's zlib stream: at most *grain_size* bytes, at least *needed*.

    *where* (the file) and *host* (the grain's offset in it) go into errors.
    """
    try:
        inflater = INFLATE.decompressobj()
        out: bytes = inflater.decompress(data, grain_size)
        more = inflater.decompress(inflater.unconsumed_tail, 1) if len(out) == grain_size else b""
    except _ERRORS as error:
        raise CorruptImageError(where, host, f"the compressed grain cannot be inflated: {error}") from None
    if more:
        raise CorruptImageError(where, host, f"the compressed grain inflates to more than a grain ({grain_size} bytes)")
    if len(out) < needed:
        raise CorruptImageError(
            where, host, f"the compressed grain inflates to {len(out)} bytes; the disk needs {needed} of it"
        )
    return out


# Where each grain's part of a request goes: [(destination view, offset in the grain)].
_Targets = list[tuple[memoryview, int]]


class CompressedReader:
    """Reads the compressed grains of the extents of one image (a few decompressed ones kept)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    async def read(self, extent: SparseExtent, pieces: dict[int, _Targets]) -> None:
        """Fill *pieces* (extent-relative grain offset -> targets) from *extent*'s compressed grains."""
        layout = extent.layout
        grain_size = layout.grain_size
        storage = extent.storage_checked
        where = storage.filename
        file_size = storage.size
        work: list[tuple[bytes, int, int, _Targets]] = []
        for grain_offset, targets in pieces.items():
            kind, host = await extent.grain(grain_offset)
            if kind is not RunKind.COMPRESSED:
                # (the engine only asks for what get_mapping reported as Special)
                raise CorruptImageError(where, None, f"no compressed grain at offset {grain_offset:#x} of the extent")
            kept = self._kept.get((id(extent), host))
            if kept is not None:
                self._kept.move_to_end((id(extent), host))
                for target, within in targets:
                    target[:] = kept[within : within + target.nbytes]
                continue
            needed = min(grain_size, extent.size - grain_offset)
            data = await self._compressed_data(extent, grain_offset, host, file_size)
            work.append((data, host, needed, targets))
        if not work:
            return

        def inflate(item: tuple[bytes, int, int, _Targets]) -> bytes | Exception:
            data, host, needed, targets = item
            try:
                grain = inflate_grain(data, grain_size, needed, where, host)
            except Exception as error:
                return error
            for target, within in targets:
                target[:] = grain[within : within + target.nbytes]
            return grain

        results = await runtime.run_parallel(inflate, work)
        for result in results:
            if isinstance(result, Exception):
                raise result
        for (_, host, _, targets), grain in zip(work, results, strict=True):
            if isinstance(grain, bytes) and (len(targets) > 1 or targets[0][0].nbytes < grain_size):
                self._kept[(id(extent), host)] = grain
        while len(self._kept) > _KEPT_GRAINS:
            self._kept.popitem(last=False)

    @staticmethod
    async def _compressed_data(extent: SparseExtent, grain_offset: int, host: int, file_size: int) -> bytes:
        """The compressed bytes of the grain at *host* (its marker checked)."""
        layout = extent.layout
        grain_size = layout.grain_size
        storage = extent.storage_checked
        where = storage.filename
        if not layout.has_markers:
            # No size recorded: the stream ends itself; at most two grains of it are read.
            buf = bytearray(min(2 * grain_size, file_size - host))
            await storage.readv([memoryview(buf)], host)
            return bytes(buf)
        head = bytearray(min(grain_size + 512, file_size - host))
        await storage.readv([memoryview(head)], host)
        if len(head) < _MARKER.size:
            raise CorruptImageError(where, host, "the grain marker lies past the end of the file")
        lba, size = _MARKER.unpack_from(head)
        if lba != grain_offset // 512:
            raise CorruptImageError(
                where, host, f"the grain marker's LBA {lba} is not the grain's sector {grain_offset // 512}"
            )
        if size == 0 or size > 2 * grain_size:
            raise CorruptImageError(
                where, host, f"the grain marker's size {size} is out of range (1 to {2 * grain_size} bytes)"
            )
        end = _MARKER.size + size
        if host + end > file_size:
            raise CorruptImageError(where, host, "the compressed grain lies past the end of the file")
        if end <= len(head):
            return bytes(head[_MARKER.size : end])
        rest = bytearray(end - len(head))
        await storage.readv([memoryview(rest)], host + len(head))
        return bytes(head[_MARKER.size :]) + bytes(rest)


def split_by_grain(bufs: Sequence[memoryview], offset: int, grain_size: int) -> dict[int, _Targets]:
    """*bufs* (a request at extent-relative *offset*) cut at grain boundaries: grain offset -> targets."""
    pieces: dict[int, _Targets] = {}
    position = offset
    for view in bufs:
        done = 0
        while done < view.nbytes:
            within = position % grain_size
            step = min(view.nbytes - done, grain_size - within)
            pieces.setdefault(position - within, []).append((view[done : done + step], within))
            done += step
            position += step
    return pieces
