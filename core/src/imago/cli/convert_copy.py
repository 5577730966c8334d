"""The copy engine of ``imago convert``: qemu-img convert's loop over the sources, on the async API.

The sources are one concatenated disk, walked in qemu-img's steps: the block status of the
next range (data, zero, or left to the target's backing file), then at most one buffer of
data. ``requests`` workers (``-m``) run these steps concurrently on an event loop: the status
walk is sequential, reads and writes overlap (the file storage runs them on its thread pool),
and writes start in disk order unless ``in_order`` is off (``-W``). Zero runs in the
data read are left sparse by qemu-img's ``-S`` rule (:mod:`imago.cli.convert_sparse`). Data
that one raw extent of a source holds is looked at through the storage's memory map
(:meth:`imago.Storage.map_read`) where it has one, so the only copy of the bytes is the
target's write; such data goes in requests of several buffers (mapped and scanned on an I/O
thread), each buffer's worth scanned on its own as qemu-img's are, so the result is the same.

Ctrl-C stops the workers between requests (each finishes the write it started), so the
target's metadata stays consistent.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence

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
from ..runtime import run_blocking
from ..storage import Storage
from .common import check_interrupt
from .convert_sparse import SECTOR, is_zero, sparse_plan
from .holes import Holes

__all__ = ["BUFFER_SECTORS", "Copier", "Source", "Status"]

#: qemu-img's buffer: 2 MiB of data per request.
BUFFER_SECTORS = (2 << 20) // SECTOR
#: What requests without data (zeroes, the backing file's) carry.
_NO_DATA = memoryview(b"")
#: Runs of data: ``(first sector, sectors, data?)``, written or left sparse (``-S``).
Plan = list[tuple[int, int, bool]]

#: The largest request over data that one raw extent of a source holds, looked at through a memory
#: map: several buffers' worth, split into qemu-img's buffers only for the ``-S`` scan (same result).
MAPPED_SECTORS = 8 * BUFFER_SECTORS
#: The largest status query (qemu's request limit, in sectors, rounded to 1 GiB).
_MAX_STATUS_SECTORS = (1 << 30) // SECTOR


class Status(enum.Enum):
    """What a range of the sources is, for the target."""

    DATA = "data"
    ZERO = "zero"
    #: Unallocated in the source's top layer: left to the target's backing file.
    BACKING = "backing"


class Source:
    """One source disk: its access, its size in sectors and its alignment (cluster) in sectors."""

    __slots__ = ("access", "alignment", "holes", "mappable", "sectors", "start")

    def __init__(self, access: FormatAccess, sectors: int, alignment: int, start: int = 0) -> None:
        self.access = access
        self.sectors = sectors
        self.alignment = alignment
        self.start = start
        #: The holes of its raw layers' files (read as zero, skipped as qemu-img skips them).
        self.holes = Holes(access)
        #: Whether its raw extents can be looked at through memory maps (until one is refused).
        self.mappable = True


class Copier:
    """Copies the concatenated *sources* into *target*, qemu-img convert's way.

    *min_sparse* is ``-S`` in sectors (0: write everything), *alignment* the sector alignment of
    sparse runs, *has_zero_init* whether the target reads as zero where nothing is written,
    *target_backing_sectors* the size of the target's backing file (or ``None``) when the
    target has one (``-B``), *compressed* writes compressed clusters of *cluster_sectors*,
    *requests* requests run at once, *in_order* writes start in disk order, *zero_copy* data is
    looked at through the source storage's memory map where it has one (no read copy),
    *data_writes* data writes run at once at most (``None``: as many as requests).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        target: FormatAccess,
        *,
        min_sparse: int,
        alignment: int,
        has_zero_init: bool,
        target_backing_sectors: int | None = None,
        compressed: bool = False,
        cluster_sectors: int = 1,
        requests: int = 8,
        in_order: bool = True,
        zero_copy: bool = True,
        data_writes: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.sources = sources
        self.target = target
        self.min_sparse = min_sparse
        self.alignment = alignment
        self.has_zero_init = has_zero_init
        self.target_backing_sectors = target_backing_sectors
        self.compressed = compressed
        # A target taking data only compressed and in order gets each request as one write, all-zero
        # clusters included (it skips them): a write's place is taken when it starts, and a request
        # split into several writes could interleave with the next request's.
        self.sequential = compressed and target.driver.writes_compressed
        self.cluster_sectors = cluster_sectors
        self.requests = requests
        self.in_order = in_order
        self.zero_copy = zero_copy
        self.on_progress = on_progress
        self._data_writes = asyncio.Semaphore(data_writes or requests)
        self._next = 0
        self._status = Status.DATA
        self._status_end = 0
        # Whether the current status run is data in one raw extent (requests over it may be large).
        self._status_raw = False
        self._walk = asyncio.Lock()
        self._issued = 0
        self._turn = asyncio.Condition()
        self._stop = False
        self._error: BaseException | None = None
        start = 0
        for source in sources:
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

    async def _block_status(self, sector: int, count: int) -> tuple[Status, int, bool]:
        """The status of the sectors at *sector* (inside one source), and how many share it.

        Third: whether they are data in one raw extent of a source whose extents can be mapped.
        """
        source = self._source_at(sector)
        access = source.access
        relative = sector - source.start
        count = min(count, source.sectors - relative)
        offset = relative * SECTOR
        length = min(count * SECTOR, access.size - offset)
        raw = False
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
                    raw = is_data
        else:
            deep, mapped = await access.get_mapping(offset, length)
            status = Status.ZERO if isinstance(deep, (MappingZero, MappingEof)) else Status.DATA
            if isinstance(deep, MappingRaw):
                is_data, mapped = await source.holes.data_run(deep, min(mapped, length))
                status = Status.DATA if is_data else Status.ZERO
                raw = is_data
        count = min(count, max(1, -(-mapped // SECTOR)))
        # Keep the next status query aligned to the source's clusters.
        tail = (relative + count) % source.alignment
        if count > tail:
            count -= tail
        return status, count, raw and source.mappable

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
                status, count, raw = await self._block_status(sector, count)
                if status is Status.ZERO and beyond_backing:
                    status = Status.BACKING
                self._status = status
                self._status_raw = raw and self.zero_copy
                self._status_end = sector + count
            count = min(count, self._status_end - sector)
            status = self._status
            if status is Status.DATA and self._status_raw:
                count = min(count, MAPPED_SECTORS)
            elif status is Status.DATA or (status is Status.ZERO and self.min_sparse == 0):
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
        await asyncio.gather(*(self._worker() for _ in range(workers)))
        if self._error is not None:
            raise self._error

    async def _worker(self) -> None:
        # The worker's buffer, made when first needed: data seen through memory maps needs none.
        buf = bytearray()
        buffer_bytes = max(BUFFER_SECTORS, self.cluster_sectors) * SECTOR
        try:
            while not self._stop:
                check_interrupt()
                request = await self._next_request()
                if request is None:
                    return
                sector, count, status = request
                data = _NO_DATA
                plan: Plan | None = None
                if status is Status.DATA:
                    mapped = await self._mapped(sector, count)
                    if mapped is None:
                        if count * SECTOR > buffer_bytes:
                            # A large request not mapped after all (a source's unaligned end): read it whole.
                            data = memoryview(bytearray(count * SECTOR))
                        else:
                            buf = buf or bytearray(buffer_bytes)
                            data = memoryview(buf)
                        await self._read(data, sector, count)
                    else:
                        data, plan = mapped
                elif self.min_sparse == 0 and status is Status.ZERO:
                    status = Status.DATA
                    buf = buf or bytearray(buffer_bytes)
                    buf[: count * SECTOR] = bytes(count * SECTOR)
                    data = memoryview(buf)
                if self.in_order:
                    # Writes start in disk order (formats allocate in the order writes come, as
                    # QEMU's do); once started, one runs alongside the next.
                    async with self._turn:
                        await self._turn.wait_for(self._my_turn(sector))
                    if self._stop:
                        return
                    write = asyncio.ensure_future(self._write(data, sector, count, status, plan))
                    await asyncio.sleep(0)  # the write runs up to its first wait (its allocation)
                    async with self._turn:
                        self._issued = sector + count
                        self._turn.notify_all()
                    await write
                else:
                    await self._write(data, sector, count, status, plan)
                del data, plan
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

    async def _mapped(self, sector: int, count: int) -> tuple[memoryview, Plan | None] | None:
        """The source's bytes of the sectors as a memory map, when one raw extent holds them all.

        With their ``-S`` plan (``None`` for compressed writes): the pages are mapped in and
        scanned on an I/O thread, so that the kernel's work for one request overlaps the loop's
        for the next.
        """
        if not self.zero_copy:
            return None
        source = self._source_at(sector)
        relative = sector - source.start
        offset, length = relative * SECTOR, count * SECTOR
        if offset + length > source.access.size or not source.mappable:
            return None
        mapping, mapped = await source.access.get_mapping(offset, length)
        if not isinstance(mapping, MappingRaw) or mapped < length:
            return None
        prepared = await run_blocking(self._map_and_plan, mapping.storage, mapping.offset, sector, count)
        if prepared is None:
            source.mappable = False
        return prepared

    def _map_and_plan(
        self, storage: Storage, offset: int, sector: int, count: int
    ) -> tuple[memoryview, Plan | None] | None:
        view = storage.map_read(offset, count * SECTOR)
        if view is None:
            return None
        return view, None if self.compressed else self._plan(view, sector, count)

    async def _read(self, view: memoryview, sector: int, count: int) -> None:
        """Read *count* sectors of the concatenated sources into *view*; bytes past a source's end are zero."""
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

    async def _write(self, view: memoryview, sector: int, count: int, status: Status, plan: Plan | None) -> None:
        """qemu-img's ``convert_co_write``: data, sparse runs, zeroes, or nothing (backing)."""
        if status is Status.BACKING:
            return
        if status is Status.DATA:
            if self.compressed:
                await self._write_compressed(view, sector, count)
                return
            for first, length, data in plan if plan is not None else self._plan(view, sector, count):
                if data:
                    async with self._data_writes:
                        await self.target.write(
                            view[first * SECTOR : (first + length) * SECTOR], (sector + first) * SECTOR
                        )
                else:
                    await self._zero(sector + first, length)
            return
        await self._zero(sector, count)

    def _plan(self, view: memoryview, sector: int, count: int) -> Plan:
        """The written and sparse runs of the data, as qemu-img's scan of each of its buffers finds them."""
        if count <= BUFFER_SECTORS:
            return sparse_plan(view, count, self.min_sparse, sector, self.alignment)
        runs: Plan = []
        for piece in range(0, count, BUFFER_SECTORS):
            length = min(BUFFER_SECTORS, count - piece)
            part = view[piece * SECTOR : (piece + length) * SECTOR]
            for first, run, data in sparse_plan(part, length, self.min_sparse, sector + piece, self.alignment):
                if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == piece + first:
                    runs[-1] = (runs[-1][0], runs[-1][1] + run, data)
                else:
                    runs.append((piece + first, run, data))
        return runs

    async def _write_compressed(self, view: memoryview, sector: int, count: int) -> None:
        """Compress the clusters that hold data, in runs; all-zero clusters take the zero path."""
        if self.sequential:
            await self.target.write_compressed(view[: count * SECTOR], sector * SECTOR)
            return
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
