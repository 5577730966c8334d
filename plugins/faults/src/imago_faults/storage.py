"""The ``faults`` storage driver: another storage, with injected I/O errors and simulated power loss."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from imago import (
    ClosedError,
    InvalidOptionError,
    PreallocateMode,
    ReadOnlyError,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    runtime,
    storage_driver,
)
from imago.io_buffers import iovec_length, slice_iovec, zero_fill

from .cache import CachedChange, VolatileCache
from .plan import Fault, FaultPlan, InjectedError

__all__ = ["FaultyStorage"]

#: The keys ``driver_options`` may hold.
OPTION_KEYS = ("inner_driver", "inner_options", "plan")


def _options(options: StorageOpenOptions | StorageCreateOptions) -> tuple[str, Mapping[str, Any], FaultPlan]:
    given = options.driver_options
    unknown = sorted(set(given) - set(OPTION_KEYS))
    if unknown:
        raise InvalidOptionError(
            "driver_options",
            f"unknown key(s) {', '.join(map(repr, unknown))} for the faults storage (known: {', '.join(OPTION_KEYS)})",
        )
    inner_driver = given.get("inner_driver", "file")
    if not isinstance(inner_driver, str) or not inner_driver:
        raise InvalidOptionError("inner_driver", f"must be a storage driver name, got {inner_driver!r}")
    if inner_driver == FaultyStorage.name:
        raise InvalidOptionError("inner_driver", "a faults storage cannot be opened over another by name")
    inner_options = given.get("inner_options", {})
    if not isinstance(inner_options, Mapping):
        raise InvalidOptionError("inner_options", f"must be a mapping of driver options, got {inner_options!r}")
    return inner_driver, inner_options, FaultPlan.parse(given.get("plan"))


class FaultyStorage(Storage):
    """A storage over *inner* that fails calls and loses the power as *plan* says.

    Every call is counted by the plan and may fail as it says; with the plan's ``write_cache``,
    changes stay volatile until a flush or sync. Construct it around an opened storage
    (``FaultyStorage(File.open_sync(...), plan)``), or open it by options::

        StorageOpenOptions(filename=..., driver="faults", driver_options={"plan": plan})

    which opens the inner storage (``driver_options["inner_driver"]``, default ``file``, with
    ``driver_options["inner_options"]``) through the registry with the same options. With no
    plan it passes everything through. *no_flush* (taken from the options when opened by them)
    makes flushes ignored, as ``cache=unsafe`` does: only :meth:`sync` makes changes durable.
    :meth:`power_loss` drops what the volatile cache holds; :meth:`power_loss_image` shows,
    without dropping anything, what the disk would hold after one.
    """

    name = "faults"

    def __init__(self, inner: Storage, plan: FaultPlan | None = None, *, no_flush: bool = False) -> None:
        if not isinstance(inner, Storage):
            raise InvalidOptionError("inner", f"a faults storage wraps a Storage, got {type(inner).__name__}")
        if plan is not None and not isinstance(plan, FaultPlan):
            raise InvalidOptionError("plan", f"expected a FaultPlan, got {type(plan).__name__}")
        self.inner = inner
        self.plan = FaultPlan() if plan is None else plan
        self.cache = VolatileCache()
        self._no_flush = no_flush
        self._closed = False
        self._powered_off = False
        self._rng = random.Random(self.plan.seed)

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> FaultyStorage:
        """Open the inner storage (``driver_options["inner_driver"]``, default ``file``) and wrap it."""
        inner_driver, inner_options, plan = _options(options)
        inner = await storage_driver(inner_driver).open(
            StorageOpenOptions(
                filename=options.filename,
                writable=options.writable,
                direct=options.direct,
                no_flush=options.no_flush,
                force_share=options.force_share,
                share_write=options.share_write,
                driver=inner_driver,
                driver_options=inner_options,
            )
        )
        return cls(inner, plan, no_flush=options.no_flush)

    @classmethod
    async def create(cls, options: StorageCreateOptions) -> FaultyStorage:
        """Create the inner storage as *options* say (its driver from ``driver_options``) and wrap it."""
        inner_driver, inner_options, plan = _options(options)
        inner = await storage_driver(inner_driver).create(
            StorageCreateOptions(
                filename=options.filename,
                size=options.size,
                preallocate=options.preallocate,
                overwrite=options.overwrite,
                driver=inner_driver,
                driver_options=inner_options,
            )
        )
        return cls(inner, plan)

    # --- properties ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The size the storage reads as (pending resizes and growing writes included)."""
        return self.cache.size(self.inner.size)

    @property
    def writable(self) -> bool:
        """Whether the inner storage is writable."""
        return self.inner.writable

    @property
    def filename(self) -> str | None:
        """The inner storage's file name."""
        return self.inner.filename

    @property
    def mem_align(self) -> int:
        """The inner storage's memory alignment."""
        return self.inner.mem_align

    @property
    def req_align(self) -> int:
        """The inner storage's request alignment."""
        return self.inner.req_align

    def allocated_size(self) -> int | None:
        """The inner storage's (what is durable)."""
        return self.inner.allocated_size()

    @property
    def pending(self) -> int:
        """How many changes the volatile cache holds."""
        return len(self.cache.changes)

    # --- faults ----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"faults storage over {self.inner!r} is closed")
        if self._powered_off:
            raise OSError(errno.EIO, "the power is off (after power_loss(); power_on() to use it again)", self.filename)

    def _check_writable(self) -> None:
        self._check()
        if not self.inner.writable:
            raise ReadOnlyError(f"faults storage over {self.inner!r}")

    def _call(self, op: str, offset: int = 0, length: int = 0) -> Fault | None:
        """Count the call; raise the error a fault plans for it; a short-read fault is returned."""
        call, fault = self.plan.count(op, offset, length)
        if fault is None:
            return None
        if fault.effect == "short-read":
            self.plan.injected.append(call)
            return fault
        error = InjectedError(fault, call, self.filename)
        self.plan.injected.append(error)
        raise error

    # --- I/O ---------------------------------------------------------------------------------------

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read what the disk holds: the durable bytes with the pending changes over them."""
        self._check()
        short = self._call("read", offset, iovec_length(bufs))
        await self.inner.readv(bufs, offset)
        self._finish_read(bufs, offset, short)

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Synchronous :meth:`readv`."""
        self._check()
        short = self._call("read", offset, iovec_length(bufs))
        self.inner.readv_inline(bufs, offset)
        self._finish_read(bufs, offset, short)

    def _finish_read(self, bufs: Sequence[memoryview], offset: int, short: Fault | None) -> None:
        self.cache.overlay(bufs, offset)
        if short is not None:
            total = iovec_length(bufs)
            kept = min(short.short_length, total)
            zero_fill(slice_iovec(bufs, kept, total - kept))

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write *bufs* at *offset* (into the volatile cache, with the plan's ``write_cache``)."""
        self._check_writable()
        self._call("write", offset, iovec_length(bufs))
        if not self.plan.write_cache:
            await self.inner.writev(bufs, offset)
            return
        data = b"".join(bufs)
        await self._cache(CachedChange(kind="write", offset=offset, data=data))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero the range (in the volatile cache, with the plan's ``write_cache``)."""
        self._check_writable()
        self._call("write_zeroes", offset, length)
        if not self.plan.write_cache:
            await self.inner.write_zeroes(offset, length, unmap=unmap)
            return
        if length > 0:
            await self._cache(CachedChange(kind="zeroes-unmap" if unmap else "zeroes", offset=offset, length=length))

    async def discard(self, offset: int, length: int) -> None:
        """Discard the range (in the volatile cache, with the plan's ``write_cache``)."""
        self._check_writable()
        self._call("discard", offset, length)
        if not self.plan.write_cache:
            await self.inner.discard(offset, length)
            return
        if length > 0:
            await self._cache(CachedChange(kind="discard", offset=offset, length=length))

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Resize (in the volatile cache, with the plan's ``write_cache``)."""
        self._check_writable()
        if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size < 0:
            raise InvalidOptionError("size", f"must be a non-negative integer, got {new_size!r}")
        old_size = self.size
        self._call("resize", min(old_size, new_size), abs(new_size - old_size))
        if not self.plan.write_cache:
            await self.inner.resize(new_size, prealloc)
            return
        await self._cache(CachedChange(kind="resize", offset=new_size, prealloc=prealloc))

    async def _cache(self, change: CachedChange) -> None:
        self.cache.add(change, self.inner.size)
        if self.plan.write_back_early and self._rng.random() < self.plan.write_back_early:
            candidates = self.cache.early_candidates()
            early = self._rng.choice(candidates)
            await self._apply_inner(early)
            self.cache.written_back([early])

    async def _apply_inner(self, change: CachedChange) -> None:
        if change.kind == "write":
            await self.inner.writev([memoryview(change.data)], change.offset)
        elif change.kind == "resize":
            await self.inner.resize(change.offset, change.prealloc)
        elif change.kind == "discard":
            await self.inner.discard(change.offset, change.length)
        else:
            await self.inner.write_zeroes(change.offset, change.length, unmap=change.kind == "zeroes-unmap")

    async def _write_back(self) -> None:
        """Write every pending change to the inner storage, oldest first."""
        changes = list(self.cache.changes)
        for change in changes:
            await self._apply_inner(change)
        self.cache.written_back(changes)

    async def flush(self) -> None:
        """Make the pending changes durable: written back, then the inner storage flushed.

        Opened with ``no_flush``, nothing is made durable (only :meth:`sync` does).
        """
        self._check()
        self._call("flush")
        if self._no_flush:
            return
        await self._write_back()
        await self.inner.flush()

    async def sync(self) -> None:
        """Make the pending changes durable: written back, then the inner storage synced."""
        self._check()
        self._call("sync")
        await self._write_back()
        await self.inner.sync()

    async def close(self) -> None:
        """Close the inner storage; what is pending reaches it first (a process exit loses no writes)."""
        if self._closed:
            return
        self._closed = True
        if self.cache.changes:
            await self._write_back()
        await self.inner.close()

    # --- power loss ----------------------------------------------------------------------------

    def _survivors(self, seed: int | None, keep: float, sector: int | None) -> list[CachedChange]:
        if not 0 <= keep <= 1:
            raise InvalidOptionError("keep", f"must be a probability from 0 to 1, got {keep!r}")
        if sector is not None and (not isinstance(sector, int) or isinstance(sector, bool) or sector < 1):
            raise InvalidOptionError("sector", f"must be a positive integer, got {sector!r}")
        return self.cache.survivors(None if seed is None else random.Random(seed), keep, sector)

    def power_loss(self, seed: int | None = None, *, keep: float = 0.5, sector: int | None = None) -> int:
        """Lose the power: every change not made durable is dropped; the number of changes (or pieces) kept.

        With a *seed*, a random subset of them survives instead (each with probability
        *keep*, applied in their order: what the disk cache may have written back already);
        with *sector*, each change is cut into pieces at sector boundaries first, so that a
        write may be torn. Afterwards the inner storage holds what the disk would after a
        reboot, and the power stays off: every call but :meth:`close` fails with EIO (what an
        image still open on the storage writes goes nowhere) until :meth:`power_on`.
        """
        self._check_writable()
        survivors = self._survivors(seed, keep, sector)
        self.cache.drop()
        for change in survivors:
            runtime.run_sync(self._apply_inner(change))
        self._powered_off = True
        return len(survivors)

    def power_on(self) -> None:
        """Accept calls again after :meth:`power_loss` (the disk holds what survived)."""
        self._powered_off = False

    def power_loss_image(self, seed: int | None = None, *, keep: float = 0.5, sector: int | None = None) -> bytes:
        """What the disk would hold after :meth:`power_loss` with the same arguments; nothing is dropped.

        The whole durable content is read from the inner storage: for small test images.
        """
        self._check()
        content = bytearray(self.inner.size)
        if content:
            self.inner.readv_inline([memoryview(content)], 0)
        for change in self._survivors(seed, keep, sector):
            change.apply(content)
        return bytes(content)

    def save_power_loss_image(
        self, path: str | os.PathLike[str], seed: int | None = None, *, keep: float = 0.5, sector: int | None = None
    ) -> int:
        """Write :meth:`power_loss_image` to a new file at *path* (replacing it); its size."""
        content = self.power_loss_image(seed, keep=keep, sector=sector)
        with open(path, "wb") as file:
            file.write(content)
        return len(content)

    def __repr__(self) -> str:
        return f"<FaultyStorage over {self.inner!r}, {self.pending} pending>"
