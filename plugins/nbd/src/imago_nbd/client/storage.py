"""``Nbd``: an export of an NBD server as an imago storage (the ``nbd`` storage driver).

Opened from a URI (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, and their
TLS forms ``nbds://``/``nbds+unix://``). Requests are split at the server's maximum block size,
aligned to its minimum (unaligned edges read into a bounce buffer, written read-modify-write),
and pipelined, a bounded number in flight per connection. When the server allows multi-conn,
reads spread over several connections.
"""

from __future__ import annotations

import _thread  # threading's lock without importing threading (loading the plugin stays cheap)
import contextlib
import os
import select
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from imago import (
    ClosedError,
    ImplicitOpenDeniedError,
    InvalidOptionError,
    InvalidRequestError,
    PreallocateMode,
    ReadOnlyError,
    Storage,
    StorageOpenOptions,
    UnsupportedFeatureError,
    runtime,
)

from ..constants import URI_SCHEMES, Command, CommandFlag, StateFlag, TransmissionFlag
from ..errors import NbdConnectionError, ProtocolError

# The connection machinery (and attrs, ssl with it) is imported by the first open, not when the
# plugin registers the driver: listing the drivers (every probe does) stays cheap.
if TYPE_CHECKING:
    from ..block_size import BlockSize
    from .connection import Connection, Operation
    from .handshake_io import Negotiated
    from .uri import NbdAddress

__all__ = ["DEFAULT_CONNECTIONS", "DEFAULT_REQUESTS", "DEFAULT_TIMEOUT", "Nbd"]

#: Connections used for reads when the server allows multi-conn (as nbdcopy).
DEFAULT_CONNECTIONS = 4
#: Requests in flight per connection (as nbdcopy).
DEFAULT_REQUESTS = 64
#: Seconds allowed for connecting and the handshake.
DEFAULT_TIMEOUT = 30.0
# Largest request sent (nbdcopy's size): big enough to amortise the per-request cost, small
# enough that the servers' buffers stay in the CPU caches (measured faster than 1-4 MiB).
_REQUEST_SIZE = 256 << 10
# The protocol's limit on payloads when the server advertised none.
_DEFAULT_MAX_PAYLOAD = 32 << 20
_U32_MAX = (1 << 32) - 1
# Seconds an extra multi-conn connection may take to be greeted.
_EXTRA_TIMEOUT = 1.0
_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)

# One request to make: command, offset, length, flags, READ target, WRITE payload.
_Job = tuple[Command, int, int, int, "memoryview | None", "Sequence[memoryview]"]


def _int_option(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidOptionError(name, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def _driver_options(options: Mapping[str, Any]) -> tuple[int, int, str | None, float]:
    """The validated driver options: connections, requests, tls_certificates, timeout."""
    unknown = set(options) - {"connections", "requests", "tls_certificates", "timeout"}
    if unknown:
        raise InvalidOptionError(
            sorted(unknown)[0], "unknown nbd driver option (known: connections, requests, tls_certificates, timeout)"
        )
    connections = _int_option(options, "connections", DEFAULT_CONNECTIONS, 1, 64)
    requests = _int_option(options, "requests", DEFAULT_REQUESTS, 1, 1024)
    certificates = options.get("tls_certificates")
    if certificates is not None:
        if not isinstance(certificates, (str, os.PathLike)) or not os.fspath(certificates):
            raise InvalidOptionError("tls_certificates", f"must be a directory name, got {certificates!r}")
        certificates = os.fspath(certificates)
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, str):
        with contextlib.suppress(ValueError):
            timeout = float(timeout)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
        raise InvalidOptionError("timeout", f"must be a number of seconds above 0 (at most 3600), got {timeout!r}")
    return connections, requests, certificates, float(timeout)


class Nbd(Storage):
    """An NBD export as a storage. Open it with :meth:`open` (``filename`` is the URI).

    Driver options: ``connections`` (reads over that many connections when the server allows
    multi-conn; default 4), ``requests`` (requests in flight per connection; default 64),
    ``tls_certificates`` (a directory with ``ca-cert.pem`` and optionally
    ``client-cert.pem``/``client-key.pem``; the URI's ``tls-certificates`` query parameter says
    the same), ``timeout`` (seconds for connecting and the handshake; default 30).
    """

    name: ClassVar[str] = "nbd"
    uri_schemes: ClassVar[tuple[str, ...]] = URI_SCHEMES

    def __init__(self, address: NbdAddress, connections: list[Connection], *, writable: bool, no_flush: bool) -> None:
        self._address = address
        self._connections = connections
        first = connections[0]
        self._flags = first.export.flags
        self._size = first.export.size
        self._block: BlockSize = first.block_size
        self._writable = writable
        self._no_flush = no_flush
        self._closed = False
        self._lock = _thread.allocate_lock()  # the blocking path is used from one thread at a time
        self._next_connection = 0
        minimum = self._block.minimum
        maximum = min(self._block.maximum, _DEFAULT_MAX_PAYLOAD if first.export.block_size is None else _U32_MAX)
        self._max_request = max(minimum, min(maximum, _REQUEST_SIZE) // minimum * minimum)
        self._max_zero = max(minimum, min(maximum, _U32_MAX) // minimum * minimum)
        self._max_trim = max(minimum, (1 << 30) // minimum * minimum)
        # The last block status reply, merged into runs: (start, end, is_data).
        self._extents: list[tuple[int, int, bool]] = []

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> Nbd:
        """Connect to the export *options.filename* (an NBD URI) and negotiate."""
        from .connection import Connection
        from .handshake_io import negotiate
        from .uri import parse_uri

        if options.filename is None:
            raise InvalidOptionError("filename", "the nbd driver needs an NBD URI (nbd://HOST/EXPORT, ...)")
        address = parse_uri(options.filename)
        connections, requests, certificates, timeout = _driver_options(options.driver_options)
        if address.tls_certificates is not None:
            if certificates is not None and certificates != address.tls_certificates:
                raise InvalidOptionError(
                    "tls_certificates", f"{certificates!r} differs from the URI's tls-certificates"
                )
            certificates = address.tls_certificates
        if certificates is not None and not address.tls:
            raise InvalidOptionError("tls_certificates", f"{address.uri!r} does not use TLS (nbds://)")

        def connect() -> Negotiated:
            return negotiate(address, timeout=timeout, tls_certificates=certificates)

        def connect_more() -> Negotiated:
            # A server at its client limit accepts the socket but never greets: do not wait long.
            return negotiate(address, timeout=min(timeout, _EXTRA_TIMEOUT), tls_certificates=certificates)

        first = Connection(address.uri, await runtime.run_blocking(connect), max_in_flight=requests)
        opened = [first]
        try:
            flags = first.export.flags
            if options.writable and flags & TransmissionFlag.READ_ONLY:
                refusal = ReadOnlyError(address.uri)
                refusal.args = (f"{address.uri}: the server exports it read-only; it cannot be opened for writing",)
                raise refusal
            if flags & TransmissionFlag.CAN_MULTI_CONN:
                for _ in range(connections - 1):
                    try:
                        negotiated = await runtime.run_blocking(connect_more)
                    except NbdConnectionError:
                        break  # the server takes fewer clients (qemu-nbd -e): go on with those it took
                    other = Connection(address.uri, negotiated, max_in_flight=requests)
                    opened.append(other)
                    if other.export.size != first.export.size or other.export.flags != flags:
                        raise NbdConnectionError(
                            address.uri, "the server describes the export differently on another connection"
                        )
        except BaseException:
            for connection in opened:
                connection.close()
            raise
        return cls(address, opened, writable=options.writable, no_flush=options.no_flush)

    # --- properties --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the storage was opened for writing."""
        return self._writable

    @property
    def filename(self) -> str:
        """The URI the storage was opened with."""
        return self._address.uri

    @property
    def req_align(self) -> int:
        """The server's minimum block size."""
        return self._block.minimum

    @property
    def block_size(self) -> BlockSize:
        """The server's block-size constraints (the protocol's defaults when it advertised none)."""
        return self._block

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The export's transmission flags (what the server supports)."""
        return self._flags

    @property
    def connections(self) -> int:
        """How many connections the storage holds."""
        return len(self._connections)

    def allocated_size(self) -> int | None:
        """Unknown over NBD: ``None``."""
        return None

    # --- planning ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self._address.uri}: the NBD storage is closed")

    def _check_write(self, offset: int, length: int) -> None:
        self._check_open()
        if not self._writable:
            raise ReadOnlyError(self._address.uri)
        if offset < 0 or offset + length > self._size:
            raise InvalidRequestError(
                f"{self._address.uri}: write at offset {offset} length {length} reaches past the end of the "
                f"export ({self._size} bytes); NBD exports cannot grow"
            )
        self._extents = []

    def _aligned(self, offset: int, length: int) -> bool:
        minimum = self._block.minimum
        return minimum == 1 or (offset % minimum == 0 and length % minimum == 0)

    def _pieces(self, command: Command, offset: int, view: memoryview, *, write: bool) -> list[_Job]:
        step = self._max_request
        jobs: list[_Job] = []
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            if write:
                jobs.append((command, offset + start, len(piece), 0, None, (piece,)))
            else:
                jobs.append((command, offset + start, len(piece), 0, piece, ()))
        return jobs

    def _plan_read(
        self, bufs: Sequence[memoryview], offset: int
    ) -> tuple[list[_Job], list[tuple[memoryview, memoryview]]]:
        """READ jobs for *bufs* at *offset*, and (destination, bounce) copies for unaligned parts."""
        self._check_open()
        if offset < 0:
            raise InvalidRequestError(f"{self._address.uri}: read at negative offset {offset}")
        jobs: list[_Job] = []
        copies: list[tuple[memoryview, memoryview]] = []
        minimum = self._block.minimum
        position = offset
        for buf in bufs:
            length = len(buf)
            inside = max(0, min(length, self._size - position))
            if inside < length:
                buf[inside:] = bytes(length - inside)  # past the end: zeroes
            if inside:
                if self._aligned(position, inside):
                    jobs += self._pieces(Command.READ, position, buf[:inside], write=False)
                else:
                    start = position - position % minimum
                    end = min(-(-(position + inside) // minimum) * minimum, self._size)
                    bounce = memoryview(bytearray(end - start))
                    jobs += self._pieces(Command.READ, start, bounce, write=False)
                    copies.append((buf[:inside], bounce[position - start : position - start + inside]))
            position += length
        return jobs, copies

    def _connection_for(self, command: Command) -> Connection:
        connections = self._connections
        if command != Command.READ or len(connections) == 1:
            return connections[0]
        self._next_connection = (self._next_connection + 1) % len(connections)
        return connections[self._next_connection]

    # --- running requests ---------------------------------------------------------------------------

    def _run_sync(self, jobs: Sequence[_Job]) -> list[Operation]:
        """Send *jobs*, a bounded number in flight, and wait for all; raises the first error."""
        with self._lock:
            limit = self._connections[0].max_in_flight * len(self._connections)
            window: deque[Operation] = deque()
            ops: list[Operation] = []
            try:
                for command, offset, length, flags, target, payload in jobs:
                    while len(window) >= limit:
                        self._wait_sync(window.popleft())
                    connection = self._connection_for(command)
                    op = connection.submit_sync(command, offset, length, flags=flags, target=target, payload=payload)
                    window.append(op)
                    ops.append(op)
            finally:
                # Every request sent is waited for, even after an error: a reply arriving later
                # must not write into a buffer the caller got back.
                for op in window:
                    if op.connection.broken is None:
                        with contextlib.suppress(Exception):
                            self._wait_sync(op)
        for op in ops:
            op.check()
        return ops

    def _wait_sync(self, op: Operation) -> None:
        """Receive until *op* is done; with several connections, the others are served meanwhile.

        A server writing to a connection nobody reads stalls once its socket buffer is full, so
        while *op*'s connection has nothing, whatever the others have is taken too.
        """
        connection = op.connection
        if len(self._connections) == 1:
            connection.wait_sync(op)
            return
        while not op.done:
            if connection.receive_some():
                continue
            busy = [other for other in self._connections if other.in_flight and other.broken is None]
            progressed = False
            for other in busy:
                if other is not connection:
                    with contextlib.suppress(NbdConnectionError, ProtocolError):  # its own requests get the error
                        progressed = other.receive_some() or progressed
            if not progressed and not op.done:
                poller = select.poll()
                for other in busy:
                    poller.register(other.fd, select.POLLIN)
                poller.poll()

    async def _run_async(self, jobs: Sequence[_Job]) -> list[Operation]:
        """:meth:`_run_sync` under the running loop: the replies arrive through the loop."""
        ops: list[Operation] = []
        try:
            for command, offset, length, flags, target, payload in jobs:
                connection = self._connection_for(command)
                ops.append(
                    await connection.submit_async(command, offset, length, flags=flags, target=target, payload=payload)
                )
        finally:
            for op in ops:
                await op.connection.wait_async(op)
        for op in ops:
            op.check()
        return ops

    async def _run(self, jobs: Sequence[_Job]) -> list[Operation]:
        if runtime.inline():
            return self._run_sync(jobs)
        return await self._run_async(jobs)

    # --- I/O -----------------------------------------------------------------------------------------

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read into *bufs* from *offset*; bytes past the end of the export read as zero."""
        jobs, copies = self._plan_read(bufs, offset)
        await self._run(jobs)
        for destination, bounce in copies:
            destination[:] = bounce

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Blocking :meth:`readv` without a coroutine."""
        jobs, copies = self._plan_read(bufs, offset)
        self._run_sync(jobs)
        for destination, bounce in copies:
            destination[:] = bounce

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write *bufs* at *offset* (inside the export: NBD exports cannot grow)."""
        length = sum(len(buf) for buf in bufs)
        self._check_write(offset, length)
        if not length:
            return
        if not self._aligned(offset, length):
            await self._write_unaligned(bufs, offset, length)
            return
        jobs: list[_Job] = []
        position = offset
        for buf in bufs:
            jobs += self._pieces(Command.WRITE, position, buf, write=True)
            position += len(buf)
        await self._run(jobs)

    async def _write_unaligned(self, bufs: Sequence[memoryview], offset: int, length: int) -> None:
        """Read-modify-write of the minimum blocks *bufs* touch."""
        minimum = self._block.minimum
        start = offset - offset % minimum
        end = -(-(offset + length) // minimum) * minimum
        bounce = memoryview(bytearray(end - start))
        edges = [(start, minimum)]
        if end - minimum > start:
            edges.append((end - minimum, minimum))
        jobs: list[_Job] = []
        for edge, size in edges:
            if edge + size <= self._size:
                jobs.append((Command.READ, edge, size, 0, bounce[edge - start : edge - start + size], ()))
        await self._run(jobs)
        position = offset - start
        for buf in bufs:
            bounce[position : position + len(buf)] = buf
            position += len(buf)
        await self._run(self._pieces(Command.WRITE, start, bounce[: min(end, self._size) - start], write=True))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """WRITE_ZEROES (NO_HOLE unless *unmap*); zero buffers when the server lacks the command."""
        self._check_write(offset, length)
        if not length:
            return
        if not self._flags & TransmissionFlag.SEND_WRITE_ZEROES:
            await super().write_zeroes(offset, length, unmap=unmap)
            return
        minimum = self._block.minimum
        start = -(-offset // minimum) * minimum
        end = (offset + length) // minimum * minimum
        if start >= end:
            await super().write_zeroes(offset, length, unmap=unmap)
            return
        if start > offset:
            await super().write_zeroes(offset, start - offset, unmap=unmap)
        if offset + length > end:
            await super().write_zeroes(end, offset + length - end, unmap=unmap)
        flags = 0 if unmap else int(CommandFlag.NO_HOLE)
        jobs: list[_Job] = [
            (Command.WRITE_ZEROES, position, min(self._max_zero, end - position), flags, None, ())
            for position in range(start, end, self._max_zero)
        ]
        self._extents = []
        await self._run(jobs)

    async def discard(self, offset: int, length: int) -> None:
        """TRIM the whole minimum blocks of the range when the server takes TRIM; otherwise nothing."""
        self._check_write(offset, length)
        if not self._flags & TransmissionFlag.SEND_TRIM:
            return
        minimum = self._block.minimum
        start = -(-offset // minimum) * minimum
        end = (offset + length) // minimum * minimum
        jobs: list[_Job] = [
            (Command.TRIM, position, min(self._max_trim, end - position), 0, None, ())
            for position in range(start, end, self._max_trim)
        ]
        await self._run(jobs)

    async def flush(self) -> None:
        """FLUSH, when the server takes it and the storage was not opened with ``no_flush``."""
        self._check_open()
        if self._no_flush or not self._writable or not self._flags & TransmissionFlag.SEND_FLUSH:
            return
        await self._run([(Command.FLUSH, 0, 0, 0, None, ())])

    async def sync(self) -> None:
        """FLUSH, even with ``no_flush``."""
        self._check_open()
        if self._writable and self._flags & TransmissionFlag.SEND_FLUSH:
            await self._run([(Command.FLUSH, 0, 0, 0, None, ())])

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """NBD exports keep their size: only the current size is accepted."""
        self._check_open()
        if not self._writable:
            raise ReadOnlyError(self._address.uri)
        if new_size != self._size:
            raise UnsupportedFeatureError("resizing an NBD export", self._address.uri)

    async def data_extent(self, offset: int, length: int) -> tuple[bool, int]:
        """Data or hole from the server's ``base:allocation`` block status (a hole: unallocated and zero)."""
        self._check_open()
        connection = self._connections[0]
        if connection.allocation_context is None or offset >= self._size or length <= 0:
            return True, max(length, 1)
        run = self._cached_extent(offset, length)
        if run is None:
            minimum = self._block.minimum
            start = offset - offset % minimum
            span = min(self._size - start, _U32_MAX // minimum * minimum)
            ops = await self._run([(Command.BLOCK_STATUS, start, span, 0, None, ())])
            extents: list[tuple[int, int, bool]] = []
            position = start
            for extent_length, flags in ops[0].extents:
                is_data = (flags & _HOLE) != _HOLE
                end = min(position + extent_length, self._size)
                if extents and extents[-1][2] == is_data:
                    extents[-1] = (extents[-1][0], end, is_data)
                else:
                    extents.append((position, end, is_data))
                position = end
                if position >= self._size:
                    break
            self._extents = extents
            run = self._cached_extent(offset, length)
            if run is None:  # the server said nothing about offset (it must): call it data
                return True, length
        return run

    def _cached_extent(self, offset: int, length: int) -> tuple[bool, int] | None:
        for start, end, is_data in self._extents:
            if start <= offset < end:
                return is_data, min(end - offset, length)
        return None

    async def close(self) -> None:
        """Disconnect (NBD_CMD_DISC) and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for connection in self._connections:
            connection.close()

    def resolve_relative_path(self, name: str) -> str:
        """Absolute names stay local file names; relative ones are refused (never turned into URIs)."""
        if os.path.isabs(name):
            return name
        raise ImplicitOpenDeniedError(
            name, f"it is relative to an image on the NBD export {self._address.uri}, which has no directory"
        )

    def __repr__(self) -> str:
        return f"<Nbd {self._address.uri!r}>"
