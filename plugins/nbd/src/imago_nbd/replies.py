"""Transmission replies: simple replies and structured reply chunks, their encoders and the client's decoder.

The encoders are what a server sends. ``ReplyDecoder`` is the client's sans-I/O decoder: it is
told each request sent (``request_sent``), takes received bytes in fragments of any size and
returns reply events, checking each reply against its request: the cookie is in flight, the
chunk type fits the command, content lies inside the request and does not overlap, a successful
read is covered completely, block status comes once per selected context.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Sequence

import attrs

from imago import InvalidRequestError

from .buffer import ReceiveBuffer
from .constants import (
    MAX_STRING_LENGTH,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    ReplyFlag,
    ReplyType,
)
from .errors import ProtocolError
from .options import MalformedPayloadError, decode_string, encode_string
from .requests import Request

__all__ = [
    "CHUNK_HEADER",
    "DEFAULT_MAX_DESCRIPTORS",
    "DataHeader",
    "SIMPLE_REPLY_HEADER",
    "BlockStatusChunk",
    "ErrorChunk",
    "NoneChunk",
    "OffsetDataChunk",
    "OffsetHoleChunk",
    "ReplyDecoder",
    "ReplyEvent",
    "SimpleReply",
    "block_status_chunk",
    "error_chunk",
    "none_chunk",
    "offset_data_chunk",
    "offset_data_header",
    "offset_hole_chunk",
    "simple_reply",
]

#: Simple reply: magic, error, cookie.
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, flags, type, cookie, payload length.
CHUNK_HEADER = struct.Struct(">IHHQI")
#: The most descriptors one block-status chunk may carry before the decoder calls it a flood.
DEFAULT_MAX_DESCRIPTORS = 1 << 17

_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_CONTEXT = struct.Struct(">I")
_ERROR = struct.Struct(">IH")
_ERROR_TYPE_BIT = 1 << 15
# Plain ints for the per-chunk checks: an IntFlag operand makes every `&` build an enum member.
_DONE = int(ReplyFlag.DONE)
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
# An unknown error chunk's payload beyond error and message: bounded like an option body.
_MAX_UNKNOWN_ERROR = 64 * 1024


# --- encoders (server) ----------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0, data: bytes | bytearray | memoryview = b"") -> bytes:
    """A simple reply; *data* (a successful READ's payload) follows the 16-byte header."""
    header = SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie)
    return header + bytes(data) if data else header


def _chunk(cookie: int, chunk_type: int, payload_length: int, done: bool) -> bytes:
    flags = _DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, payload_length)


def none_chunk(cookie: int) -> bytes:
    """``NBD_REPLY_TYPE_NONE``: the final chunk of a reply, nothing more to say."""
    return _chunk(cookie, ReplyType.NONE, 0, True)


def offset_data_header(cookie: int, offset: int, length: int, *, done: bool = False) -> bytes:
    """The header and offset of an ``OFFSET_DATA`` chunk whose *length* data bytes the caller sends next."""
    if not 0 < length <= 0xFFFFFFFF - _OFFSET.size:
        raise InvalidRequestError(f"an OFFSET_DATA chunk carries 1 to 2**32-9 bytes, not {length}")
    return _chunk(cookie, ReplyType.OFFSET_DATA, _OFFSET.size + length, done) + _OFFSET.pack(offset)


def offset_data_chunk(cookie: int, offset: int, data: bytes | bytearray | memoryview, *, done: bool = False) -> bytes:
    """An ``OFFSET_DATA`` chunk: *data* read at *offset*."""
    return offset_data_header(cookie, offset, len(data), done=done) + bytes(data)


def offset_hole_chunk(cookie: int, offset: int, length: int, *, done: bool = False) -> bytes:
    """An ``OFFSET_HOLE`` chunk: *length* bytes at *offset* read as zeroes."""
    if not 0 < length <= 0xFFFFFFFF:
        raise InvalidRequestError(f"a hole is 1 to 2**32-1 bytes, not {length}")
    return _chunk(cookie, ReplyType.OFFSET_HOLE, _HOLE.size, done) + _HOLE.pack(offset, length)


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool = False
) -> bytes:
    """A ``BLOCK_STATUS`` chunk: (length, status flags) descriptors for metadata context *context_id*."""
    if not extents:
        raise InvalidRequestError("a block-status chunk has at least one descriptor")
    if any(length <= 0 for length, _ in extents):
        raise InvalidRequestError("block-status descriptors have a non-zero length")
    payload = _CONTEXT.pack(context_id) + struct.pack(f">{2 * len(extents)}I", *(v for e in extents for v in e))
    return _chunk(cookie, ReplyType.BLOCK_STATUS, len(payload), done) + payload


def error_chunk(cookie: int, error: int, message: str = "", *, offset: int | None = None, done: bool = True) -> bytes:
    """An ``ERROR`` chunk, or ``ERROR_OFFSET`` when *offset* is given; *error* is a wire error value."""
    if not error:
        raise InvalidRequestError("an error chunk carries a non-zero error")
    raw = encode_string(message, "error message")
    payload = _ERROR.pack(error, len(raw)) + raw
    chunk_type = ReplyType.ERROR
    if offset is not None:
        payload += _OFFSET.pack(offset)
        chunk_type = ReplyType.ERROR_OFFSET
    return _chunk(cookie, chunk_type, len(payload), done) + payload


# --- events (client) ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SimpleReply:
    """A simple reply: *error* is the wire error value (0: success), *data* a successful READ's payload."""

    cookie: int
    error: int
    data: bytes | None = None
    done: bool = True


@attrs.frozen(kw_only=True)
class NoneChunk:
    """``NBD_REPLY_TYPE_NONE``: the reply is complete."""

    cookie: int
    done: bool = True


@attrs.frozen(kw_only=True)
class OffsetDataChunk:
    """Data of a READ at *offset*."""

    cookie: int
    offset: int
    data: bytes
    done: bool


@attrs.frozen(kw_only=True)
class OffsetHoleChunk:
    """*length* bytes of a READ at *offset* that read as zeroes."""

    cookie: int
    offset: int
    length: int
    done: bool


@attrs.frozen(kw_only=True)
class BlockStatusChunk:
    """Block status for metadata context *context_id*: consecutive (length, flags) extents."""

    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]
    done: bool


@attrs.frozen(kw_only=True)
class ErrorChunk:
    """An error chunk: wire *error*, the server's *message*, the *offset* for ``ERROR_OFFSET``."""

    cookie: int
    error: int
    message: str
    offset: int | None
    done: bool
    chunk_type: int = ReplyType.ERROR


@attrs.frozen(kw_only=True)
class DataHeader:
    """Zero-copy decoding: *length* bytes of READ data for *offset* come next in the stream.

    The I/O layer moves them itself (``take_payload_into`` for what the decoder holds, its own
    ``recv_into`` for the rest, reported by ``payload_received``). *simple* is true for a
    simple reply's payload; *done* whether the reply is complete once the payload is in.
    """

    cookie: int
    offset: int
    length: int
    done: bool
    simple: bool = False


ReplyEvent = SimpleReply | NoneChunk | OffsetDataChunk | OffsetHoleChunk | BlockStatusChunk | ErrorChunk | DataHeader


# --- the decoder (client) -------------------------------------------------------------------


class _InFlight:
    """What the decoder remembers of a request until its reply is complete."""

    __slots__ = ("content_chunks", "contexts", "covered", "errored", "flags", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.flags = int(request.flags)
        self.covered: list[tuple[int, int]] = []  # sorted, non-overlapping [start, end) of content
        self.contexts: set[int] = set()
        self.errored = False
        self.content_chunks = 0

    def cover(self, start: int, end: int) -> str | None:
        """Record content [start, end); a problem when it leaves the request or overlaps earlier content."""
        request = self.request
        if start < request.offset or end > request.offset + request.length:
            return f"content {start}..{end} lies outside the request {request.offset}+{request.length}"
        index = bisect.bisect_left(self.covered, (start, end))
        if index and self.covered[index - 1][1] > start:
            return f"content {start}..{end} overlaps earlier content"
        if index < len(self.covered) and self.covered[index][0] < end:
            return f"content {start}..{end} overlaps earlier content"
        self.covered.insert(index, (start, end))
        self.content_chunks += 1
        return None


class ReplyDecoder:
    """The client's decoder of the server's transmission stream.

    *structured* says whether structured replies were negotiated; *meta_contexts* are the
    context ids SET_META_CONTEXT selected (block status must come once for each);
    *max_descriptors* caps a block-status chunk. With *zero_copy*, READ data is not buffered:
    a :class:`DataHeader` announces it and the caller moves the payload itself, so that it can
    receive it straight into its own buffer (then calls ``receive_data(b"")`` to go on).
    """

    def __init__(
        self,
        *,
        structured: bool,
        meta_contexts: Iterable[int] = (),
        max_descriptors: int = DEFAULT_MAX_DESCRIPTORS,
        zero_copy: bool = False,
    ) -> None:
        self._buffer = ReceiveBuffer()
        self.zero_copy = zero_copy
        #: Zero-copy payload bytes announced by the last :class:`DataHeader` and not moved yet.
        self.payload_left = 0
        # What completes when that payload is in: (header start, request entry, simple reply, done).
        self._payload_end: tuple[int, _InFlight, bool, bool] | None = None
        self.structured = structured
        self.meta_contexts = frozenset(meta_contexts)
        self.max_descriptors = max_descriptors
        #: Requests awaiting (the rest of) their reply, by cookie.
        self.in_flight: dict[int, _InFlight] = {}
        # A header whose payload is awaited: (start, cookie, chunk type or None for simple, flags, length).
        self._header: tuple[int, int, int | None, int, int] | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet decoded into a reply."""
        return len(self._buffer)

    def request_sent(self, request: Request) -> None:
        """Remember *request* (sent, reply awaited). DISC has no reply and is not remembered."""
        if request.command == Command.DISC:
            return
        if request.cookie in self.in_flight:
            raise InvalidRequestError(f"cookie {request.cookie} is already in flight")
        self.in_flight[request.cookie] = _InFlight(request)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ReplyEvent]:
        """Take received bytes; returns the replies and chunks they complete."""
        self._buffer.feed(data)
        events: list[ReplyEvent] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def take_payload_into(self, view: memoryview) -> int:
        """Copy the announced payload the decoder already holds into *view*; returns the byte count."""
        count = min(len(view), self.payload_left, len(self._buffer))
        if count:
            view[:count] = self._buffer.take(count) or b""
            self.payload_received(count, _buffered=True)
        return count

    def payload_received(self, count: int, *, _buffered: bool = False) -> None:
        """Say that *count* bytes of the announced payload were received by the caller itself."""
        if count > self.payload_left or count < 0:
            raise InvalidRequestError(f"{count} payload bytes received, {self.payload_left} announced")
        if self._buffer and not _buffered:
            raise InvalidRequestError("payload received past bytes the decoder holds: take_payload_into first")
        self.payload_left -= count
        if not _buffered:
            self._buffer.position += count
        if self.payload_left == 0 and self._payload_end is not None:
            start, entry, simple, done = self._payload_end
            self._payload_end = None
            if simple:
                del self.in_flight[entry.request.cookie]
            elif done:
                self._complete(start, entry)

    def _violation(self, problem: str, offset: int) -> ProtocolError:
        return ProtocolError(problem, offset=offset, sender="server")

    def _next(self) -> ReplyEvent | None:
        buffer = self._buffer
        if self.payload_left:
            return None  # the caller moves the announced payload first
        if self._header is None:
            start = buffer.position
            peeked = buffer.peek_unpack(_CONTEXT)
            if peeked is None:
                return None
            magic = peeked[0]
            if magic == SIMPLE_REPLY_MAGIC:
                simple = buffer.unpack(SIMPLE_REPLY_HEADER)
                if simple is None:
                    return None
                _, error, cookie = simple
                # For a simple reply the flags slot holds the error value.
                self._header = (start, cookie, None, error, self._simple_length(start, cookie, error))
            elif magic == STRUCTURED_REPLY_MAGIC:
                header = buffer.unpack(CHUNK_HEADER)
                if header is None:
                    return None
                _, flags, chunk_type, cookie, length = header
                self._check_chunk_header(start, cookie, chunk_type, flags, length)
                self._header = (start, cookie, chunk_type, flags, length)
            else:
                raise self._violation(f"reply magic {magic:#010x} is wrong", start)
        start, cookie, chunk_type, flags, length = self._header
        if self.zero_copy and (chunk_type == _OFFSET_DATA or (chunk_type is None and length)):
            return self._data_header(start, cookie, chunk_type, flags, length)
        if len(buffer) < length:
            return None
        self._header = None
        if chunk_type == _OFFSET_DATA:
            # The hot path: the offset decoded in place, the data copied once.
            (offset,) = buffer.unpack(_OFFSET) or (0,)  # both present: the length was checked
            data = buffer.take(length - _OFFSET.size) or b""
            entry = self.in_flight[cookie]
            self._cover(start, entry, offset, len(data))
            done = bool(flags & _DONE)
            event = OffsetDataChunk(cookie=cookie, offset=offset, data=data, done=done)
            if done:
                self._complete(start, entry)
            return event
        payload = buffer.take(length) or b""
        if chunk_type is None:
            entry = self.in_flight.pop(cookie)
            read_data = payload if entry.request.command == Command.READ and not flags else None
            return SimpleReply(cookie=cookie, error=flags, data=read_data)
        try:
            return self._chunk(start, cookie, chunk_type, bool(flags & _DONE), payload)
        except MalformedPayloadError as error:
            raise self._violation(str(error), start) from None

    def _data_header(
        self, start: int, cookie: int, chunk_type: int | None, flags: int, length: int
    ) -> DataHeader | None:
        """Announce READ data instead of buffering it (zero-copy decoding)."""
        entry = self.in_flight[cookie]
        if chunk_type is None:  # a simple reply's payload: the whole request
            self._header = None
            self.payload_left = length
            self._payload_end = (start, entry, True, True)
            return DataHeader(cookie=cookie, offset=entry.request.offset, length=length, done=True, simple=True)
        fields = self._buffer.unpack(_OFFSET)
        if fields is None:
            return None
        self._header = None
        (offset,) = fields
        data_length = length - _OFFSET.size
        self._cover(start, entry, offset, data_length)
        done = bool(flags & _DONE)
        self.payload_left = data_length
        self._payload_end = (start, entry, False, done)
        return DataHeader(cookie=cookie, offset=offset, length=data_length, done=done)

    def _request(self, start: int, cookie: int) -> _InFlight:
        entry = self.in_flight.get(cookie)
        if entry is None:
            raise self._violation(f"reply to cookie {cookie:#x}, which no request in flight has", start)
        return entry

    def _simple_length(self, start: int, cookie: int, error: int) -> int:
        """The payload length of a simple reply: a successful READ's data, nothing otherwise."""
        request = self._request(start, cookie).request
        if request.command != Command.READ:
            return 0
        if self.structured:
            raise self._violation("a simple reply to READ after structured replies were negotiated", start)
        return 0 if error else request.length

    def _check_chunk_header(self, start: int, cookie: int, chunk_type: int, flags: int, length: int) -> None:
        """Reject a chunk the header already shows to be wrong, before its payload is buffered."""
        if not self.structured:
            raise self._violation("a structured reply chunk without structured replies negotiated", start)
        entry = self._request(start, cookie)
        command = entry.request.command
        problem = None
        if chunk_type == ReplyType.NONE:
            if length:
                problem = f"NONE chunk with {length} bytes of payload"
            elif not flags & _DONE:
                problem = "NONE chunk without the DONE flag"
        elif chunk_type in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if command != Command.READ:
                problem = f"{ReplyType(chunk_type).name} chunk in the reply to {_name(command)}"
            elif chunk_type == ReplyType.OFFSET_HOLE and length != _HOLE.size:
                problem = f"OFFSET_HOLE chunk of {length} bytes, not {_HOLE.size}"
            elif (
                chunk_type == ReplyType.OFFSET_DATA and not _OFFSET.size < length <= _OFFSET.size + entry.request.length
            ):
                problem = f"OFFSET_DATA chunk of {length} bytes for a read of {entry.request.length}"
            elif entry.flags & _DF and entry.content_chunks:
                problem = "a second content chunk in the reply to a READ with DF"
        elif chunk_type == ReplyType.BLOCK_STATUS:
            count, rest = divmod(length - _CONTEXT.size, 8)
            if command != Command.BLOCK_STATUS:
                problem = f"BLOCK_STATUS chunk in the reply to {_name(command)}"
            elif length < _CONTEXT.size + 8 or rest:
                problem = f"BLOCK_STATUS chunk of {length} bytes is not 4 + a positive multiple of 8"
            elif count > self.max_descriptors:
                problem = f"BLOCK_STATUS chunk with {count} descriptors exceeds the limit {self.max_descriptors}"
            elif entry.flags & _REQ_ONE and count != 1:
                problem = f"BLOCK_STATUS chunk with {count} descriptors in reply to REQ_ONE"
        elif chunk_type & _ERROR_TYPE_BIT:
            minimum = _ERROR.size + (_OFFSET.size if chunk_type == ReplyType.ERROR_OFFSET else 0)
            maximum = minimum + MAX_STRING_LENGTH if chunk_type in ReplyType._value2member_map_ else _MAX_UNKNOWN_ERROR
            if not minimum <= length <= maximum:
                problem = f"error chunk type {chunk_type:#x} of {length} bytes (expected {minimum} to {maximum})"
        else:
            problem = f"unknown chunk type {chunk_type}"
        if problem is not None:
            raise self._violation(problem, start)

    def _chunk(self, start: int, cookie: int, chunk_type: int, done: bool, payload: bytes) -> ReplyEvent:
        entry = self.in_flight[cookie]
        request = entry.request
        event: ReplyEvent
        if chunk_type == ReplyType.NONE:
            event = NoneChunk(cookie=cookie)
        elif chunk_type == ReplyType.OFFSET_HOLE:
            offset, length = _HOLE.unpack(payload)
            if not length:
                raise MalformedPayloadError("OFFSET_HOLE of length 0")
            self._cover(start, entry, offset, length)
            event = OffsetHoleChunk(cookie=cookie, offset=offset, length=length, done=done)
        elif chunk_type == ReplyType.BLOCK_STATUS:
            (context_id,) = _CONTEXT.unpack_from(payload)
            values = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
            extents = tuple(zip(values[0::2], values[1::2], strict=True))
            if self.meta_contexts and context_id not in self.meta_contexts:
                raise MalformedPayloadError(f"block status for context {context_id}, which was not selected")
            if context_id in entry.contexts:
                raise MalformedPayloadError(f"block status for context {context_id} twice in one reply")
            if any(length == 0 for length, _ in extents):
                raise MalformedPayloadError("block-status descriptor of length 0")
            if entry.flags & _REQ_ONE and extents[0][0] > request.length:
                raise MalformedPayloadError("REQ_ONE descriptor longer than the request")
            entry.contexts.add(context_id)
            event = BlockStatusChunk(cookie=cookie, context_id=context_id, extents=extents, done=done)
        else:
            error, message_length = _ERROR.unpack_from(payload)
            if not error:
                raise MalformedPayloadError("error chunk with error value 0")
            known = chunk_type in ReplyType._value2member_map_
            tail = _OFFSET.size if chunk_type == ReplyType.ERROR_OFFSET else 0
            if _ERROR.size + message_length + tail > len(payload) or (
                known and _ERROR.size + message_length + tail != len(payload)
            ):
                raise MalformedPayloadError(
                    f"error message length {message_length} does not fit a {len(payload)}-byte chunk"
                )
            message = decode_string(payload[_ERROR.size : _ERROR.size + message_length], "error message")
            offset = None
            if chunk_type == ReplyType.ERROR_OFFSET:
                (offset,) = _OFFSET.unpack_from(payload, _ERROR.size + message_length)
                if not request.offset <= offset < request.offset + max(request.length, 1):
                    raise MalformedPayloadError(f"error offset {offset} lies outside the request")
            entry.errored = True
            event = ErrorChunk(
                cookie=cookie, error=error, message=message, offset=offset, done=done, chunk_type=chunk_type
            )
        if done:
            self._complete(start, entry)
        return event

    def _cover(self, start: int, entry: _InFlight, offset: int, length: int) -> None:
        problem = entry.cover(offset, offset + length)
        if problem is not None:
            raise self._violation(problem, start)

    def _complete(self, start: int, entry: _InFlight) -> None:
        """The DONE chunk arrived: a successful reply must have said everything."""
        request = entry.request
        del self.in_flight[request.cookie]
        if entry.errored:
            return
        if request.command == Command.READ:
            covered = sum(end - begin for begin, end in entry.covered)
            if covered != request.length:
                raise self._violation(f"READ reported done with {covered} of {request.length} bytes", start)
        elif request.command == Command.BLOCK_STATUS:
            missing = self.meta_contexts - entry.contexts if self.meta_contexts else set()
            if missing or not entry.contexts:
                raise self._violation(f"BLOCK_STATUS done without status for contexts {sorted(missing)}", start)


def _name(command: int) -> str:
    return Command(command).name if command in Command._value2member_map_ else f"command {command}"
