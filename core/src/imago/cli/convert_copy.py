"""The copy engine of ``imago convert``: qemu-img convert's loop over the sources, on the async API.

The sources are one concatenated disk, walked in qemu-img's steps: the block status of the
next range (data, zero, or left to the target's backing file), then at most one buffer of
data. ``requests`` workers (``-m``) run these steps concurrently on an event loop: the status
walk is sequential, reads and writes overlap (the file storage runs them on its thread pool),
and writes start in disk order unless ``in_order`` is off (``-W``). Zero runs in the
data read are left sparse by qemu-img's ``-S`` rule (:mod:`imago.cli.convert_sparse`). Data
that one raw extent of a source holds is looked at through the storage's memory map
(:meth:`imago.Storage.map_read`) where it has one, so the only copy of the bytes is the
target's write.

Ctrl-C stops the workers between requests (each finishes the write it started), so the
target's metadata stays consistent.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence

import attrs

from ..format.access import FormatAccess
from ..format.mapping import (
    MappingEof,
    MappingRaw,
    MappingZero,
    ShallowEof,
    ShallowIndirect,
    ShallowRaw,
    ShallowZero,
)
from .common import check_interrupt
from .convert_sparse import SECTOR, is_zero, sparse_plan
from .holes import Holes

__all__ = ["BUFFER_SECTORS", "Copier", "Source", "Status"]

#: qemu-img's buffer: 2 MiB of data per request.
BUFFER_SECTORS = (2 << 20) // SECTOR
#: The largest status query (qemu's request limit, in sectors, rounded to 1 GiB).
_MAX_STATUS_SECTORS = (1 << 30) // SECTOR


class Status(enum.Enum):
    """What a range of the sources is, for the target."""

    DATA = "data"
    ZERO = "zero"
    #: Unallocated in the source's top layer: left to the target's backing file.
    BACKING = "backing"


@attrs.define
class Source:
    """One source disk: its access, its size in sectors and its alignment (cluster) in sectors."""

    access: FormatAccess
    sectors: int
    alignment: int
    start: int = 0
    #: The holes of its raw layers' files (read as zero, skipped as qemu-img skips them).
    holes: Holes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.holes = Holes(self.access)


@attrs.define
class Copier:
    """Copies the concatenated *sources* into *target*, qemu-img convert's way.

    *min_sparse* is ``-S`` in sectors (0: write everything), *alignment* the sector alignment of
    sparse runs, *has_zero_init* whether the target reads as zero where nothing is written,
    *target_backing_sectors* the size of the target's backing file (or ``None``) when the
    target has one (``-B``), *compressed* writes compressed clusters of *cluster_sectors*.
    """

    sources: Sequence[Source]
    target: FormatAccess
    min_sparse: int
    alignment: int
    has_zero_init: bool
    target_backing_sectors: int | None = None
    compressed: bool = False
    cluster_sectors: int = 1
    requests: int = 8
    in_order: bool = True
    #: Look at data through the source storage's memory map where it has one (no read copy).
    zero_copy: bool = True
    on_progress: Callable[[int], None] | None = None

    total: int = attrs.field(init=False, default=0)
    _next: int = attrs.field(init=False, default=0)
    _status: Status = attrs.field(init=False, default=Status.DATA)
    _status_end: int = attrs.field(init=False, default=0)
    _walk: asyncio.Lock = attrs.field(init=False, factory=asyncio.Lock)
    _issued: int = attrs.field(init=False, default=0)
    _turn: asyncio.Condition = attrs.field(init=False, factory=asyncio.Condition)
    _stop: bool = attrs.field(init=False, default=False)
    _error: BaseException | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        start = 0
        for source in self.sources:
            source.start = start
            start += source.sectors
        self.total = start

    @property
    def target_has_backing(self) -> bool:
        """Whether the target has a backing file (unallocated source ranges stay unallocated)."""
        return self.target_backing_sectors is not None

    # --- the walk -----------------------------------------------------------------------------

    def _source_at(self, sector: int) -> Source:
        for source in self.sources:
            if sector < source.start + source.sectors:
                return source
        raise AssertionError(f"sector {sector} past the sources")

    async def _block_status(self, sector: int, count: int) -> tuple[Status, int]:
        """The status of the sectors at *sector* (inside one source) and how many share it."""
        source = self._source_at(sector)
        access = source.access
        relative = sector - source.start
        count = min(count, source.sectors - relative)
        offset = relative * SECTOR
        length = min(count * SECTOR, access.size - offset)
        if self.target_has_backing:
            shallow, mapped = await access.get_shallow_mapping(offset, length)
            if isinstance(shallow, ShallowIndirect):
                status = Status.BACKING
            elif isinstance(shallow, (ShallowZero, ShallowEof)):
                status = Status.ZERO
            else:
                status = Status.DATA
                if isinstance(shallow, ShallowRaw):
                    is_data, mapped = await source.holes.data_run(shallow, min(mapped, length))
                    status = Status.DATA if is_data else Status.ZERO
        else:
            deep, mapped = await access.get_mapping(offset, length)
            status = Status.ZERO if isinstance(deep, (MappingZero, MappingEof)) else Status.DATA
            if isinstance(deep, MappingRaw):
                is_data, mapped = await source.holes.data_run(deep, min(mapped, length))
                status = Status.DATA if is_data else Status.ZERO
        count = min(count, max(1, -(-mapped // SECTOR)))
        # Keep the next status query aligned to the source's clusters.
        tail = (relative + count) % source.alignment
        if count > tail:
            count -= tail
        return status, count

    async def _next_request(self) -> tuple[int, int, Status] | None:
        """qemu-img's ``convert_iteration_sectors``: the next (sector, count, status), or ``None``."""
        async with self._walk:
            sector = self._next
            if sector >= self.total or self._stop:
                return None
            count = min(self.total - sector, _MAX_STATUS_SECTORS)
            beyond_backing = False
            backing = self.target_backing_sectors
            if backing is not None:
                if sector >= backing:
                    beyond_backing = True
                elif sector + count > backing:
                    count = backing - sector
            if self._status_end <= sector:
                status, count = await self._block_status(sector, count)
                if status is Status.ZERO and beyond_backing:
                    status = Status.BACKING
                self._status = status
                self._status_end = sector + count
            count = min(count, self._status_end - sector)
            status = self._status
            if status is Status.DATA or (status is Status.ZERO and self.min_sparse == 0):
                count = min(count, BUFFER_SECTORS)  # one buffer of data (-S 0 writes zeroes as data)
            if self.compressed:
                # Compressed clusters are written whole: a short range becomes a whole cluster of data.
                if count < self.cluster_sectors:
                    count = min(self.cluster_sectors, self.total - sector)
                    status = Status.DATA
                else:
                    count -= count % self.cluster_sectors
            self._next = sector + count
            return sector, count, status

    # --- the requests -------------------------------------------------------------------------

    async def run(self) -> None:
        """Copy everything; the first error (or Ctrl-C) stops all workers after their request."""
        self._walk = asyncio.Lock()
        self._turn = asyncio.Condition()
        workers = max(1, self.requests)
        buffer_sectors = max(BUFFER_SECTORS, self.cluster_sectors)
        await asyncio.gather(*(self._worker(bytearray(buffer_sectors * SECTOR)) for _ in range(workers)))
        if self._error is not None:
            raise self._error

    async def _worker(self, buf: bytearray) -> None:
        try:
            while not self._stop:
                check_interrupt()
                request = await self._next_request()
                if request is None:
                    return
                sector, count, status = request
                data = memoryview(buf)
                if status is Status.DATA:
                    mapped = await self._mapped(sector, count)
                    if mapped is None:
                        await self._read(buf, sector, count)
                    else:
                        data = mapped
                elif self.min_sparse == 0 and status is Status.ZERO:
                    status = Status.DATA
                    buf[: count * SECTOR] = bytes(count * SECTOR)
                if self.in_order:
                    # Writes start in disk order (formats allocate in the order writes come, as
                    # QEMU's do); once started, one runs alongside the next.
                    async with self._turn:
                        await self._turn.wait_for(self._my_turn(sector))
                    if self._stop:
                        return
                    write = asyncio.ensure_future(self._write(data, sector, count, status))
                    await asyncio.sleep(0)  # the write runs up to its first wait (its allocation)
                    async with self._turn:
                        self._issued = sector + count
                        self._turn.notify_all()
                    await write
                else:
                    await self._write(data, sector, count, status)
                del data
                if self.on_progress is not None:
                    self.on_progress(count * SECTOR)
        except BaseException as error:
            if self._error is None:
                self._error = error
            self._stop = True
            async with self._turn:
                self._turn.notify_all()

    def _my_turn(self, sector: int) -> Callable[[], bool]:
        """Whether the writes before *sector* have started (or the copy stops)."""
        return lambda: self._issued == sector or self._stop

    async def _mapped(self, sector: int, count: int) -> memoryview | None:
        """The source's bytes of the sectors as a memory map, when one raw extent holds them all."""
        if not self.zero_copy:
            return None
        source = self._source_at(sector)
        relative = sector - source.start
        offset, length = relative * SECTOR, count * SECTOR
        if offset + length > source.access.size:
            return None
        mapping, mapped = await source.access.get_mapping(offset, length)
        if not isinstance(mapping, MappingRaw) or mapped < length:
            return None
        return mapping.storage.map_read(mapping.offset, length)

    async def _read(self, buf: bytearray, sector: int, count: int) -> None:
        """Read *count* sectors of the concatenated sources into *buf*; bytes past a source's end are zero."""
        view = memoryview(buf)
        done = 0
        while done < count:
            source = self._source_at(sector + done)
            relative = sector + done - source.start
            step = min(count - done, source.sectors - relative)
            offset = relative * SECTOR
            inside = min(step * SECTOR, source.access.size - offset)
            part = view[done * SECTOR : (done + step) * SECTOR]
            await source.access.read(part[:inside], offset)
            if inside < step * SECTOR:
                part[inside:] = bytes(step * SECTOR - inside)
            done += step

    async def _write(self, view: memoryview, sector: int, count: int, status: Status) -> None:
        """qemu-img's ``convert_co_write``: data, sparse runs, zeroes, or nothing (backing)."""
        if status is Status.BACKING:
            return
        if status is Status.DATA:
            if self.compressed:
                await self._write_compressed(view, sector, count)
                return
            for first, length, data in sparse_plan(view, count, self.min_sparse, sector, self.alignment):
                if data:
                    await self.target.write(view[first * SECTOR : (first + length) * SECTOR], (sector + first) * SECTOR)
                else:
                    await self._zero(sector + first, length)
            return
        await self._zero(sector, count)

    async def _write_compressed(self, view: memoryview, sector: int, count: int) -> None:
        """Compress the clusters that hold data, in runs; all-zero clusters take the zero path."""
        step = self.cluster_sectors
        first = 0
        while first < count:
            data = not is_zero(view, first * SECTOR, min(step, count - first) * SECTOR)
            end = first + step
            while end < count and (not is_zero(view, end * SECTOR, min(step, count - end) * SECTOR)) == data:
                end += step
            end = min(end, count)
            if data:
                await self.target.write_compressed(view[first * SECTOR : end * SECTOR], (sector + first) * SECTOR)
            else:
                await self._zero(sector + first, end - first)
            first = end

    async def _zero(self, sector: int, count: int) -> None:
        if self.has_zero_init:
            return
        await self.target.discard_to_zero(sector * SECTOR, count * SECTOR)
