"""The I/O engine: :class:`FormatAccess` (async) and its blocking face :class:`SyncFormatAccess`.

:class:`FormatAccess` is the one generic engine over any format driver. :class:`SyncFormatAccess`
offers the same methods, blocking: each call drives the engine by hand
(:func:`imago.runtime.run_sync`), so it costs no event-loop round trip and works both outside and
inside a running event loop (it blocks the loop's thread while it runs, like any synchronous
I/O). Reads that fall inside a mapping the engine already resolved go straight to the storage's
inline read. The two live together because each hands out the other (``as_sync``, ``access``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import runtime
from ..errors import ClosedError, DriverContractError, InvalidRequestError, ReadOnlyError, UnsupportedFeatureError
from ..fileobj import ImageFile
from ..io_buffers import IoVector, byte_view, byte_views, iovec_length, slice_iovec, zero_fill
from ..storage import PreallocateMode
from . import unclosed
from .capabilities import Capability
from .check import CheckResult, RepairMode
from .driver import FormatDriver
from .extents import Extent, ExtentCache
from .mapping import (
    Mapping,
    MappingEof,
    MappingRaw,
    MappingSpecial,
    MappingZero,
    ShallowEof,
    ShallowIndirect,
    ShallowMapping,
    ShallowRaw,
    ShallowSpecial,
    ShallowZero,
)

if TYPE_CHECKING:
    from .probe_guard import ProbeGuard

__all__ = ["FormatAccess", "SyncFormatAccess", "read_through"]


def _non_negative(name: str, value: int) -> None:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise InvalidRequestError(f"{name} must not be negative, got {value}")


class FormatAccess:
    """Asynchronous I/O on an opened image: reads, writes, zeroing, discards, mappings.

    Splits each request along the driver's mappings, reads and writes the storages itself,
    recurses into backing layers and fills zeroes. Requests must lie inside the disk; writes
    need an image opened for writing. Closing (:meth:`close`) flushes and releases the
    driver, its storages and its backing layers.

    The access owns its driver: an image dropped without :meth:`close` (garbage collected, or
    still open at interpreter exit) is flushed and closed then, with a :class:`ResourceWarning`
    naming its file (when several accesses wrap one driver, with the last of them).

    Many reads and writes may be in flight at once. Destructive operations (the
    ``discard_*`` methods, :meth:`resize`, :meth:`close`) may invalidate mappings that other
    requests already hold: the caller must give them exclusive use of the affected range
    (for :meth:`resize` and :meth:`close`, of the whole image), i.e. not overlap them with
    other requests. Mappings returned by :meth:`get_mapping` are likewise only valid until
    the next write or destructive operation on their range.
    """

    _probe_guard: ProbeGuard | None

    def __init__(self, driver: FormatDriver, *, probed: bool = False) -> None:
        """Wrap the open *driver*; *probed*: its format was guessed from the disk's content.

        A probed disk of the format probing falls back to (raw) keeps its format: writes that
        would make its first sector look like another format are refused (see
        :mod:`imago.format.probe_guard`).
        """
        self._setup(driver)
        if probed and type(driver).probe_fallback:
            from .probe_guard import ProbeGuard

            self._probe_guard = ProbeGuard(driver.name)
        self._finalizer = unclosed.track(self, driver)

    def _setup(self, driver: FormatDriver) -> None:
        if not isinstance(driver, FormatDriver):
            raise InvalidRequestError(f"FormatAccess needs a FormatDriver, got {type(driver).__name__}")
        self._driver = driver
        self._cache = ExtentCache(driver.mapping_epoch)
        self._closed = False
        self._probe_guard = None

    @classmethod
    def _engine(cls, driver: FormatDriver) -> FormatAccess:
        """A short-lived access for the engine's own use: it never owns (nor closes) *driver*."""
        engine = cls.__new__(cls)
        engine._setup(driver)
        engine._finalizer = None
        return engine

    # --- facts ------------------------------------------------------------------------------

    @property
    def driver(self) -> FormatDriver:
        """The format driver underneath."""
        return self._driver

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self._driver.size

    @property
    def writable(self) -> bool:
        """Whether the image is open for writing."""
        return self._driver.writable

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def format_name(self) -> str:
        """The driver's format name (``raw``, ``qcow2``, ...)."""
        return self._driver.name

    @property
    def filename(self) -> str | None:
        """The image's file name, if its storage has one."""
        return self._driver.storage.filename

    def _layers(self) -> list[FormatAccess]:
        layers: list[FormatAccess] = []
        layer: FormatAccess | None = self
        while layer is not None:
            layers.append(layer)
            layer = layer._driver.backing
        return layers

    @property
    def mem_align(self) -> int:
        """Buffer address alignment that lets every storage in the chain avoid bounce buffers."""
        return max(s.mem_align for layer in self._layers() for s in layer._driver.storages())

    @property
    def req_align(self) -> int:
        """Offset and length alignment that lets every storage in the chain avoid read-modify-write."""
        return max(s.req_align for layer in self._layers() for s in layer._driver.storages())

    # --- checks -----------------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        _non_negative("offset", offset)
        size = self._driver.size
        if offset + length > size:
            raise InvalidRequestError(
                f"{self._name()}: request [{offset}, {offset + length}) reaches past the end of the disk ({size} bytes)"
            )

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if not self._driver.writable:
            raise ReadOnlyError(self._name())

    def _name(self) -> str:
        return self._driver.storage.filename or f"{self._driver.name} image"

    # --- reading ------------------------------------------------------------------------------

    async def read(self, buf: Any, offset: int) -> None:
        """Fill *buf* (any writable buffer) with the disk's bytes at *offset*."""
        view = memoryview(buf) if type(buf) is bytearray else byte_view(buf, writable=True)
        length = view.nbytes
        cache = self._cache
        driver = self._driver
        epoch = driver.mapping_epoch
        # A hit needs no further checks: extents lie inside the disk, and closing or resizing
        # drops the cache.
        if type(offset) is int and cache.epoch == epoch:
            extent = cache.find(offset, length)
            if extent is not None:
                await extent.storage.readv([view], offset + extent.delta)
                return
        self._check(offset, length)
        if not length:
            return
        # The common miss lies in one raw mapping: one look-up, one storage read, no slicing.
        mapping, mapped = await driver.get_mapping(offset, length)
        if type(mapping) is ShallowRaw and mapped >= length:
            assert isinstance(mapping, ShallowRaw)
            await mapping.storage.readv([view], mapping.offset)
            self._remember(offset, mapped, mapping, epoch)
            return
        await self._readv_mapped([view], offset, length, (mapping, mapped, epoch))

    async def readv(self, bufs: Sequence[Any], offset: int) -> None:
        """Fill the buffers of *bufs*, one after another, with the bytes at *offset*."""
        iov = byte_views(bufs, writable=True)
        length = iovec_length(iov)
        self._check(offset, length)
        await self._readv_mapped(iov, offset, length)

    async def _readv_mapped(
        self, iov: IoVector, offset: int, length: int, first: tuple[ShallowMapping, int, int] | None = None
    ) -> None:
        """Read ``[offset, offset + length)`` into *iov*, mapping by mapping, one after another.

        *first*: the mapping at *offset* already looked up (with its length and the epoch from
        before the look-up), so that the caller's look-up is not repeated.
        """
        driver = self._driver
        pos = 0
        while pos < length:
            guest = offset + pos
            if first is None:
                epoch = driver.mapping_epoch
                mapping, mapped = await driver.get_mapping(guest, length - pos)
            else:
                mapping, mapped, epoch = first
                first = None
            if mapped <= 0:
                raise DriverContractError(driver.name, "get_mapping returned an empty mapping", guest)
            step = min(mapped, length - pos)
            part = slice_iovec(iov, pos, step)
            kind = type(mapping)
            if kind is ShallowRaw:
                assert isinstance(mapping, ShallowRaw)
                await mapping.storage.readv(part, mapping.offset)
                self._remember(guest, mapped, mapping, epoch)
            elif kind is ShallowZero or kind is ShallowEof:
                zero_fill(part)
            elif kind is ShallowIndirect:
                assert isinstance(mapping, ShallowIndirect)
                await mapping.layer._read_as_backing(part, mapping.offset, step)
            elif kind is ShallowSpecial:
                assert isinstance(mapping, ShallowSpecial)
                await driver.readv_special(part, mapping.offset)
            else:
                raise DriverContractError(driver.name, f"get_mapping returned an unknown mapping {mapping!r}", guest)
            pos += step

    def _remember(self, guest: int, length: int, mapping: ShallowRaw, epoch: int) -> None:
        """Cache a raw extent, clipped to the disk (hits are trusted for bounds).

        *epoch* is the driver's mapping epoch from before the mapping was asked for: if it
        changed while the read was in flight, the mapping may be stale and is not kept.
        """
        if epoch != self._driver.mapping_epoch:
            return
        cache = self._cache
        if cache.epoch != epoch:
            cache = self._cache = ExtentCache(epoch)
        end = min(guest + length, self._driver.size)
        cache.add(Extent(guest, end, mapping.storage, mapping.offset - guest))

    async def _read_as_backing(self, iov: IoVector, offset: int, length: int) -> None:
        """Read as a backing layer: bytes past this layer's end read as zero."""
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        inside = max(0, min(length, self._driver.size - offset))
        if inside:
            await self._readv_mapped(slice_iovec(iov, 0, inside), offset, inside)
        if inside < length:
            zero_fill(slice_iovec(iov, inside, length - inside))

    # --- mappings ---------------------------------------------------------------------------

    async def get_shallow_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """The mapping of this layer alone at *offset* (``Indirect`` for data of a backing layer)."""
        _non_negative("max_length", max_length)
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        _non_negative("offset", offset)
        size = self._driver.size
        if offset >= size or max_length == 0:
            return ShallowEof(), max_length
        mapping, mapped = await self._driver.get_mapping(offset, min(max_length, size - offset))
        return mapping, min(mapped, max_length, size - offset)

    async def get_mapping(self, offset: int, max_length: int) -> tuple[Mapping, int]:
        """Where the data at *offset* finally lives, resolved through all backing layers.

        Returns the mapping and the number of bytes (at most *max_length*) it covers.
        """
        shallow, length = await self.get_shallow_mapping(offset, max_length)
        kind = type(shallow)
        if kind is ShallowRaw:
            assert isinstance(shallow, ShallowRaw)
            return MappingRaw(shallow.storage, shallow.offset, shallow.writable), length
        if kind is ShallowZero:
            assert isinstance(shallow, ShallowZero)
            return MappingZero(shallow.explicit), length
        if kind is ShallowEof:
            return MappingEof(), length
        if kind is ShallowSpecial:
            assert isinstance(shallow, ShallowSpecial)
            return MappingSpecial(self, shallow.offset), length
        assert isinstance(shallow, ShallowIndirect)
        layer = shallow.layer
        if shallow.offset >= layer.size:
            # Past the end of a shorter backing file: reads as zero, nothing allocated.
            return MappingZero(False), length
        deep, deep_length = await layer.get_mapping(shallow.offset, min(length, layer.size - shallow.offset))
        return deep, min(length, deep_length)

    # --- writing ------------------------------------------------------------------------------

    async def write(self, buf: Any, offset: int) -> None:
        """Write *buf* (any buffer) at *offset*."""
        await self._writev_mapped([byte_view(buf, writable=False)], offset)

    async def writev(self, bufs: Sequence[Any], offset: int) -> None:
        """Write the buffers of *bufs*, one after another, at *offset*."""
        await self._writev_mapped(byte_views(bufs, writable=False), offset)

    async def _writev_mapped(self, iov: IoVector, offset: int) -> None:
        length = iovec_length(iov)
        self._check_write(offset, length)
        if self._probe_guard is not None:
            await self._probe_guard.check(self, offset, length, iov)
        pos = 0
        while pos < length:
            mapping, step = await self._data_mapping(offset + pos, length - pos, overwrite=True)
            try:
                await mapping.storage.writev(slice_iovec(iov, pos, step), mapping.offset)
            except BaseException:
                self._driver.data_write_failed(offset + pos, step)
                raise
            pos += step

    async def write_compressed(self, buf: Any, offset: int) -> None:
        """Write *buf* compressed, where the format can (whole clusters; see the driver)."""
        view = byte_view(buf, writable=False)
        self._check_write(offset, view.nbytes)
        if self._probe_guard is not None:
            await self._probe_guard.check(self, offset, view.nbytes, [view])
        if view.nbytes:
            await self._driver.write_compressed(view, offset)
            self._driver.mappings_changed()

    async def _guard_zeroes(self, offset: int, length: int) -> None:
        if self._probe_guard is not None:  # what reads as zero afterwards, or may
            await self._probe_guard.check(self, offset, length, None)

    async def _data_mapping(self, offset: int, length: int, *, overwrite: bool) -> tuple[ShallowRaw, int]:
        driver = self._driver
        mapping, mapped = await driver.ensure_data_mapping(offset, length, overwrite)
        if not isinstance(mapping, ShallowRaw) or not mapping.writable or mapped <= 0:
            raise DriverContractError(driver.name, "ensure_data_mapping returned no writable mapping", offset)
        return mapping, min(mapped, length)

    async def _write_zeroes_data(self, offset: int, length: int) -> None:
        """Zero a range through data mappings (for what metadata could not do)."""
        end = offset + length
        while offset < end:
            mapping, step = await self._data_mapping(offset, end - offset, overwrite=True)
            try:
                await mapping.storage.write_zeroes(mapping.offset, step)
            except BaseException:
                self._driver.data_write_failed(offset, step)
                raise
            offset += step

    async def _zero_range(self, offset: int, length: int, handled: tuple[int, int], *, explicit: bool) -> None:
        start, count = handled
        if start < offset or count < 0 or start + count > offset + length:
            raise DriverContractError(
                self._driver.name, f"handled [{start}, {start + count}), outside the request", offset
            )
        self._driver.mappings_changed()
        if explicit:
            if start > offset:
                await self._write_zeroes_data(offset, start - offset)
            if start + count < offset + length:
                await self._write_zeroes_data(start + count, offset + length - start - count)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zero, keeping it allocated where it is."""
        _non_negative("length", length)
        self._check_write(offset, length)
        await self._guard_zeroes(offset, length)
        if length:
            await self._zero_range(
                offset, length, await self._driver.ensure_zero_mapping(offset, length), explicit=True
            )

    async def discard_to_zero(self, offset: int, length: int) -> None:
        """Make the range read as zero, freeing the space behind it where possible."""
        _non_negative("length", length)
        self._check_write(offset, length)
        await self._guard_zeroes(offset, length)
        if length:
            await self._zero_range(offset, length, await self._driver.discard_to_zero(offset, length), explicit=True)

    async def discard_to_any(self, offset: int, length: int) -> None:
        """Free what can be freed of the range; its content afterwards is undefined."""
        _non_negative("length", length)
        self._check_write(offset, length)
        await self._guard_zeroes(offset, length)
        if length:
            await self._zero_range(offset, length, await self._driver.discard_to_any(offset, length), explicit=False)

    async def discard_to_backing(self, offset: int, length: int) -> None:
        """Make the range read from the backing layer again (zero without a backing layer).

        What the driver cannot give back to the backing layer (parts of clusters, say) gets
        the backing layer's bytes written into it instead.
        """
        _non_negative("length", length)
        self._check_write(offset, length)
        await self._guard_zeroes(offset, length)
        if not length:
            return
        start, count = await self._driver.discard_to_backing(offset, length)
        if start < offset or count < 0 or start + count > offset + length:
            raise DriverContractError(
                self._driver.name, f"handled [{start}, {start + count}), outside the request", offset
            )
        self._driver.mappings_changed()
        for part_start, part_end in ((offset, start), (start + count, offset + length)):
            if part_end > part_start:
                await self._copy_from_backing(part_start, part_end - part_start)

    async def _copy_from_backing(self, offset: int, length: int) -> None:
        backing = self._driver.backing
        if backing is None:
            await self._write_zeroes_data(offset, length)
            return
        chunk = 1 << 20
        position = offset
        while position < offset + length:
            step = min(chunk, offset + length - position)
            data = bytearray(step)
            await backing._read_as_backing([memoryview(data)], position, step)
            await self._writev_mapped([memoryview(data)], position)
            position += step

    # --- whole-image operations -----------------------------------------------------------------

    async def flush(self) -> None:
        """Write caches back and flush the storages."""
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        await self._driver.flush()

    async def sync(self) -> None:
        """Flush, and make everything durable."""
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        await self._driver.sync()

    async def resize(
        self, new_size: int, prealloc: PreallocateMode | str = PreallocateMode.NONE, *, shrink: bool = False
    ) -> None:
        """Change the disk size; new space is prepared as *prealloc* says.

        Shrinking deletes the data past the new end, so it must be asked for with
        ``shrink=True`` (``qemu-img resize --shrink``); otherwise a smaller size raises
        :class:`~imago.InvalidRequestError` and nothing changes. Formats refuse sizes they
        cannot record exactly (qcow2: not a multiple of 512).
        """
        _non_negative("new_size", new_size)
        mode = PreallocateMode.parse(prealloc)
        if not isinstance(shrink, bool):
            raise InvalidRequestError(f"shrink must be True or False, got {shrink!r}")
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        if not self._driver.writable:
            raise ReadOnlyError(self._name())
        if not self._driver.supports(Capability.RESIZE):
            raise UnsupportedFeatureError(f"resizing {self._driver.name} images", self.filename)
        if new_size < self._driver.size and not shrink:
            raise InvalidRequestError(
                f"{self._name()}: {new_size} bytes is smaller than the disk ({self._driver.size} bytes); shrinking "
                "deletes the data past the new end: ask for it with shrink=True (qemu-img resize --shrink)"
            )
        self._cache = ExtentCache(-1)
        await self._driver.resize(new_size, mode)
        self._driver.mappings_changed()

    async def check(self, fix: RepairMode | str | None = None) -> CheckResult:
        """Check the image's metadata, as ``qemu-img check`` does; with *fix*, repair it.

        *fix* is ``None`` (only check), ``"leaks"`` or ``"all"`` (:class:`~imago.RepairMode`,
        ``qemu-img check -r``); repairing needs an image opened for writing. Formats without
        a check raise :class:`~imago.UnsupportedFeatureError` (``qemu-img check`` exits with
        63 for them). The result reports corruptions, leaks and what was fixed
        (:class:`~imago.CheckResult`); damage is reported, not raised.
        """
        try:
            mode = RepairMode.parse(fix)
        except ValueError as error:
            raise InvalidRequestError(f"{self._name()}: {error}") from None
        if self._closed:
            raise ClosedError(f"{self._name()} is closed")
        checker = Capability.CHECK.of(self._driver)
        if checker is None:
            raise UnsupportedFeatureError(f"checking {self._driver.name} images", self.filename)
        if mode is not None and not self._driver.writable:
            raise ReadOnlyError(f"{self._name()} (repairing needs an image opened for writing)")
        self._cache = ExtentCache(-1)
        try:
            return await checker.check(mode)
        finally:
            if mode is not None:
                self._driver.mappings_changed()

    async def close(self) -> None:
        """Flush (if writable) and release the image. Closing twice does nothing.

        Closing one of several accesses over a driver closes the driver; closing the others
        afterwards does nothing.
        """
        if self._closed:
            return
        self._cache = ExtentCache(-1)
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        # Marked before the flush: a failed close is reported here, not retried when dropped.
        if unclosed.mark_closed(self._driver):
            return
        await unclosed.release(self._driver)

    # --- adapters -------------------------------------------------------------------------------

    def as_sync(self) -> SyncFormatAccess:
        """A synchronous view of this image."""
        return SyncFormatAccess(self)

    def as_file(self) -> io.RawIOBase:
        """A seekable binary file object over the disk (see :meth:`SyncFormatAccess.as_file`)."""
        return self.as_sync().as_file()

    async def __aenter__(self) -> FormatAccess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<FormatAccess {self._driver.name} {self.filename!r} size={self.size}{state}>"


async def read_through(driver: FormatDriver, bufs: Sequence[memoryview], offset: int) -> None:
    """Fill *bufs* with what *driver*'s layer reads at guest *offset* now: for copy-on-write.

    Format drivers call this to copy the data a write leaves untouched in a cluster it moves: it
    runs the engine's read loop over the driver's own mappings (backing layers and compressed
    data included), without the request checks of :class:`FormatAccess` (the driver may be in
    the middle of changing its metadata) and without caching what it maps. Bytes past the end of
    the disk read as zero.
    """
    length = iovec_length(bufs)
    await FormatAccess._engine(driver)._read_as_backing(list(bufs), offset, length)


class SyncFormatAccess:
    """Synchronous I/O on an image: the methods of :class:`FormatAccess`, blocking.

    Takes an opened format driver or a :class:`FormatAccess`. A context manager: leaving
    it (or :meth:`close`) flushes and closes the image. One dropped without closing is
    flushed and closed when it is garbage-collected or at interpreter exit, with a
    :class:`ResourceWarning` (see :class:`FormatAccess`).
    """

    def __init__(self, image: FormatDriver | FormatAccess) -> None:
        if isinstance(image, FormatAccess):
            self._access = image
        elif isinstance(image, FormatDriver):
            self._access = FormatAccess(image)
        else:
            raise InvalidRequestError(
                f"SyncFormatAccess needs a FormatDriver or FormatAccess, got {type(image).__name__}"
            )

    @property
    def access(self) -> FormatAccess:
        """The asynchronous access underneath."""
        return self._access

    @property
    def driver(self) -> FormatDriver:
        """The format driver underneath."""
        return self._access.driver

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self._access.size

    @property
    def writable(self) -> bool:
        """Whether the image is open for writing."""
        return self._access.writable

    @property
    def closed(self) -> bool:
        """Whether the image has been closed."""
        return self._access.closed

    @property
    def format_name(self) -> str:
        """The format's name."""
        return self._access.format_name

    @property
    def filename(self) -> str | None:
        """The image's file name, if any."""
        return self._access.filename

    @property
    def mem_align(self) -> int:
        """See :attr:`FormatAccess.mem_align`."""
        return self._access.mem_align

    @property
    def req_align(self) -> int:
        """See :attr:`FormatAccess.req_align`."""
        return self._access.req_align

    def read(self, buf: Any, offset: int) -> None:
        """Fill *buf* with the disk's bytes at *offset*."""
        access = self._access
        cache = access._cache
        if cache.epoch == access._driver.mapping_epoch and type(offset) is int:
            view = memoryview(buf) if type(buf) is bytearray else byte_view(buf, writable=True)
            extent = cache.find(offset, view.nbytes)
            if extent is not None:
                extent.storage.readv_inline([view], offset + extent.delta)
                return
        runtime.run_sync(access.read(buf, offset))

    def readv(self, bufs: Sequence[Any], offset: int) -> None:
        """Fill the buffers of *bufs* with the disk's bytes at *offset*."""
        runtime.run_sync(self._access.readv(bufs, offset))

    def write(self, buf: Any, offset: int) -> None:
        """Write *buf* at *offset*."""
        runtime.run_sync(self._access.write(buf, offset))

    def writev(self, bufs: Sequence[Any], offset: int) -> None:
        """Write the buffers of *bufs* at *offset*."""
        runtime.run_sync(self._access.writev(bufs, offset))

    def write_compressed(self, buf: Any, offset: int) -> None:
        """See :meth:`FormatAccess.write_compressed`."""
        runtime.run_sync(self._access.write_compressed(buf, offset))

    def write_zeroes(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.write_zeroes`."""
        runtime.run_sync(self._access.write_zeroes(offset, length))

    def discard_to_zero(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_zero`."""
        runtime.run_sync(self._access.discard_to_zero(offset, length))

    def discard_to_any(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_any`."""
        runtime.run_sync(self._access.discard_to_any(offset, length))

    def discard_to_backing(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_backing`."""
        runtime.run_sync(self._access.discard_to_backing(offset, length))

    def get_mapping(self, offset: int, max_length: int) -> tuple[Mapping, int]:
        """See :meth:`FormatAccess.get_mapping`."""
        return runtime.run_sync(self._access.get_mapping(offset, max_length))

    def get_shallow_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """See :meth:`FormatAccess.get_shallow_mapping`."""
        return runtime.run_sync(self._access.get_shallow_mapping(offset, max_length))

    def flush(self) -> None:
        """See :meth:`FormatAccess.flush`."""
        runtime.run_sync(self._access.flush())

    def sync(self) -> None:
        """See :meth:`FormatAccess.sync`."""
        runtime.run_sync(self._access.sync())

    def resize(
        self, new_size: int, prealloc: PreallocateMode | str = PreallocateMode.NONE, *, shrink: bool = False
    ) -> None:
        """See :meth:`FormatAccess.resize` (shrinking needs ``shrink=True``)."""
        runtime.run_sync(self._access.resize(new_size, prealloc, shrink=shrink))

    def check(self, fix: RepairMode | str | None = None) -> CheckResult:
        """See :meth:`FormatAccess.check` (``fix``: ``None``, ``"leaks"`` or ``"all"``)."""
        return runtime.run_sync(self._access.check(fix))

    def close(self) -> None:
        """Flush (if writable) and close the image. Closing twice does nothing."""
        runtime.run_sync(self._access.close())

    def as_file(self) -> ImageFile:
        """A seekable binary file object (:class:`io.RawIOBase`) over the disk.

        Closing the file object does not close the image. Writes cannot grow the disk.
        """
        return ImageFile(self)

    def __enter__(self) -> SyncFormatAccess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncFormatAccess {self.format_name} {self.filename!r} size={self.size}>"
