"""``Connection``: one client of the server, as an asyncio buffered protocol.

The handshake runs through :class:`~imago_nbd.ServerHandshake` and
:func:`~imago_nbd.server.negotiation.answer_option`. In transmission, request headers are read
into one buffer and a WRITE's payload straight into its own buffer (no copy through a receive
buffer); each request runs as one task, so requests proceed concurrently and replies go out
in the order they finish. A reply is written whole by one synchronous call (``sendmsg`` of
its header and data when the transport is idle), so replies never interleave. Reading stops
while too many requests or bytes are in flight, and replies wait while the transport's
buffer is full: a client cannot make the server hold unbounded memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any

from imago import ImagoError, InvalidRequestError, MappingRaw, MappingSpecial, ReadOnlyError

from ..constants import REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Command, CommandFlag, Errno, OptionReply, nbd_from_errno
from ..errors import ProtocolError
from ..handshake import InvalidOptionReceived, OptionReceived
from ..replies import (
    block_status_chunk,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)
from ..requests import REQUEST_HEADER, Request, request_error
from ..server_handshake import ServerHandshake
from .export import ALLOCATION_DEPTH, MAX_PAYLOAD, Export
from .extents import chain_status, descriptors
from .negotiation import Next, answer_option
from .sender import SocketSender

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_IN_FLIGHT", "Connection", "wire_error"]

log = logging.getLogger("imago_nbd.server")

#: Seconds a client has to finish the handshake (qemu-nbd's limit).
HANDSHAKE_TIMEOUT = 10.0
#: Requests one connection may have in flight before the server stops reading from it.
MAX_IN_FLIGHT = 64
#: Payload and read bytes one connection may have in flight before the server stops reading.
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
#: The most block-status runs one reply walks (the client asks again for the rest).
MAX_STATUS_RUNS = 1 << 16

_HEADER = REQUEST_HEADER
_HEADER_SIZE = REQUEST_HEADER.size
_BUFFER_SIZE = 64 * 1024
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_SIMPLE = struct.Struct(">IIQ")


def wire_error(error: BaseException) -> int:
    """The NBD error value a failed operation is answered with."""
    if isinstance(error, ReadOnlyError):
        return Errno.EPERM
    if isinstance(error, InvalidRequestError):
        return Errno.EINVAL
    if isinstance(error, OSError) and error.errno:  # a host error, or an NBD export's below us
        return nbd_from_errno(error.errno)
    return Errno.EIO


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:1000]


class Connection(asyncio.BufferedProtocol):
    """One client connection serving *export*.

    *tls* (a server :class:`ssl.SSLContext`) makes TLS mandatory. *on_close* is called once
    when the connection is over (transport closed and no request left in flight).
    """

    def __init__(
        self,
        export: Export,
        *,
        tls: ssl.SSLContext | None = None,
        on_close: Callable[[Connection], None] | None = None,
        peer: str = "",
    ) -> None:
        self.export = export
        self._tls = tls
        self._tls_active = False
        self._upgrading = False
        self._on_close = on_close
        self.peer = peer
        self._transport: asyncio.BaseTransport | None = None
        self._sock: socket.socket | None = None
        self._handshake: ServerHandshake | None = ServerHandshake()
        self._buf = bytearray(_BUFFER_SIZE)
        self._start = 0
        self._end = 0
        # A WRITE whose payload is being received straight into its buffer.
        self._payload: bytearray | None = None
        self._payload_pos = 0
        self._payload_request: Request | None = None
        # An oversized WRITE whose payload is being dropped.
        self._discard = 0
        self._discard_request: Request | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight_bytes = 0
        self._reading_paused = False
        self._stopped = False  # no more requests are taken (DISC, shutdown, protocol error)
        self._lost = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._flags = export.flags
        self._structured = False
        self._contexts: list[tuple[int, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sender: SocketSender | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closed_called = False
        #: Done when the connection is over.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the greeting; start the handshake clock."""
        self._transport = transport
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]
        raw = transport.get_extra_info("socket")
        if raw is not None:
            try:
                # A plain socket object on the same connection: sendmsg without the transport's
                # wrapper (which warns on it).
                self._sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
                self._sock.setblocking(False)
            except OSError:
                self._sock = None
        assert self._handshake is not None
        self._write(self._handshake.greeting())
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client went away: requests in flight still finish (their replies are dropped)."""
        self._lost = True
        self._stopped = True
        if self._sender is not None:
            self._sender.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._maybe_finished()

    def pause_writing(self) -> None:
        """The transport's buffer is full: replies wait."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained."""
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def get_buffer(self, sizehint: int) -> Any:
        """Where received bytes go: a WRITE's payload buffer, or the header buffer."""
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_pos :]
        if self._discard:
            return memoryview(self._buf)[: min(self._discard, len(self._buf))]
        if len(self._buf) - self._end < _HEADER_SIZE * 64:
            # Move what is left to the front (less than one request header, or requests held
            # back while reading is paused).
            left = self._end - self._start
            if left and self._start:
                self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
            if len(self._buf) - self._end < _HEADER_SIZE:
                self._buf.extend(bytes(_BUFFER_SIZE))
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Bytes arrived in the buffer :meth:`get_buffer` gave."""
        if self._payload is not None:
            self._payload_pos += nbytes
            if self._payload_pos == len(self._payload):
                payload, request = self._payload, self._payload_request
                self._payload, self._payload_request = None, None
                assert request is not None
                self._dispatch(request, payload)
                self._parse()
            return
        if self._discard:
            self._discard -= nbytes
            if not self._discard:
                request, self._discard_request = self._discard_request, None
                assert request is not None
                self._oversized(request)
                self._parse()
            return
        self._end += nbytes
        if self._handshake is not None:
            if not self._upgrading:  # else TLS data that may arrive before start_tls returns: kept
                self._handshake_data()
        else:
            self._parse()

    def eof_received(self) -> bool | None:
        """The client shut its side: finish what is in flight, then close."""
        self._stop()
        return not self._tls_active  # TLS transports cannot stay half open

    # --- handshake ----------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self._handshake is not None and not self._lost:
            log.info("%s: handshake not finished in %s s: closing", self.peer, HANDSHAKE_TIMEOUT)
            self._abort()

    def _handshake_data(self) -> None:
        hs = self._handshake
        assert hs is not None
        data = bytes(self._buf[self._start : self._end])
        self._start = self._end = 0
        try:
            events = hs.receive_data(data)
            while events:
                for event in events:
                    if self._answer(hs, event) is not Next.OPTIONS:
                        return
                # The handshake decodes an option only after the previous one's final reply:
                # options the client pipelined come out now.
                events = hs.receive_data(b"")
        except (ProtocolError, ImagoError) as error:
            log.info("%s: handshake failed: %s", self.peer, error)
            self._abort()

    def _answer(self, hs: ServerHandshake, event: object) -> Next:
        """Answer one handshake event; what the connection does next."""
        if isinstance(event, InvalidOptionReceived):
            self._write(hs.reply_error(OptionReply.ERR_INVALID, event.problem))
            return Next.OPTIONS
        if not isinstance(event, OptionReceived):
            return Next.OPTIONS  # the client's flags
        tls_required = self._tls is not None
        answer = answer_option(hs, self.export, event.option, tls_required=tls_required, tls_active=self._tls_active)
        if answer.data:
            self._write(answer.data)
        if answer.next is Next.CLOSE:
            self._close_transport()
        elif answer.next is Next.START_TLS:
            self._start_tls()
        elif answer.next is Next.TRANSMISSION:
            self._enter_transmission()
        return answer.next

    def _start_tls(self) -> None:
        transport = self._transport
        assert isinstance(transport, asyncio.Transport)
        assert self._tls is not None
        transport.pause_reading()
        self._upgrading = True
        task = asyncio.get_running_loop().create_task(self._upgrade(transport, self._tls))
        self._tasks.add(task)
        task.add_done_callback(self._task_done_plain)

    async def _upgrade(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as error:
            log.info("%s: TLS handshake failed: %s", self.peer, error)
            tls_transport = None
        if tls_transport is None:
            transport.abort()
            if not self._lost:  # the TLS layer may not tell this protocol the connection is gone
                self.connection_lost(None)
            return
        self._transport = tls_transport
        self._drop_socket()
        self._tls_active = True
        self._upgrading = False
        assert self._handshake is not None
        self._handshake.tls_established()
        if self._end > self._start:
            self._handshake_data()

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _enter_transmission(self) -> None:
        hs = self._handshake
        assert hs is not None
        self._structured = hs.structured_replies
        self._flags = self.export.transmission_flags(structured=self._structured)
        self._contexts = sorted(hs.meta_contexts.items())
        trailing = hs.trailing_data
        self._handshake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        # With handshake bytes still buffered, the transport keeps writing (in order).
        idle = isinstance(transport, asyncio.WriteTransport) and not transport.get_write_buffer_size()
        if self._sock is not None and idle:
            self._sender = SocketSender(self._sock, on_error=self._sender_failed)
            self._sock = None
        log.info("%s: transmission (structured replies: %s)", self.peer, self._structured)
        if trailing:
            self._buf[: len(trailing)] = trailing
            self._start, self._end = 0, len(trailing)
            self._parse()

    # --- requests -----------------------------------------------------------------------------

    def _parse(self) -> None:
        """Take the complete requests buffered, as long as the in-flight limits allow."""
        buf = self._buf
        pos, end = self._start, self._end
        while (
            not self._stopped
            and end - pos >= _HEADER_SIZE
            and len(self._tasks) < MAX_IN_FLIGHT
            and self._in_flight_bytes < MAX_IN_FLIGHT_BYTES
        ):
            magic, flags, command, cookie, offset, length = _HEADER.unpack_from(buf, pos)
            pos += _HEADER_SIZE
            if magic != REQUEST_MAGIC:
                log.info("%s: request magic %#x is wrong: closing", self.peer, magic)
                self._stopped = True
                self._abort()
                break
            request = Request(command=command, cookie=cookie, offset=offset, length=length, flags=flags)
            if command == _WRITE:
                have = min(end - pos, length)
                if length > MAX_PAYLOAD:
                    pos += have
                    if have < length:
                        self._discard, self._discard_request = length - have, request
                        break
                    self._oversized(request)
                    continue
                payload = self._buffer(length)
                payload[:have] = buf[pos : pos + have]
                pos += have
                if have < length:
                    self._payload, self._payload_pos, self._payload_request = payload, have, request
                    break
                self._dispatch(request, payload)
                continue
            if command == _DISC:
                log.info("%s: disconnect requested", self.peer)
                self._stop()
                break
            self._dispatch(request, None)
        if pos == end:
            pos = end = 0
        self._start, self._end = pos, end
        self._flow()

    def _flow(self) -> None:
        transport = self._transport
        if self._lost or not isinstance(transport, asyncio.Transport):
            return
        full = len(self._tasks) >= MAX_IN_FLIGHT or self._in_flight_bytes >= MAX_IN_FLIGHT_BYTES
        if (full or self._stopped) and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not full and not self._stopped and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _oversized(self, request: Request) -> None:
        error = self._check(request)
        self._reply_error(request, error or Errno.EOVERFLOW, "request too large")

    def _check(self, request: Request) -> int | None:
        return request_error(
            request, export_size=self.export.size, flags=self._flags, meta_contexts=len(self._contexts)
        )

    def _dispatch(self, request: Request, payload: bytearray | None) -> None:
        error = self._check(request)
        if error is None and request.command == _READ and request.length > MAX_PAYLOAD:
            error = Errno.EOVERFLOW
        if error is not None:
            self._reply_error(request, error, "invalid request")
            return
        cost = request.length if request.command in (_READ, _WRITE) else 0
        self._in_flight_bytes += cost
        task = asyncio.get_running_loop().create_task(self._handle(request, payload, cost))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: request failed unexpectedly", self.peer, exc_info=task.exception())
        if self._handshake is None and not self._lost:
            if self._end - self._start >= _HEADER_SIZE and self._payload is None and not self._discard:
                self._parse()
            else:
                self._flow()
        self._maybe_finished()

    def _task_done_plain(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._maybe_finished()

    async def _handle(self, request: Request, payload: bytearray | None, cost: int) -> None:
        export = self.export
        gate = export.gate
        command = request.command
        exclusive = export.discard and (
            command == Command.TRIM or (command == Command.WRITE_ZEROES and not request.flags & _NO_HOLE)
        )
        try:
            if command == Command.WRITE_ZEROES and request.flags & _FAST_ZERO and not export.fast_zero:
                self._reply_error(request, Errno.ENOTSUP, "zeroing would be slow")
                return
            if exclusive:
                await gate.enter_exclusive()
            elif gate.open:
                gate.enter_shared_now()
            else:
                await gate.enter_shared()
            try:
                await self._run(request, payload)
            finally:
                if exclusive:
                    gate.leave_exclusive()
                else:
                    gate.leave_shared()
        except Exception as error:  # every failure becomes the client's error reply
            if not isinstance(error, (ImagoError, OSError)):
                log.error("%s: %s failed", self.peer, _name(command), exc_info=error)
            self._reply_error(request, wire_error(error), _message(error))
        finally:
            self._in_flight_bytes -= cost

    async def _run(self, request: Request, payload: bytearray | None) -> None:
        access = self.export.access
        command = request.command
        if command == _READ:
            await self._read(request)
            return
        if command == _WRITE:
            assert payload is not None
            if payload:
                await access.write(payload, request.offset)
                self._recycle(payload)
                await self._after_write(request)
        elif command == Command.FLUSH:
            await access.flush()
        elif command == Command.TRIM:
            if self.export.discard and request.length:
                await access.discard_to_any(request.offset, request.length)
                await self._after_write(request)
        elif command == Command.WRITE_ZEROES:
            if request.length:
                if self.export.discard and not request.flags & _NO_HOLE:
                    await access.discard_to_zero(request.offset, request.length)
                else:
                    await access.write_zeroes(request.offset, request.length)
                await self._after_write(request)
        elif command == Command.BLOCK_STATUS:
            await self._block_status(request)
            return
        # CACHE: a hint; the page cache keeps what was read anyway.
        await self._send_simple(request.cookie)

    async def _after_write(self, request: Request) -> None:
        if request.flags & _FUA or self.export.writethrough:
            await self.export.access.flush()

    async def _read(self, request: Request) -> None:
        access = self.export.access
        offset, length, cookie = request.offset, request.length, request.cookie
        data = self._buffer(length)
        view = memoryview(data)[:length]
        if not self._structured:
            await access.read(view, offset)
            await self._send([_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), view], data)
            return
        if not length:
            await self._send([none_chunk(cookie)], data)
            return
        if request.flags & _DF:
            await access.read(view, offset)
            await self._send([offset_data_header(cookie, offset, length, done=True), view], data)
            return
        # Runs of data and of zeroes; the zeroes go out as holes.
        runs: list[list[Any]] = []
        position = 0
        while position < length:
            mapping, mapped = await access.get_mapping(offset + position, length - position)
            step = min(mapped, length - position)
            is_data = type(mapping) is MappingRaw or type(mapping) is MappingSpecial
            if runs and runs[-1][2] == is_data:
                runs[-1][1] += step
            else:
                runs.append([position, step, is_data])
            position += step
        parts: list[bytes | memoryview] = []
        last = len(runs) - 1
        for index, (start, step, is_data) in enumerate(runs):
            if is_data:
                part = view[start : start + step]
                await access.read(part, offset + start)
                parts.append(offset_data_header(cookie, offset + start, step, done=index == last))
                parts.append(part)
            else:
                parts.append(offset_hole_chunk(cookie, offset + start, step, done=index == last))
        await self._send(parts, data)

    async def _block_status(self, request: Request) -> None:
        one = bool(request.flags & _REQ_ONE)
        runs = await chain_status(
            self.export.access, request.offset, request.length, max_runs=1 if one else MAX_STATUS_RUNS
        )
        parts = []
        last = len(self._contexts) - 1
        for index, (context_id, name) in enumerate(self._contexts):
            extents = descriptors(runs, depth=name == ALLOCATION_DEPTH, one=one)
            parts.append(block_status_chunk(request.cookie, context_id, extents, done=index == last))
        await self._send(parts)

    # --- replies ------------------------------------------------------------------------------

    async def _send_simple(self, cookie: int) -> None:
        await self._send([_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)])

    def _reply_error(self, request: Request, error: int, message: str) -> None:
        if self._structured and request.command in (_READ, Command.BLOCK_STATUS):
            self._emit([error_chunk(request.cookie, error, message)])
        else:
            self._emit([simple_reply(request.cookie, error)])

    async def _send(self, parts: Sequence[bytes | memoryview], buffer: bytearray | None = None) -> None:
        """Send one reply; *buffer* (from :meth:`_buffer`) is reused once the reply is out."""
        sender = self._sender
        if sender is not None:
            await sender.wait_writable()
            sender.send(parts, None if buffer is None else functools.partial(self._recycle, buffer))
            return
        if self._write_paused and not self._lost:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await self._writable
        self._emit(parts)

    def _emit(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one whole reply at once (never interleaved with another)."""
        if self._sender is not None:
            self._sender.send(parts)
            return
        transport = self._transport
        if self._lost or not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            return
        for part in parts:
            transport.write(part)

    def _sender_failed(self, error: OSError) -> None:
        log.info("%s: sending failed: %s", self.peer, error)
        self._abort()

    def _buffer(self, length: int) -> bytearray:
        return self.export.buffers.take(length)

    def _recycle(self, buffer: bytearray) -> None:
        self.export.buffers.give(buffer)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(data)

    # --- ending -------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Take no more requests; close once those in flight are answered."""
        self._stopped = True
        self._flow()
        self._maybe_finished()

    def shutdown(self) -> None:
        """Server shutdown: take no more requests, answer those in flight, then close."""
        if self._handshake is not None:
            self._close_transport()
            return
        self._stop()

    def abort(self) -> None:
        """Cut the connection off now (replies not yet sent are dropped)."""
        self._abort()

    def _abort(self) -> None:
        self._stopped = True
        transport = self._transport
        if transport is not None and not self._lost:
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:
                transport.close()

    def _close_transport(self) -> None:
        self._stopped = True
        if self._transport is None or self._lost:
            return
        sender = self._sender
        if sender is not None and sender.pending and not sender.broken:
            if self._closer is None:  # close once the replies are out
                self._closer = asyncio.get_running_loop().create_task(self._drain_and_close(sender))
            return
        self._transport.close()

    async def _drain_and_close(self, sender: SocketSender) -> None:
        await sender.drained()
        if self._transport is not None and not self._lost:
            self._transport.close()

    def _maybe_finished(self) -> None:
        if self._tasks:
            return
        if not self._lost:
            if self._stopped and self._handshake is None:
                self._close_transport()
            return
        self._drop_socket()
        if not self.finished.done():
            self.finished.set_result(None)
        if self._on_close is not None and not self._closed_called:
            self._closed_called = True
            self._on_close(self)


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"
