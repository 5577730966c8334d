"""One NBD connection in transmission phase: requests out, replies dispatched by cookie.

The socket stays non-blocking. Two ways drive it, on the same state:

- blocking (the synchronous API, :func:`imago.runtime.inline`): the caller sends and then
  receives in place until its requests are done, waiting in ``poll`` when the socket has
  nothing;
- asyncio: a reader callback registered on the loop receives whatever arrives and completes
  the futures of the requests it answers; sends that do not fit the socket wait in an output
  buffer drained by a writer callback.

Either way, a READ's data goes straight from the socket into the caller's buffer (the reply
decoder's zero-copy mode), and any reply may complete any request in flight, whichever way
it was sent. A broken connection fails every request in flight.
"""

from __future__ import annotations

import collections
import contextlib
import select
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..constants import Command, errno_from_nbd
from ..errors import NbdConnectionError, NbdServerError, ProtocolError
from ..replies import (
    BlockStatusChunk,
    DataHeader,
    ErrorChunk,
    OffsetDataChunk,
    OffsetHoleChunk,
    ReplyDecoder,
    ReplyEvent,
    SimpleReply,
)
from ..requests import Request, encode_request
from .handshake_io import Negotiated

if TYPE_CHECKING:
    import asyncio

__all__ = ["Connection", "Operation"]

# Read size while no payload is announced: a reply header and the start of its data.
_SCRATCH = 16 * 1024
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError)
_POLL_IN = select.POLLIN | select.POLLPRI
_POLL_OUT = select.POLLOUT


class Operation:
    """A request in flight and what its reply said.

    *target* receives a READ's data; ``error`` is set by an error reply or a broken connection;
    ``extents`` holds BLOCK_STATUS descriptors; ``future`` is set for requests awaited under a loop.
    """

    __slots__ = ("connection", "done", "error", "extents", "future", "request", "target")

    def __init__(self, connection: Connection, request: Request, target: memoryview | None) -> None:
        self.connection = connection
        self.request = request
        self.target = target
        self.done = False
        self.error: BaseException | None = None
        self.extents: tuple[tuple[int, int], ...] = ()
        self.future: asyncio.Future[None] | None = None

    def check(self) -> None:
        """Raise the error the reply brought, if any."""
        if self.error is not None:
            raise self.error


class Connection:
    """A connection in transmission phase (see the module's description)."""

    def __init__(self, uri: str, negotiated: Negotiated, *, max_in_flight: int) -> None:
        self.uri = uri
        self.sock = negotiated.sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.export = negotiated.export
        self.block_size = negotiated.block_size
        self.allocation_context = negotiated.allocation_context
        self.max_in_flight = max_in_flight
        contexts = () if negotiated.allocation_context is None else (negotiated.allocation_context,)
        self._decoder = ReplyDecoder(structured=negotiated.structured, meta_contexts=contexts, zero_copy=True)
        self._pending: dict[int, Operation] = {}
        self._cookie = 0
        self._scratch = bytearray(_SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        # Where the payload the decoder announced goes, and whose it is.
        self._payload: memoryview | None = None
        self._payload_op: Operation | None = None
        self._payload_done = False  # whether the reply is complete once that payload is in
        self._out = bytearray()  # bytes an async send could not hand to the socket yet
        self.broken: BaseException | None = None
        self.closed = False
        # asyncio: the loop whose reader/writer callbacks are registered, request slots.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = False
        self._writer = False
        self._async_in_flight = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        if negotiated.trailing:
            self.sock.close()
            raise ProtocolError(f"{len(negotiated.trailing)} unsolicited bytes after the handshake", sender="server")

    @property
    def in_flight(self) -> int:
        """Requests awaiting their reply."""
        return len(self._pending)

    # --- submitting ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise NbdConnectionError(self.uri, f"the connection is broken ({self.broken})")

    def _register(self, command: Command, offset: int, length: int, flags: int, target: memoryview | None) -> Operation:
        self._check_usable()
        self._cookie += 1
        request = Request(command=command, cookie=self._cookie, offset=offset, length=length, flags=flags)
        op = Operation(self, request, target)
        self._decoder.request_sent(request)
        self._pending[request.cookie] = op
        return op

    def _message(self, op: Operation, payload: Sequence[memoryview]) -> list[memoryview | bytes]:
        request = op.request
        if request.command == Command.READ:
            return [request.header()]  # the hot path: nothing to check in a READ this client built
        if request.command == Command.WRITE:
            return [request.header(), *payload]
        return [encode_request(request)]

    def submit_sync(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        target: memoryview | None = None,
        payload: Sequence[memoryview] = (),
    ) -> Operation:
        """Send a request, blocking until it is handed to the socket; its reply is awaited with :meth:`wait_sync`."""
        op = self._register(command, offset, length, flags, target)
        self._send_blocking(self._message(op, payload))
        return op

    def receive_some(self) -> bool:
        """One non-blocking receive and its dispatch; ``False`` when the socket had nothing."""
        return self._receive_some()

    def wait_sync(self, op: Operation) -> None:
        """Receive in place until *op* is complete (its error, if any, is left in ``op.error``)."""
        while not op.done:
            if not self._receive_some():
                self._poll(_POLL_IN)

    async def submit_async(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        target: memoryview | None = None,
        payload: Sequence[memoryview] = (),
    ) -> Operation:
        """Send a request under the running loop once one of ``max_in_flight`` slots is free."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._async_in_flight >= self.max_in_flight:
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter  # the slot is handed over by the request that frees it
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()
                else:
                    with contextlib.suppress(ValueError):  # a cancelled waiter may be dropped already
                        self._slot_waiters.remove(waiter)
                raise
        else:
            self._async_in_flight += 1
        try:
            op = self._register(command, offset, length, flags, target)
        except BaseException:
            self._release_slot()
            raise
        op.future = loop.create_future()
        self._attach(loop)
        self._send_async(self._message(op, payload))
        return op

    async def wait_async(self, op: Operation) -> None:
        """Await *op*'s reply (its error, if any, is left in ``op.error``).

        When the waiting task is cancelled the request stays in flight, but its data no longer
        goes to the caller's buffer.
        """
        assert op.future is not None
        try:
            await op.future
        except BaseException:
            if not op.done:
                self._detach_target(op)
            raise

    def _detach_target(self, op: Operation) -> None:
        """Send the rest of *op*'s data to a throwaway buffer: its caller is gone."""
        if op.target is not None:
            op.target = memoryview(bytearray(len(op.target)))
        if self._payload_op is op and self._payload is not None:
            self._payload = memoryview(bytearray(len(self._payload)))

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._async_in_flight -= 1

    # --- sending ---------------------------------------------------------------------------------

    def _send_blocking(self, parts: Sequence[memoryview | bytes]) -> None:
        if self._out:
            self._flush_out_blocking()
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                try:
                    sent = self.sock.send(view)
                except _WOULD_BLOCK:
                    # Read while waiting to write: a server blocked on its replies reads nothing.
                    if self._poll(_POLL_IN | _POLL_OUT) & _POLL_IN:
                        self._receive_some()
                    continue
                except OSError as error:
                    raise self._break(f"sending failed: {error.strerror or error}") from None
                view = view[sent:]

    def _flush_out_blocking(self) -> None:
        data = bytes(self._out)
        self._out.clear()
        self._set_writer(False)
        self._send_blocking([data])

    def _send_async(self, parts: Sequence[memoryview | bytes]) -> None:
        if not self._out:
            for index, part in enumerate(parts):
                view = memoryview(part).cast("B")
                try:
                    sent = self.sock.send(view)
                except _WOULD_BLOCK:
                    sent = 0
                except OSError as error:
                    raise self._break(f"sending failed: {error.strerror or error}") from None
                if sent < len(view):
                    self._out += view[sent:]
                    for rest in parts[index + 1 :]:
                        self._out += rest
                    break
        else:
            for part in parts:
                self._out += part
        if self._out:
            self._set_writer(True)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except _WOULD_BLOCK:
            return
        except OSError as error:
            self._break(f"sending failed: {error.strerror or error}")
            return
        del self._out[:sent]
        if not self._out:
            self._set_writer(False)

    def _set_writer(self, on: bool) -> None:
        if on == self._writer:
            return
        loop = self._loop
        if on:
            assert loop is not None
            loop.add_writer(self.fd, self._on_writable)
        elif loop is not None and not loop.is_closed():
            loop.remove_writer(self.fd)
        self._writer = on

    # --- receiving ---------------------------------------------------------------------------------

    def _poll(self, events: int) -> int:
        poller = select.poll()
        poller.register(self.fd, events)
        ready = poller.poll()
        return ready[0][1] if ready else 0

    def _receive_some(self) -> bool:
        """One receive and its dispatch; ``False`` when nothing was there to receive."""
        if self.broken is not None:
            raise NbdConnectionError(self.uri, f"the connection is broken ({self.broken})")
        payload = self._payload
        try:
            count = self.sock.recv_into(payload if payload is not None else self._scratch_view)
        except _WOULD_BLOCK:
            return False
        except OSError as error:
            raise self._break(f"receiving failed: {error.strerror or error}") from None
        if not count:
            raise self._break("the server closed the connection")
        try:
            if payload is not None:
                self._decoder.payload_received(count)
                if count < len(payload):
                    self._payload = payload[count:]
                    return True
                self._payload = None
                op = self._payload_op
                self._payload_op = None
                assert op is not None
                self._dispatch(self._decoder.receive_data(b""), finished=op)
            else:
                self._dispatch(self._decoder.receive_data(self._scratch_view[:count]))
        except ProtocolError as error:
            self._break(str(error), error)
            raise
        return True

    def _dispatch(self, events: list[ReplyEvent], finished: Operation | None = None) -> None:
        """Apply reply events; *finished* is an operation whose announced data just arrived."""
        if finished is not None and self._payload_done:
            self._complete(finished)
        while events:
            for event in events:
                op = self._pending[event.cookie]
                if isinstance(event, DataHeader):
                    # Always the last event: the decoder waits for its payload to be moved.
                    assert op.target is not None
                    start = event.offset - op.request.offset
                    view = op.target[start : start + event.length]
                    moved = self._decoder.take_payload_into(view)
                    self._payload_done = event.done
                    if moved < event.length:
                        self._payload = view[moved:]
                        self._payload_op = op
                        return
                    if event.done:
                        self._complete(op)
                    break
                self._event(op, event)
            else:
                return
            events = self._decoder.receive_data(b"")

    def _event(self, op: Operation, event: ReplyEvent) -> None:
        if isinstance(event, OffsetHoleChunk):
            assert op.target is not None
            start = event.offset - op.request.offset
            op.target[start : start + event.length] = bytes(event.length)
        elif isinstance(event, BlockStatusChunk):
            if event.context_id == self.allocation_context:
                op.extents = event.extents
        elif isinstance(event, (ErrorChunk, SimpleReply)):
            if event.error and op.error is None:
                message = event.message if isinstance(event, ErrorChunk) else ""
                offset = event.offset if isinstance(event, ErrorChunk) and event.offset is not None else None
                op.error = self._server_error(op.request, event.error, message, offset)
        elif isinstance(event, OffsetDataChunk):  # pragma: no cover - not sent in zero-copy mode
            assert op.target is not None
            start = event.offset - op.request.offset
            op.target[start : start + len(event.data)] = event.data
        if event.done:
            self._complete(op)

    def _server_error(self, request: Request, error: int, message: str, offset: int | None) -> NbdServerError:
        command = Command(request.command).name if request.command in Command._value2member_map_ else "request"
        return NbdServerError(
            self.uri,
            errno_from_nbd(error),
            message,
            command=command,
            offset=request.offset if offset is None else offset,
            length=request.length,
        )

    def _complete(self, op: Operation) -> None:
        del self._pending[op.request.cookie]
        op.done = True
        future = op.future
        if future is not None:
            self._release_slot()
            if not future.done():
                future.set_result(None)
            if not self._pending:
                self._set_reader(None)

    # --- asyncio ----------------------------------------------------------------------------------

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._set_reader(None)
            if self._writer:
                self._set_writer(False)
            self._loop = loop
        if not self._reader:
            loop.add_reader(self.fd, self._on_readable)
            self._reader = True
            # Replies already taken off the socket (by a blocking wait, or held by TLS) raise
            # no readiness event: look once now.
            loop.call_soon(self._on_readable)

    def _set_reader(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self._reader and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self._reader = False

    def _on_readable(self) -> None:
        if not self._reader or self.broken is not None:
            return
        try:
            while self._pending and self._receive_some():
                pass
        except (NbdConnectionError, ProtocolError):
            pass  # every request in flight got the error

    # --- failure and closing ----------------------------------------------------------------------

    def _break(self, reason: str, error: BaseException | None = None) -> BaseException:
        """Mark the connection broken and fail every request in flight; returns the error."""
        if error is None:
            error = NbdConnectionError(self.uri, reason)
        if self.broken is None:
            self.broken = error
        self._set_reader(None)
        if self._writer:
            self._set_writer(False)
        pending = list(self._pending.values())
        self._pending.clear()
        self._payload = None
        self._payload_op = None
        for op in pending:
            op.done = True
            if op.error is None:
                op.error = error
            if op.future is not None:
                self._release_slot()
                if not op.future.done():
                    op.future.set_result(None)
        with contextlib.suppress(OSError):
            self.sock.close()
        return error

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close the socket; requests in flight fail. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None:
            try:
                if not self._pending:
                    # DISC after every reply, so that nothing in flight is cut off on the server.
                    self._cookie += 1
                    disc = encode_request(Request(command=Command.DISC, cookie=self._cookie))
                    self.sock.setblocking(True)
                    self.sock.settimeout(1.0)
                    self.sock.sendall(bytes(self._out) + disc)
            except (OSError, ValueError):
                pass  # the server went away first: nothing to say goodbye to
        self._break("the storage was closed", NbdConnectionError(self.uri, "the storage is closed"))
