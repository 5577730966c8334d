"""``Export``: the one image a server offers, its policy, and the I/O the commands need.

The export is the guest-visible disk of a :class:`imago.FormatAccess` (never its container
bytes). It decides the transmission flags, answers the metadata contexts (through
:mod:`imago_nbd.server.extents`), and serialises what the engine requires exclusive use for:
discards may invalidate mappings other requests hold, so they wait for the requests in flight
and hold new ones back (:class:`AccessGate`).
"""

from __future__ import annotations

import asyncio
from collections import deque

from imago import FormatAccess, InvalidRequestError, Storage

from ..block_size import BlockSize
from ..constants import TransmissionFlag
from .buffers import BufferPool

__all__ = [
    "ALLOCATION_DEPTH",
    "BASE_ALLOCATION",
    "MAX_PAYLOAD",
    "AccessGate",
    "Export",
]

#: The metadata context of allocation status (the protocol's own).
BASE_ALLOCATION = "base:allocation"
#: QEMU's metadata context: which layer of the backing chain allocates a range.
ALLOCATION_DEPTH = "qemu:allocation-depth"
#: The largest READ/WRITE payload the server accepts (what qemu-nbd advertises).
MAX_PAYLOAD = 32 * 1024 * 1024

_BASE_FLAGS = (
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_CACHE
)
_WRITE_FLAGS = TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO


class AccessGate:
    """Shared use for ordinary requests, exclusive use for discards (which drain the others).

    Entering shared use never suspends unless a discard holds or awaits the gate; a waiting
    discard holds new requests back, so a stream of reads cannot starve it.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def open(self) -> bool:
        """Whether shared use may start at once (no discard holds or awaits the gate)."""
        return not self._exclusive and not self._exclusive_waiting

    def enter_shared_now(self) -> None:
        """Start shared use; only when :attr:`open`."""
        self._shared += 1

    async def enter_shared(self) -> None:
        """Start shared use, waiting for discards to finish."""
        while not self.open:
            await self._wait()
        self._shared += 1

    def leave_shared(self) -> None:
        """End shared use."""
        self._shared -= 1
        if not self._shared and self._exclusive_waiting:
            self._wake()

    async def enter_exclusive(self) -> None:
        """Start exclusive use: wait until nothing else is in flight."""
        self._exclusive_waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._wait()
        finally:
            self._exclusive_waiting -= 1
        self._exclusive = True

    def leave_exclusive(self) -> None:
        """End exclusive use."""
        self._exclusive = False
        self._wake()

    async def _wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    def _wake(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)


def _zeroing_is_fast(access: FormatAccess) -> bool:
    """Whether zeroing needs no data writes (metadata, or a storage that zeroes in place)."""
    driver = access.driver
    if not type(driver).identity_mapped:
        return True  # formats with metadata record zeroes
    return type(driver.storage).write_zeroes is not Storage.write_zeroes


class Export:
    """The image a server offers under *name*, with its policy.

    *access* is an open image (the caller keeps ownership: the export never closes it);
    *read_only* refuses writes even on an image opened writable; *allocation_depth* offers
    ``qemu:allocation-depth``; *discard* lets TRIM and WRITE_ZEROES without NO_HOLE free space
    (qemu-nbd's ``--discard=unmap``; otherwise TRIM does nothing, as qemu-nbd's default);
    *writethrough* flushes after every write (the cache modes ``writethrough``/``directsync``);
    *multi_conn* advertises that clients may spread requests over several connections (one
    process, one cache: a FLUSH on any connection covers the writes of all). A server that
    takes one client at a time must not advertise it: such a client would wait forever for its
    second connection.
    """

    def __init__(
        self,
        access: FormatAccess,
        *,
        name: str = "",
        description: str = "",
        read_only: bool = False,
        allocation_depth: bool = False,
        discard: bool = False,
        writethrough: bool = False,
        multi_conn: bool = True,
    ) -> None:
        if not isinstance(access, FormatAccess):
            raise InvalidRequestError(f"an NBD export serves a FormatAccess, not {type(access).__name__}")
        if access.closed:
            raise InvalidRequestError(f"{access.filename or 'the image'} is closed: nothing to serve")
        for what, text in (("export name", name), ("export description", description)):
            if not isinstance(text, str) or len(text.encode("utf-8", "surrogateescape")) > 4096:
                raise InvalidRequestError(f"the {what} must be a string of at most 4096 bytes")
        self.access = access
        self.name = name
        self.description = description
        self.read_only = read_only or not access.writable
        self.allocation_depth = allocation_depth
        self.discard = discard
        self.writethrough = writethrough
        self.fast_zero = _zeroing_is_fast(access)
        self.gate = AccessGate()
        #: Request buffers shared by the export's connections.
        self.buffers = BufferPool()
        flags = _BASE_FLAGS | TransmissionFlag.CAN_MULTI_CONN if multi_conn else _BASE_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= _WRITE_FLAGS
        self.flags = flags
        # Minimum 1 (the engine handles any alignment), qemu-nbd's preferred and maximum.
        self.block_size = BlockSize(minimum=1, preferred=4096, maximum=MAX_PAYLOAD)

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self.access.size

    def contexts(self) -> tuple[str, ...]:
        """The metadata contexts the export offers."""
        if self.allocation_depth:
            return (BASE_ALLOCATION, ALLOCATION_DEPTH)
        return (BASE_ALLOCATION,)

    def match_contexts(self, queries: tuple[str, ...], *, listing: bool) -> list[str]:
        """The contexts *queries* select (a LIST with no query lists them all).

        A query names a context, or a namespace followed by a colon (``base:``, ``qemu:``) for
        every context of it; queries of other namespaces select nothing.
        """
        offered = self.contexts()
        if not queries:
            return list(offered) if listing else []
        chosen: list[str] = []
        for query in queries:
            for context in offered:
                if (query == context or (query.endswith(":") and context.startswith(query))) and context not in chosen:
                    chosen.append(context)
        return chosen

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        """The flags a connection sees (DF only with structured replies)."""
        return self.flags | TransmissionFlag.SEND_DF if structured else self.flags
