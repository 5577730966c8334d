"""``qemu-img convert -S``: which parts of a data buffer are written and which are left sparse.

qemu-img reads the allocated data of the sources, then skips zero runs in what it read: a run
of zero sectors at the start of a buffer is never written, and after the first data sector
only runs of at least ``min_sparse`` zero sectors are, their ends aligned to ``alignment``
sectors so that requests stay aligned. The same rule gives the same allocation as qemu-img.

The buffer (any flat byte view: a bytearray's, or a memory map's) is never scanned byte by byte
in Python: zero tests are one ``bytes.startswith`` (``memcmp``), and a buffer without a zero
sector costs one strided copy of each sector's first word and one ``find`` in it.
"""

from __future__ import annotations

__all__ = ["SECTOR", "is_zero", "sparse_plan"]

#: qemu-img counts in 512-byte sectors.
SECTOR = 512

_ZEROES = bytes(16 << 20)
_ZERO_WORD = bytes(8)


def is_zero(buf: memoryview, start: int, length: int) -> bool:
    """Whether ``buf[start:start + length]`` holds only zero bytes (``length`` ≤ 16 MiB)."""
    return _ZEROES.startswith(buf[start : start + length])


def _zero_sectors(buf: memoryview, pos: int, count: int) -> int:
    """How many of the *count* sectors at byte *pos* are zero from the first one on (≥ 1)."""
    if is_zero(buf, pos, count * SECTOR):
        return count
    # Gallop, then bisect: the cost follows the run's length, not the buffer's.
    known, step = 1, 1
    while known + step < count and is_zero(buf, pos, (known + step) * SECTOR):
        known += step
        step *= 2
    high = min(known + step, count)  # not all zero
    while high - known > 1:
        middle = (known + high) // 2
        if is_zero(buf, pos, middle * SECTOR):
            known = middle
        else:
            high = middle
    return known


def _data_sectors(buf: memoryview, pos: int, count: int) -> int:
    """How many of the *count* sectors at byte *pos* are not zero from the first one on (≥ 1).

    Only a sector whose first eight bytes are zero can be a zero sector: the first words of all
    sectors are gathered in one strided copy and searched, then each candidate is compared whole.
    """
    if count == 1:
        return 1
    heads = buf[pos : pos + count * SECTOR].cast("Q")[SECTOR // 8 :: SECTOR // 8].tobytes()
    found = heads.find(_ZERO_WORD)
    while found >= 0:
        if found % 8:
            found = heads.find(_ZERO_WORD, found + 8 - found % 8)
            continue
        index = found // 8 + 1
        if is_zero(buf, pos + index * SECTOR, SECTOR):
            return index
        found = heads.find(_ZERO_WORD, found + 8)
    return count


def _same_state(buf: memoryview, pos: int, count: int, sector: int, alignment: int) -> tuple[bool, int]:
    """qemu-img's ``is_allocated_sectors``: (data?, sectors) for the run at *pos*, end aligned."""
    zero = is_zero(buf, pos, SECTOR)
    run = _zero_sectors(buf, pos, count) if zero else _data_sectors(buf, pos, count)
    if run == count:
        return not zero, run
    tail = (sector + run) & (alignment - 1)
    if tail:
        if zero and run <= tail:
            # The data after this short zero run rewrites its sectors anyway: write them now.
            zero = False
        if not zero:
            run = min(run + alignment - tail, count)
        else:
            run -= tail
    return not zero, run


def _allocated_min(
    buf: memoryview, pos: int, count: int, min_sparse: int, sector: int, alignment: int
) -> tuple[bool, int]:
    """qemu-img's ``is_allocated_sectors_min``: after data, zero runs shorter than *min_sparse* count as data."""
    min_sparse = min(min_sparse, count)
    data, run = _same_state(buf, pos, count, sector, alignment)
    if not data:
        return False, run
    used = checked = run
    while checked < count:
        data, run = _same_state(buf, pos + checked * SECTOR, count - checked, sector + checked, alignment)
        checked += run
        if data:
            used = checked
        elif run >= min_sparse:
            break
    return True, used


def sparse_plan(
    buf: memoryview, count: int, min_sparse: int, sector: int, alignment: int
) -> list[tuple[int, int, bool]]:
    """Split the first *count* sectors of *buf* (disk sector *sector* on) into written and sparse runs.

    Returns ``(first sector, sectors, data)`` runs in order, relative to the buffer, neighbours
    of one kind merged. *min_sparse* 0 writes everything (``-S 0``); *alignment* is a power of
    two (sectors).
    """
    if min_sparse == 0:
        return [(0, count, True)]
    runs: list[tuple[int, int, bool]] = []
    done = 0
    while done < count:
        data, run = _allocated_min(buf, done * SECTOR, count - done, min_sparse, sector + done, alignment)
        if runs and runs[-1][2] == data:
            first, length, _ = runs[-1]
            runs[-1] = (first, length + run, data)
        else:
            runs.append((done, run, data))
        done += run
    return runs
