"""Compressed clusters: reading them (``readv_special``) and writing them (``write_compressed``).

Reads gather the compressed data of every cluster a request touches (adjacent data in one
read), then decompress on all cores; partly read clusters are kept, decompressed, for the next
small read. Writes compress on all cores, then pack the data tightly into host clusters, as
QEMU does: never into a cluster holding metadata, and never releasing an entry that uses one
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

        def inflate(item: tuple[tuple[memoryview, int], _Targets]) -> bytes | None:
            (data, host), targets = item
            cluster = decompress_cluster(data, cluster_size, compression, where, host)
            for target, within in targets:
                target[:] = cluster[within : within + target.nbytes]
            # Partly read clusters are kept: the next small read likely wants the rest.
            partial = len(targets) > 1 or targets[0][0].nbytes < cluster_size
            return cluster if partial else None

        results = await runtime.run_parallel(inflate, list(zip(compressed, (t for _, t in work), strict=True)))
        for (entry, _), cluster in zip(work, results, strict=True):
            if cluster is not None:
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
        for start, end, low, high in spans:
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
        plain: list[tuple[memoryview, int]] = []
        placed: list[tuple[int, int, bytes]] = []  # (guest, host, compressed data)
        async with state.lock:
            for index, (chunk, blob) in enumerate(zip(clusters, packed, strict=True)):
                guest = offset + (index << cluster_bits)
                if len(blob) >= cluster_size:
                    # It does not shrink: an ordinary cluster (as QEMU does), written below.
                    plain.append((chunk[: min(cluster_size, state.size - guest)], guest))
                    continue
                slot = (guest >> cluster_bits) & state.l2_mask
                current = await state.table(guest)
                if current is not None:
                    # The entry replaced is released: it must not use metadata.
                    await guard.check_entries(current, slot, slot + 1, guest)
                host = await self._place(len(blob))
                overlap = guard.data_overlap(host, len(blob))
                if overlap is not None:
                    await guard.refuse_data_write(host, guest, overlap)
                placed.append((guest, host, blob))
            # The data first, packed runs in one vectored write each; then the entries that point to it.
            await self._write_packed([(host, blob) for _, host, blob in placed])
            offset_bits = 62 - (cluster_bits - 8)
            for guest, host, blob in placed:
                slot = (guest >> cluster_bits) & state.l2_mask
                table = await self._allocation.writable_table(guest)
                sectors = (host % 512 + len(blob) + 511) // 512 - 1
                descriptor = OFLAG_COMPRESSED | sectors << offset_bits | host
                state.placement.release(entries.descriptor(table, slot))
                entries.set(table, slot, descriptor, 0)  # compressed clusters have no subcluster bitmap
                state.tables.mark_dirty(table.offset)
        for chunk, guest in plain:
            await FormatAccess(self._driver).write(chunk, guest)
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

    async def _place(self, length: int) -> int:
        """Host offset for *length* (< cluster size) bytes of compressed data, packed tightly.

        Data goes right after the previous compressed data; it straddles into the next host
        cluster when that one is free (as QEMU packs), else a fresh cluster is taken. Each
        compressed cluster holds one reference to every host cluster its data touches, so a
        host cluster whose refcount is at its maximum (narrow ``refcount_bits``) takes no more.
        """
        state = self._state
        refcounts = state.refcounts
        cluster_bits = state.cluster_bits
        cursor = state.compress_cursor
        within = cursor & ((1 << cluster_bits) - 1)
        # A host cluster holds as many compressed clusters as its refcount can count.
        full = (1 << state.header.refcount_bits) - 1
        if cursor and within and await refcounts.get(cursor) < full:
            current = cursor >> cluster_bits
            fits = within + length <= 1 << cluster_bits
            if not fits and not await refcounts.get((current + 1) << cluster_bits):
                # The next cluster is free: the data straddles into it.
                await state.guard.check_free(current + 1, 1)
                await refcounts.change(current + 1, 1, +1, avoid=range(current + 1, current + 2))
                fits = True
            if fits:
                await refcounts.change(current, 1, +1)
                state.compress_cursor = cursor + length
                return cursor
        cursor, _ = await refcounts.allocate(1)
        state.compress_cursor = cursor + length
        return cursor
