"""Compressed clusters: reading them (``readv_special``) and writing them (``write_compressed``).

Reads gather the compressed data of every cluster a request touches (adjacent data in one
read, or looked at through the storage's memory map for read-only images), then decompress on
all cores; partly read clusters are kept, decompressed, for the next small read. Writes
compress on all cores; clusters that do not shrink are written as ordinary ones (as QEMU
does), in runs; the others are packed tightly into host clusters, as QEMU packs them: never
into a cluster holding metadata, and never releasing an entry that uses one
(:mod:`imago_qcow2.overlap`). The codec itself is :mod:`imago_qcow2.compression`.
"""

from __future__ import annotations

from collections.abc import Sequence

from imago import DriverContractError, FormatAccess, FormatDriver, InvalidRequestError, runtime

from .allocation import Allocation
from .compression import compress_cluster, decompress_cluster
from .state import Qcow2State
from .tables import OFLAG_COMPRESSED, decode_compressed

__all__ = ["CompressedClusters"]

# Decompressed clusters kept, so that small reads of one compressed cluster decompress it once.
_DECOMPRESSED_CLUSTERS = 16

# Where each cluster's part of a request goes: [(destination view, offset in cluster)].
_Targets = list[tuple[memoryview, int]]


class CompressedClusters:
    """Reads and writes the compressed clusters of one image."""

    def __init__(self, state: Qcow2State, driver: FormatDriver, allocation: Allocation) -> None:
        self._state = state
        # Clusters that do not shrink are written as ordinary ones, through the driver.
        self._driver = driver
        self._allocation = allocation

    # --- reading ------------------------------------------------------------------------------

    async def _descriptor(self, guest_cluster_offset: int) -> int:
        state = self._state
        table = await state.table(guest_cluster_offset)
        index = (guest_cluster_offset >> state.cluster_bits) & state.l2_mask
        entry = 0 if table is None else state.entries.compressed_descriptor(table, index)
        if not entry:
            raise DriverContractError(
                "qcow2", f"no compressed cluster at guest offset {guest_cluster_offset:#x}", guest_cluster_offset
            )
        return entry

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read compressed clusters: read their data, then decompress and copy on all cores."""
        state = self._state
        cluster_bits = state.cluster_bits
        cluster_size = 1 << cluster_bits
        pieces: dict[int, _Targets] = {}
        position = offset
        for view in bufs:
            done = 0
            while done < view.nbytes:
                within = position & (cluster_size - 1)
                step = min(view.nbytes - done, cluster_size - within)
                pieces.setdefault(position - within, []).append((view[done : done + step], within))
                done += step
                position += step
        decompressed = state.decompressed
        work: list[tuple[int, _Targets]] = []
        for guest, targets in pieces.items():
            entry = await self._descriptor(guest)
            cached = decompressed.get(entry)
            if cached is None:
                work.append((entry, targets))
                continue
            for target, within in targets:
                target[:] = cached[within : within + target.nbytes]
        if not work:
            return
        compressed = await self._read_compressed([decode_compressed(entry, cluster_bits) for entry, _ in work])
        compression = state.header.compression_type
        where = state.filename or ""

        def inflate(item: tuple[tuple[memoryview, int], _Targets]) -> bytes | Exception | None:
            (data, host), targets = item
            try:
                cluster = decompress_cluster(data, cluster_size, compression, where, host)
            except Exception as error:
                # Raised once every cluster is done: no thread may still be looking at the data
                # (a memory map of a file that the caller may change once the read failed).
                return error
            for target, within in targets:
                target[:] = cluster[within : within + target.nbytes]
            # Partly read clusters are kept: the next small read likely wants the rest.
            partial = len(targets) > 1 or targets[0][0].nbytes < cluster_size
            return cluster if partial else None

        results = await runtime.run_parallel(inflate, list(zip(compressed, (t for _, t in work), strict=True)))
        del compressed
        for result in results:
            if isinstance(result, Exception):
                raise result
        for (entry, _), cluster in zip(work, results, strict=True):
            if isinstance(cluster, bytes):
                decompressed[entry] = cluster
                decompressed.move_to_end(entry)
        while len(decompressed) > _DECOMPRESSED_CLUSTERS:
            decompressed.popitem(last=False)

    async def _read_compressed(self, descriptors: list[tuple[int, int]]) -> list[tuple[memoryview, int]]:
        """The compressed bytes of each descriptor (views, no copies), adjacent ones read at once."""
        storage = self._state.storage
        file_size = storage.size
        spans: list[list[int]] = []  # [start, end, first descriptor index, last descriptor index]
        for index, (host, length) in enumerate(descriptors):
            end = min(host + length, file_size)
            if spans and spans[-1][0] <= host <= spans[-1][1] and end - spans[-1][0] <= 8 << 20:
                spans[-1][1] = max(spans[-1][1], end)
                spans[-1][3] = index
            else:
                spans.append([host, end, index, index])
        out: list[tuple[memoryview, int]] = []
        # A read-only image's data is looked at in place, through the storage's memory map where
        # it has one: no buffer to fill, no hand-off to an I/O thread. (A writable image's
        # clusters could be freed and reused while they decompress: those are read into a copy.)
        mapped = not self._state.writable
        for start, end, low, high in spans:
            data = storage.map_read(start, end - start) if mapped and end > start else None
            if data is None:
                data = memoryview(bytearray(end - start))
                await storage.readv([data], start)
            for host, length in descriptors[low : high + 1]:
                out.append((data[host - start : min(host + length, file_size) - start], host))
        return out

    # --- writing ------------------------------------------------------------------------------

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Write whole clusters compressed, compressing them on all cores.

        *offset* must be cluster-aligned and the data whole clusters (a shorter last cluster is
        allowed at the end of the disk). A cluster that does not shrink is written as is.
        """
        state = self._state
        cluster_bits = state.cluster_bits
        cluster_size = 1 << cluster_bits
        if offset & (cluster_size - 1) or (data.nbytes & (cluster_size - 1) and offset + data.nbytes != state.size):
            raise InvalidRequestError(
                f"{state.filename}: compressed writes need whole clusters ({cluster_size} bytes), "
                f"got [{offset}, {offset + data.nbytes})"
            )
        state.placement.require_image_file("compressed clusters in images with an external data file")
        clusters = []
        for start in range(0, data.nbytes, cluster_size):
            chunk = data[start : start + cluster_size]
            if chunk.nbytes < cluster_size:
                chunk = memoryview(bytes(chunk) + bytes(cluster_size - chunk.nbytes))
            clusters.append(chunk)
        compression = state.header.compression_type
        guard = state.guard
        if guard.unsettled:
            await guard.settle()
        packed = await runtime.run_parallel(lambda chunk: compress_cluster(chunk, compression), clusters)
        entries = state.entries
        # Clusters that do not shrink are ordinary ones (as QEMU writes them), written below in
        # runs: [first index, end index]; the others are compressed.
        plain: list[list[int]] = []
        shrunk: list[int] = []
        for index, blob in enumerate(packed):
            if len(blob) < cluster_size:
                shrunk.append(index)
            elif plain and plain[-1][1] == index:
                plain[-1][1] = index + 1
            else:
                plain.append([index, index + 1])
        async with state.lock:
            await self._check_replaced(offset, shrunk)
            placed: list[tuple[int, int, bytes]] = []  # (guest, host, compressed data)
            placement = _Packing(state)
            for index in shrunk:
                guest = offset + (index << cluster_bits)
                blob = packed[index]
                host = await placement.place(len(blob))
                overlap = guard.data_overlap(host, len(blob))
                if overlap is not None:
                    await guard.refuse_data_write(host, guest, overlap)
                placed.append((guest, host, blob))
            # (After a refusal nothing refers to the data placed: its references are not added.)
            await placement.apply()
            # The data first, packed runs in one vectored write each; then the entries that point to it.
            await self._write_packed([(host, blob) for _, host, blob in placed])
            offset_bits = 62 - (cluster_bits - 8)
            table_shift = state.table_shift
            table_index = -1
            for guest, host, blob in placed:
                slot = (guest >> cluster_bits) & state.l2_mask
                if guest >> table_shift != table_index:
                    # One look-up per table (nothing else touches the tables meanwhile).
                    table_index = guest >> table_shift
                    table = await self._allocation.writable_table(guest)
                    state.tables.mark_dirty(table.offset)
                sectors = (host % 512 + len(blob) + 511) // 512 - 1
                descriptor = OFLAG_COMPRESSED | sectors << offset_bits | host
                state.placement.release(entries.descriptor(table, slot))
                entries.set(table, slot, descriptor, 0)  # compressed clusters have no subcluster bitmap
        if plain:
            access = FormatAccess(self._driver)
            for first, end in plain:
                await access.write(data[first << cluster_bits : end << cluster_bits], offset + (first << cluster_bits))
        self._driver.mappings_changed()

    async def _write_packed(self, blobs: list[tuple[int, bytes]]) -> None:
        """Write compressed data at its host offsets; data packed back to back goes in one request."""
        storage = self._state.storage
        start = end = -1
        run: list[memoryview] = []
        for host, blob in blobs:
            if host != end and run:
                await storage.writev(run, start)
                run = []
            if not run:
                start = host
            run.append(memoryview(blob))
            end = host + len(blob)
        if run:
            await storage.writev(run, start)

    async def _check_replaced(self, offset: int, indexes: list[int]) -> None:
        """The entries of the clusters *indexes* (from guest *offset*) are released: none may use metadata.

        Checked before anything changes, one call per run of consecutive clusters in one table.
        """
        state = self._state
        cluster_bits = state.cluster_bits
        table_shift = state.table_shift
        first = 0
        while first < len(indexes):
            guest = offset + (indexes[first] << cluster_bits)
            end = first + 1
            while (
                end < len(indexes)
                and indexes[end] == indexes[end - 1] + 1
                and (offset + (indexes[end] << cluster_bits)) >> table_shift == guest >> table_shift
            ):
                end += 1
            current = await state.table(guest)
            if current is not None:
                slot = (guest >> cluster_bits) & state.l2_mask
                await state.guard.check_entries(current, slot, slot + end - first, guest)
            first = end


class _Packing:
    """Places the compressed data of one write, packed tightly after the previous one.

    Data goes right after the previous compressed data; it straddles into the next host
    cluster when that one is free (as QEMU packs), else a fresh cluster is taken. Each
    compressed cluster holds one reference to every host cluster its data touches, so a host
    cluster whose refcount is at its maximum (narrow ``refcount_bits``) takes no more.

    New clusters (a fresh one, or the one straddled into) get their first reference at once,
    so that no other allocation takes them; further references to a cluster in use are added
    by :meth:`apply`, once per cluster. Used with the image's lock held.
    """

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        self._full = (1 << state.header.refcount_bits) - 1
        #: Refcounts of the host clusters looked at, with the references placed since.
        self._known: dict[int, int] = {}
        #: References placed in clusters that were in use, not yet added to their refcounts.
        self._added: dict[int, int] = {}

    async def _refcount(self, cluster: int) -> int:
        known = self._known.get(cluster)
        if known is None:
            known = await self._state.refcounts.get(cluster << self._state.cluster_bits)
            if known:  # (a free cluster may be taken meanwhile, by a refcount block say: asked again)
                self._known[cluster] = known
        return known

    async def place(self, length: int) -> int:
        """Host offset for *length* (< cluster size) bytes of compressed data."""
        state = self._state
        refcounts = state.refcounts
        cluster_bits = state.cluster_bits
        cursor = state.compress_cursor
        within = cursor & ((1 << cluster_bits) - 1)
        if cursor and within:
            current = cursor >> cluster_bits
            # (A cluster whose refcount dropped to 0 was freed: it is not ours to fill.)
            if 0 < await self._refcount(current) < self._full:
                fits = within + length <= 1 << cluster_bits
                if not fits and not await self._refcount(current + 1):
                    # The next cluster is free: the data straddles into it.
                    await state.guard.check_free(current + 1, 1)
                    await refcounts.change(current + 1, 1, +1, avoid=range(current + 1, current + 2))
                    self._known[current + 1] = 1
                    fits = True
                if fits:
                    self._known[current] = self._known.get(current, 0) + 1
                    self._added[current] = self._added.get(current, 0) + 1
                    state.compress_cursor = cursor + length
                    return cursor
        cursor, _ = await refcounts.allocate(1)
        self._known[cursor >> cluster_bits] = 1
        state.compress_cursor = cursor + length
        return cursor

    async def apply(self) -> None:
        """Add the references placed in clusters that were already in use."""
        refcounts = self._state.refcounts
        added, self._added = self._added, {}
        for cluster, references in added.items():
            await refcounts.change(cluster, 1, references)
