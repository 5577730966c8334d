"""The in-memory refcount table a check builds: one counter per host cluster of the image file.

Its size follows the file (clusters in use), never the virtual disk, so a 1 TiB disk holding
little data costs little memory. Counters saturate at the image's refcount maximum, as the
refcount blocks they are compared with would. A repair that rebuilds the refcount structure
allocates its new clusters here and writes slices of it as refcount blocks.
"""

from __future__ import annotations

import sys
from array import array

__all__ = ["RefcountArray", "RefcountArrayTooLargeError", "decode_refcount_block", "encode_refcounts"]

#: The most memory the counters may take (QEMU's allocation would fail about there too).
MAX_BYTES = 1 << 30


class RefcountArrayTooLargeError(MemoryError):
    """The counters for that many clusters would take more than :data:`MAX_BYTES`."""


def _typecode(bits: int) -> str:
    if bits <= 8:
        return "B"
    if bits == 16:
        return "H"
    if bits == 32:
        return "I" if array("I").itemsize == 4 else "L"
    return "Q"


def decode_refcount_block(data: bytes | bytearray | memoryview, refcount_order: int) -> array[int]:
    """The refcounts a refcount block holds, one per cluster it describes."""
    bits = 1 << refcount_order
    if bits >= 8:
        values = array(_typecode(bits))
        values.frombytes(bytes(data))
        if bits > 8 and sys.byteorder == "little":
            values.byteswap()
        return values
    mask = (1 << bits) - 1
    shifts = range(0, 8, bits)
    return array("B", [(byte >> shift) & mask for byte in bytes(data) for shift in shifts])


def encode_refcounts(values: array[int], refcount_order: int, length: int) -> bytes:
    """*values* as a refcount block of *length* bytes (zero-padded)."""
    bits = 1 << refcount_order
    if bits >= 8:
        words = array(values.typecode, values)
        if bits > 8 and sys.byteorder == "little":
            words.byteswap()
        raw = words.tobytes()
    else:
        per_byte = 8 // bits
        out = bytearray(-(-len(values) // per_byte))
        for index, value in enumerate(values):
            if value:
                out[index // per_byte] |= value << ((index % per_byte) * bits)
        raw = bytes(out)
    return raw + bytes(length - len(raw))


_ZERO_CHUNK = bytes(1 << 20)


class RefcountArray:
    """Counters per host cluster (``qemu-img check``'s in-memory refcount table)."""

    __slots__ = ("maximum", "refcount_order", "values")

    def __init__(self, clusters: int, refcount_order: int) -> None:
        self.refcount_order = refcount_order
        bits = 1 << refcount_order
        #: The largest count a refcount block can hold.
        self.maximum = (1 << bits) - 1
        self.values: array[int] = array(_typecode(bits))
        self.grow(clusters)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, cluster: int) -> int:
        values = self.values
        return values[cluster] if cluster < len(values) else 0

    def grow(self, clusters: int) -> None:
        """Make room for *clusters* clusters (new ones count 0)."""
        missing = clusters - len(self.values)
        if missing > 0:
            if clusters * self.values.itemsize > MAX_BYTES:
                raise RefcountArrayTooLargeError(f"{clusters} clusters")
            self.values.frombytes(bytes(self.values.itemsize * missing))

    def increment(self, cluster: int) -> bool:
        """Count one more reference; ``False`` (nothing counted) when the counter is full."""
        values = self.values
        if cluster >= len(values):
            self.grow(cluster + 1)
        value = values[cluster]
        if value == self.maximum:
            return False
        values[cluster] = value + 1
        return True

    def clear(self) -> None:
        """Every counter back to 0 (the size stays)."""
        self.values = array(self.values.typecode, bytes(self.values.itemsize * len(self.values)))

    def next_used(self, start: int) -> int:
        """The first cluster from *start* on with a nonzero count (``len(self)`` if none).

        Zero runs are skipped with memory comparisons of growing windows, so that a sparse
        array (a crafted table naming a cluster far out, a file grown to reach it) costs time
        by its used clusters, not by its length.
        """
        values = self.values
        if start >= len(values) or values[start]:
            return min(start, len(values))
        size = values.itemsize
        with memoryview(values) as view, view.cast("B") as raw:
            position, end, window = start * size, len(raw), 64
            while position < end:
                chunk = raw[position : position + window]
                if _ZERO_CHUNK.startswith(chunk):
                    position += len(chunk)
                    window = min(window * 2, len(_ZERO_CHUNK))
                    continue
                zeroes = len(chunk) - len(chunk.tobytes().lstrip(b"\0"))
                return (position + zeroes) // size
        return len(values)

    def allocate(self, count: int, first_free: int) -> tuple[int, int]:
        """Take *count* contiguous clusters counted 0 from *first_free* on (growing as needed).

        Returns ``(first cluster taken, new first_free)``, the latter the first gap seen, as
        QEMU's allocation in its in-memory table reports it.
        """
        values = self.values
        cluster = first_free
        run = 0
        first_gap = True
        end = len(values)
        while cluster < end and run < count:
            if not values[cluster]:
                run += 1
                if first_gap:
                    first_free = cluster
                    first_gap = False
            else:
                run = 0
            cluster += 1
        if run < count:
            self.grow(cluster + count - run)
            values = self.values
        start = cluster - run
        for taken in range(start, start + count):
            values[taken] = 1
        return start, first_free

    def block(self, index: int, block_bits: int, length: int) -> bytes:
        """The refcount block for refcount table entry *index*: a slice, encoded."""
        first = index << block_bits
        return encode_refcounts(self.values[first : first + (1 << block_bits)], self.refcount_order, length)
