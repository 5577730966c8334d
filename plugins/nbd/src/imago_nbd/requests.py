"""Transmission requests: the 28-byte request, its command flags, the server's decoder and checks.

``encode_request`` builds what a client sends; ``RequestDecoder`` is the server's sans-I/O
decoder (bytes in, :class:`RequestReceived` events out, WRITE payloads bounded by the server's
maximum); ``request_error`` applies the protocol's rules to a decoded request and names the
error value the server answers with (``None``: the request is valid).
"""

from __future__ import annotations

import struct

import attrs

from imago import InvalidRequestError

from .block_size import BlockSize
from .buffer import ReceiveBuffer
from .constants import REQUEST_MAGIC, Command, CommandFlag, Errno, TransmissionFlag
from .errors import ProtocolError

__all__ = [
    "ALLOWED_FLAGS",
    "DEFAULT_MAX_PAYLOAD",
    "REQUEST_HEADER",
    "OversizedRequest",
    "Request",
    "RequestDecoder",
    "RequestEvent",
    "RequestReceived",
    "encode_request",
    "request_error",
]

#: The request header: magic, command flags, type, cookie, offset, length.
REQUEST_HEADER = struct.Struct(">IHHQQI")
#: The largest WRITE payload a server decoder buffers by default (the protocol's 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024

_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

#: The command flags each command accepts (FUA is valid on every command, per the protocol).
ALLOWED_FLAGS: dict[int, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.DISC: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}

# Commands that write, and those whose length is a payload size bounded by the maximum block size.
_WRITES = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_BOUNDED = frozenset({Command.READ, Command.WRITE, Command.CACHE, Command.WRITE_ZEROES})
# The transmission flag a command needs.
_NEEDS_FLAG = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
# The transmission flag a command flag needs.
_FLAG_NEEDS = {
    CommandFlag.FUA: TransmissionFlag.SEND_FUA,
    CommandFlag.DF: TransmissionFlag.SEND_DF,
    CommandFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}


# Converters run for every request: enum construction is slow, so known values are looked up.
_COMMANDS: dict[int, int] = {int(command): command for command in Command}
_FLAG_VALUES: dict[int, CommandFlag] = {}


def _command(value: int) -> int:
    return _COMMANDS.get(value, value)


def _command_flags(value: int) -> CommandFlag:
    flags = _FLAG_VALUES.get(value)
    if flags is None:
        flags = CommandFlag(value)
        if len(_FLAG_VALUES) < 256:  # bounded: a peer's random flags must not grow it
            _FLAG_VALUES[int(value)] = flags
    return flags


@attrs.frozen(kw_only=True)
class Request:
    """One transmission request; *command* is a :class:`Command` when known, else the raw number."""

    command: int = attrs.field(converter=_command)
    cookie: int
    offset: int = 0
    length: int = 0
    flags: CommandFlag = attrs.field(default=CommandFlag(0), converter=_command_flags)

    def header(self) -> bytes:
        """The 28-byte request header."""
        return REQUEST_HEADER.pack(REQUEST_MAGIC, self.flags, self.command, self.cookie, self.offset, self.length)


def encode_request(request: Request, data: bytes | bytearray | memoryview | None = None) -> bytes:
    """The bytes of *request* (with *data*, the WRITE payload, appended).

    Refuses (``InvalidRequestError``) what no server may be sent: flags the command does not
    take, fields out of range, a WRITE whose data does not match its length, offset or length
    on DISC/FLUSH.
    """
    command = request.command
    allowed = ALLOWED_FLAGS.get(command)
    if allowed is None:
        raise InvalidRequestError(f"unknown NBD command {command}")
    bad = int(request.flags) & ~int(allowed)  # ints: an IntFlag's complement drops unknown bits
    if bad:
        raise InvalidRequestError(f"command flags {bad:#x} are not valid on {Command(command).name}")
    if not 0 <= request.offset <= _U64_MAX or not 0 <= request.length <= _U32_MAX:
        raise InvalidRequestError(f"offset {request.offset} or length {request.length} out of range")
    if not 0 <= request.cookie <= _U64_MAX:
        raise InvalidRequestError(f"cookie {request.cookie} is not a 64-bit number")
    if command in (Command.DISC, Command.FLUSH) and (request.offset or request.length):
        raise InvalidRequestError(f"{Command(command).name} takes offset and length 0")
    header = request.header()
    if command == Command.WRITE:
        if data is None or len(data) != request.length:
            raise InvalidRequestError(f"WRITE of {request.length} bytes needs exactly that much data")
        return header + bytes(data)
    if data is not None:
        raise InvalidRequestError(f"{Command(command).name} carries no data")
    return header


def request_error(
    request: Request,
    *,
    export_size: int,
    flags: TransmissionFlag,
    block_size: BlockSize | None = None,
    meta_contexts: int = 0,
) -> Errno | None:
    """The error value a server answers *request* with under the protocol's rules, or ``None``.

    *flags* are the export's transmission flags, *block_size* the constraints the server
    advertised, *meta_contexts* how many metadata contexts the client selected.
    """
    command = request.command
    allowed = ALLOWED_FLAGS.get(command)
    if allowed is None or int(request.flags) & ~int(allowed):
        return Errno.EINVAL
    for flag, needed in _FLAG_NEEDS.items():
        if request.flags & flag and not flags & needed:
            return Errno.EINVAL
    command_needs = _NEEDS_FLAG.get(Command(command))
    if command_needs is not None and not flags & command_needs:
        return Errno.EINVAL
    if command in (Command.DISC, Command.FLUSH):
        return Errno.EINVAL if request.offset or request.length else None
    if command == Command.BLOCK_STATUS and not meta_contexts:
        return Errno.EINVAL
    if command in _WRITES and flags & TransmissionFlag.READ_ONLY:
        return Errno.EPERM
    if request.offset + request.length > export_size:
        return Errno.ENOSPC if command in _WRITES else Errno.EINVAL
    if block_size is not None:
        if not block_size.is_aligned(request.offset, request.length):
            return Errno.EINVAL
        fast_zero = command == Command.WRITE_ZEROES and request.flags & CommandFlag.FAST_ZERO
        if command in _BOUNDED and not fast_zero and request.length > block_size.maximum:
            return Errno.EINVAL
    return None


@attrs.frozen(kw_only=True)
class RequestReceived:
    """A request arrived; *data* is a WRITE's payload (``None`` for other commands)."""

    request: Request
    data: bytes | None = None


@attrs.frozen(kw_only=True)
class OversizedRequest:
    """A WRITE larger than the decoder's maximum arrived; its payload was read and dropped.

    The server answers it with an error (``EINVAL`` or ``EOVERFLOW``) and goes on.
    """

    request: Request


RequestEvent = RequestReceived | OversizedRequest


class RequestDecoder:
    """The server's decoder of the client's transmission stream.

    A WRITE's payload is buffered up to *max_payload* bytes; a longer one is read and dropped
    as it arrives (never buffered) and reported as :class:`OversizedRequest`. After DISC the
    decoder ignores what follows (the client must send nothing more).
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._buffer = ReceiveBuffer()
        self.max_payload = max_payload
        self._write: Request | None = None  # a WRITE whose payload is awaited
        self._discard = 0  # payload bytes of an oversized WRITE still to drop
        #: Whether DISC arrived.
        self.disconnected = False

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet decoded into a request."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[RequestEvent]:
        """Take received bytes; returns the requests they complete."""
        if self.disconnected:
            return []
        buffer = self._buffer
        if self._discard:
            # Drop what an oversized WRITE still owes without buffering it.
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            buffer.position += dropped
            data = memoryview(data)[dropped:]
            if not self._discard:
                assert self._write is not None
                request, self._write = self._write, None
                buffer.feed(data)
                return [OversizedRequest(request=request), *self._decode()]
            return []
        buffer.feed(data)
        return self._decode()

    def _decode(self) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        buffer = self._buffer
        while not self.disconnected:
            if self._write is not None:
                payload = buffer.take(self._write.length)
                if payload is None:
                    break
                events.append(RequestReceived(request=self._write, data=payload))
                self._write = None
                continue
            start = buffer.position
            header = buffer.unpack(REQUEST_HEADER)
            if header is None:
                break
            magic, flags, command, cookie, offset, length = header
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request magic {magic:#010x} is wrong", offset=start, sender="client")
            request = Request(command=command, cookie=cookie, offset=offset, length=length, flags=flags)
            if command == _WRITE:
                if length > self.max_payload:
                    self._write = request
                    self._discard = length - buffer.skip(length)
                    if self._discard:
                        break
                    self._write = None
                    events.append(OversizedRequest(request=request))
                else:
                    self._write = request
                continue
            if command == _DISC:
                self.disconnected = True
                buffer.skip(len(buffer))
            events.append(RequestReceived(request=request))
        return events
