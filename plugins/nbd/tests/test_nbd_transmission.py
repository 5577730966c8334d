"""Transmission: requests and replies byte-exact against doc/proto.md's layouts ("Request message",
"Simple reply message", "Structured reply chunk message", "Structured reply types"), the decoders
fed in arbitrary fragments, round trips, the protocol's request rules, malformed input."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imago import InvalidRequestError
from imago_nbd import (
    BlockSize,
    BlockStatusChunk,
    Command,
    CommandFlag,
    Errno,
    ErrorChunk,
    NoneChunk,
    OffsetDataChunk,
    OffsetHoleChunk,
    OversizedRequest,
    ProtocolError,
    ReplyDecoder,
    ReplyType,
    Request,
    RequestDecoder,
    RequestReceived,
    SimpleReply,
    TransmissionFlag,
    block_status_chunk,
    encode_request,
    error_chunk,
    none_chunk,
    offset_data_chunk,
    offset_data_header,
    offset_hole_chunk,
    request_error,
    simple_reply,
)

from . import _wire

REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF


def request_bytes(flags: int, command: int, cookie: int, offset: int, length: int) -> bytes:
    # "Request message": magic, 16-bit flags, 16-bit type, 64-bit cookie, 64-bit offset, 32-bit length.
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)


def chunk_bytes(flags: int, chunk_type: int, cookie: int, payload: bytes) -> bytes:
    # "Structured reply chunk message": magic, 16-bit flags, 16-bit type, cookie, 32-bit length, payload.
    return struct.pack(">IHHQI", CHUNK_MAGIC, flags, chunk_type, cookie, len(payload)) + payload


# --- requests -----------------------------------------------------------------------------------

REQUESTS = [
    pytest.param(Request(command=Command.READ, cookie=1, offset=4096, length=512, flags=CommandFlag.DF), id="READ"),
    pytest.param(Request(command=Command.WRITE, cookie=2, offset=0, length=4, flags=CommandFlag.FUA), id="WRITE"),
    pytest.param(Request(command=Command.DISC, cookie=3), id="DISC"),
    pytest.param(Request(command=Command.FLUSH, cookie=4), id="FLUSH"),
    pytest.param(Request(command=Command.TRIM, cookie=5, offset=1 << 40, length=1 << 31), id="TRIM"),
    pytest.param(Request(command=Command.CACHE, cookie=6, offset=512, length=512), id="CACHE"),
    pytest.param(
        Request(
            command=Command.WRITE_ZEROES,
            cookie=7,
            offset=0,
            length=1 << 20,
            flags=CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO | CommandFlag.FUA,
        ),
        id="WRITE_ZEROES",
    ),
    pytest.param(
        Request(command=Command.BLOCK_STATUS, cookie=2**64 - 1, length=1 << 30, flags=CommandFlag.REQ_ONE),
        id="BLOCK_STATUS",
    ),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_request_byte_exact_and_decoded(request_: Request) -> None:
    data = b"abcd" if request_.command == Command.WRITE else None
    encoded = encode_request(request_, data)
    expected = request_bytes(request_.flags, request_.command, request_.cookie, request_.offset, request_.length)
    assert encoded == expected + (data or b"")
    decoder = RequestDecoder()
    assert _wire.bytewise(decoder.receive_data, encoded) == [RequestReceived(request=request_, data=data)]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("request_", "data", "problem"),
    [
        (Request(command=Command.READ, cookie=1, length=1, flags=CommandFlag.NO_HOLE), None, "not valid on READ"),
        (Request(command=Command.WRITE, cookie=1, length=1, flags=CommandFlag.DF), b"x", "not valid on WRITE"),
        (Request(command=Command.TRIM, cookie=1, length=1, flags=CommandFlag.REQ_ONE), None, "not valid on TRIM"),
        (Request(command=Command.BLOCK_STATUS, cookie=1, length=1, flags=CommandFlag.FAST_ZERO), None, "not valid"),
        (Request(command=Command.CACHE, cookie=1, length=1, flags=0x40), None, "0x40"),
        (Request(command=Command.WRITE, cookie=1, length=2), b"x", "exactly"),
        (Request(command=Command.WRITE, cookie=1, length=2), None, "exactly"),
        (Request(command=Command.READ, cookie=1, length=2), b"xx", "carries no data"),
        (Request(command=Command.FLUSH, cookie=1, offset=1), None, "offset and length 0"),
        (Request(command=Command.DISC, cookie=1, length=1), None, "offset and length 0"),
        (Request(command=99, cookie=1), None, "unknown NBD command"),
        (Request(command=Command.READ, cookie=1, length=1 << 32), None, "out of range"),
        (Request(command=Command.READ, cookie=1 << 64, length=1), None, "cookie"),
    ],
)
def test_encode_request_refuses_invalid_requests(request_: Request, data: bytes | None, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        encode_request(request_, data)


def test_request_decoder_bounds_write_payloads() -> None:
    decoder = RequestDecoder(max_payload=4096)
    big = Request(command=Command.WRITE, cookie=9, offset=0, length=1 << 20)
    after = Request(command=Command.FLUSH, cookie=10)
    stream = big.header() + bytes(1 << 20) + after.header()
    events = []
    most_held = 0
    for start in range(0, len(stream), 1000):
        events += decoder.receive_data(stream[start : start + 1000])
        most_held = max(most_held, decoder.buffered)
    assert events == [OversizedRequest(request=big), RequestReceived(request=after)]
    assert most_held < 1000 + 28  # the payload was dropped as it came, never held
    fitting = Request(command=Command.WRITE, cookie=11, length=4096)
    assert decoder.receive_data(fitting.header() + bytes(4096)) == [RequestReceived(request=fitting, data=bytes(4096))]


def test_request_decoder_oversized_write_in_one_piece() -> None:
    decoder = RequestDecoder(max_payload=8)
    big = Request(command=Command.WRITE, cookie=1, length=100)
    read = Request(command=Command.READ, cookie=2, length=100)
    assert decoder.receive_data(big.header() + bytes(100) + read.header()) == [
        OversizedRequest(request=big),
        RequestReceived(request=read),
    ]


def test_request_decoder_rejects_bad_magic() -> None:
    decoder = RequestDecoder()
    good = Request(command=Command.READ, cookie=1, length=1).header()
    with pytest.raises(ProtocolError, match="request magic") as caught:
        decoder.receive_data(good + b"\x25\x60\x95\x14" + good[4:])
    assert caught.value.offset == 28
    assert caught.value.sender == "client"


def test_request_decoder_stops_at_disc() -> None:
    decoder = RequestDecoder()
    disc = Request(command=Command.DISC, cookie=1)
    assert decoder.receive_data(disc.header() + b"garbage") == [RequestReceived(request=disc)]
    assert decoder.disconnected
    assert decoder.receive_data(b"more") == []


def test_unknown_command_is_reported_for_an_einval() -> None:
    decoder = RequestDecoder()
    (event,) = decoder.receive_data(request_bytes(0, 42, 5, 0, 0))
    assert isinstance(event, RequestReceived)
    assert event.request.command == 42
    assert request_error(event.request, export_size=1 << 20, flags=TransmissionFlag.HAS_FLAGS) is Errno.EINVAL


ALL_FLAGS = TransmissionFlag(0xFFF) & ~TransmissionFlag.READ_ONLY
SIZE = 1 << 20


@pytest.mark.parametrize(
    ("request_", "flags", "block_size", "contexts", "expected"),
    [
        (Request(command=Command.READ, cookie=1, length=512), ALL_FLAGS, None, 0, None),
        (Request(command=Command.READ, cookie=1, offset=SIZE, length=1), ALL_FLAGS, None, 0, Errno.EINVAL),
        (Request(command=Command.WRITE, cookie=1, offset=SIZE - 1, length=2), ALL_FLAGS, None, 0, Errno.ENOSPC),
        (Request(command=Command.WRITE, cookie=1, length=2), ALL_FLAGS | TransmissionFlag.READ_ONLY, None, 0, 1),
        (Request(command=Command.TRIM, cookie=1, length=2), TransmissionFlag.HAS_FLAGS, None, 0, Errno.EINVAL),
        (Request(command=Command.FLUSH, cookie=1), TransmissionFlag.HAS_FLAGS, None, 0, Errno.EINVAL),
        (Request(command=Command.FLUSH, cookie=1, length=1), ALL_FLAGS, None, 0, Errno.EINVAL),
        (Request(command=Command.FLUSH, cookie=1), ALL_FLAGS, None, 0, None),
        (Request(command=Command.WRITE, cookie=1, length=2, flags=CommandFlag.FUA), TransmissionFlag(1), None, 0, 22),
        (Request(command=Command.READ, cookie=1, length=2, flags=CommandFlag.DF), TransmissionFlag(1), None, 0, 22),
        (Request(command=Command.READ, cookie=1, length=2, flags=CommandFlag.NO_HOLE), ALL_FLAGS, None, 0, 22),
        (Request(command=Command.READ, cookie=1, length=2, flags=1 << 9), ALL_FLAGS, None, 0, 22),
        (
            Request(command=Command.WRITE_ZEROES, cookie=1, length=2, flags=CommandFlag.FAST_ZERO),
            ALL_FLAGS & ~TransmissionFlag.SEND_FAST_ZERO,
            None,
            0,
            Errno.EINVAL,
        ),
        (Request(command=Command.BLOCK_STATUS, cookie=1, length=2), ALL_FLAGS, None, 0, Errno.EINVAL),
        (Request(command=Command.BLOCK_STATUS, cookie=1, length=2), ALL_FLAGS, None, 1, None),
        (Request(command=Command.READ, cookie=1, offset=100, length=512), ALL_FLAGS, _wire.BLOCK_SIZE, 0, 22),
        (
            Request(command=Command.READ, cookie=1, length=1 << 16),
            ALL_FLAGS,
            BlockSize(minimum=512, preferred=4096, maximum=4096),
            0,
            22,
        ),
        (
            Request(command=Command.WRITE_ZEROES, cookie=1, length=1 << 16, flags=CommandFlag.FAST_ZERO),
            ALL_FLAGS,
            BlockSize(minimum=512, preferred=4096, maximum=4096),
            0,
            None,
        ),
        (
            Request(command=Command.TRIM, cookie=1, length=1 << 16),
            ALL_FLAGS,
            BlockSize(minimum=512, preferred=4096, maximum=4096),
            0,
            None,
        ),
    ],
)
def test_request_rules(
    request_: Request, flags: TransmissionFlag, block_size: BlockSize | None, contexts: int, expected: int | None
) -> None:
    error = request_error(request_, export_size=SIZE, flags=flags, block_size=block_size, meta_contexts=contexts)
    assert error == expected


# --- reply encoders -----------------------------------------------------------------------------


def test_reply_encodings_byte_exact() -> None:
    # "Simple reply message": magic, 32-bit error, 64-bit cookie, then a READ's data.
    assert simple_reply(7, 0, b"data") == struct.pack(">IIQ4s", SIMPLE_MAGIC, 0, 7, b"data")
    assert simple_reply(7, Errno.EIO) == struct.pack(">IIQ", SIMPLE_MAGIC, 5, 7)
    # "NBD_REPLY_TYPE_NONE": no payload, always DONE.
    assert none_chunk(3) == chunk_bytes(1, 0, 3, b"")
    # "NBD_REPLY_TYPE_OFFSET_DATA": 64-bit offset, data.
    assert offset_data_chunk(3, 512, b"xyz", done=True) == chunk_bytes(1, 1, 3, struct.pack(">Q3s", 512, b"xyz"))
    assert offset_data_header(3, 512, 3) == chunk_bytes(0, 1, 3, struct.pack(">Q3s", 512, b"xyz"))[:-3]
    # "NBD_REPLY_TYPE_OFFSET_HOLE": 64-bit offset, 32-bit hole size.
    assert offset_hole_chunk(3, 1024, 4096) == chunk_bytes(0, 2, 3, struct.pack(">QI", 1024, 4096))
    # "NBD_REPLY_TYPE_BLOCK_STATUS": 32-bit context id, then (32-bit length, 32-bit flags) descriptors.
    extents = [(4096, 3), (8192, 0)]
    assert block_status_chunk(3, 1, extents, done=True) == chunk_bytes(
        1, 5, 3, struct.pack(">IIIII", 1, 4096, 3, 8192, 0)
    )
    # "NBD_REPLY_TYPE_ERROR": 32-bit error, 16-bit message length, message.
    assert error_chunk(3, Errno.EPERM, "ro") == chunk_bytes(1, 2**15 + 1, 3, struct.pack(">IH2s", 1, 2, b"ro"))
    # "NBD_REPLY_TYPE_ERROR_OFFSET": as ERROR, then the 64-bit offset.
    assert error_chunk(3, Errno.EIO, "", offset=99, done=False) == chunk_bytes(
        0, 2**15 + 2, 3, struct.pack(">IHQ", 5, 0, 99)
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: offset_data_header(1, 0, 0),
        lambda: offset_hole_chunk(1, 0, 0),
        lambda: block_status_chunk(1, 1, []),
        lambda: block_status_chunk(1, 1, [(0, 0)]),
        lambda: error_chunk(1, 0),
    ],
)
def test_reply_encoders_refuse_what_the_protocol_forbids(call: object) -> None:
    with pytest.raises(InvalidRequestError):
        call()  # type: ignore[operator]


# --- the reply decoder --------------------------------------------------------------------------


def decoder_for(*requests: Request, structured: bool = True, contexts: tuple[int, ...] = (1,)) -> ReplyDecoder:
    decoder = ReplyDecoder(structured=structured, meta_contexts=contexts)
    for request in requests:
        decoder.request_sent(request)
    return decoder


READ = Request(command=Command.READ, cookie=1, offset=1000, length=10)
WRITE = Request(command=Command.WRITE, cookie=2, offset=0, length=4)
STATUS = Request(command=Command.BLOCK_STATUS, cookie=3, offset=0, length=8192)


def test_simple_replies() -> None:
    decoder = decoder_for(READ, WRITE, Request(command=Command.READ, cookie=4, length=3), structured=False)
    stream = simple_reply(2, 0) + simple_reply(1, 0, b"0123456789") + simple_reply(4, Errno.EIO)
    assert _wire.bytewise(decoder.receive_data, stream) == [
        SimpleReply(cookie=2, error=0),
        SimpleReply(cookie=1, error=0, data=b"0123456789"),
        SimpleReply(cookie=4, error=Errno.EIO),  # an error carries no data
    ]
    assert decoder.in_flight == {}


def test_structured_read_assembled_from_chunks() -> None:
    decoder = decoder_for(READ, WRITE)
    stream = (
        offset_hole_chunk(1, 1004, 6)
        + simple_reply(2, 0)  # interleaved with another request's reply
        + offset_data_chunk(1, 1000, b"abcd")
        + none_chunk(1)
    )
    assert _wire.bytewise(decoder.receive_data, stream) == [
        OffsetHoleChunk(cookie=1, offset=1004, length=6, done=False),
        SimpleReply(cookie=2, error=0),
        OffsetDataChunk(cookie=1, offset=1000, data=b"abcd", done=False),
        NoneChunk(cookie=1),
    ]
    assert decoder.in_flight == {}


def test_structured_block_status_and_errors() -> None:
    decoder = decoder_for(STATUS, WRITE, contexts=(1, 2))
    stream = (
        block_status_chunk(3, 2, [(4096, 0)])
        + block_status_chunk(3, 1, [(4096, 3), (4096, 0)], done=True)
        + error_chunk(2, Errno.ENOSPC, "full", offset=2, done=True)
    )
    assert decoder.receive_data(stream) == [
        BlockStatusChunk(cookie=3, context_id=2, extents=((4096, 0),), done=False),
        BlockStatusChunk(cookie=3, context_id=1, extents=((4096, 3), (4096, 0)), done=True),
        ErrorChunk(
            cookie=2, error=Errno.ENOSPC, message="full", offset=2, done=True, chunk_type=ReplyType.ERROR_OFFSET
        ),
    ]


def test_unknown_error_chunk_types_are_errors() -> None:
    decoder = decoder_for(WRITE)
    payload = struct.pack(">IH3s", 5, 3, b"odd") + b"extra fields"
    (event,) = decoder.receive_data(chunk_bytes(1, 0x8000 + 77, 2, payload))
    assert event == ErrorChunk(cookie=2, error=5, message="odd", offset=None, done=True, chunk_type=0x8000 + 77)


def test_read_error_ends_without_full_coverage() -> None:
    decoder = decoder_for(READ)
    stream = offset_data_chunk(1, 1000, b"ab") + error_chunk(1, Errno.EIO, "bad sector", offset=1002)
    events = decoder.receive_data(stream)
    assert [type(event) for event in events] == [OffsetDataChunk, ErrorChunk]
    assert decoder.in_flight == {}


# random replies to random requests, split anywhere


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Request], bytes, list[object]]:
    """Requests, the server's replies to them (interleaved), and the events they decode to."""
    count = draw(st.integers(1, 6))
    requests: list[Request] = []
    replies: list[list[tuple[bytes, object]]] = []
    for cookie in range(count):
        kind = draw(st.sampled_from(["read", "status", "write", "error"]))
        offset = draw(st.integers(0, 2**40))
        if kind == "read":
            length = draw(st.integers(1, 64))
            requests.append(Request(command=Command.READ, cookie=cookie, offset=offset, length=length))
            cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=3))) if length > 1 else []
            bounds = [0, *cuts, length]
            pieces = []
            for start, end in itertools.pairwise(bounds):
                if draw(st.booleans()):
                    data = draw(st.binary(min_size=end - start, max_size=end - start))
                    pieces.append(
                        (
                            offset_data_chunk(cookie, offset + start, data),
                            OffsetDataChunk(cookie=cookie, offset=offset + start, data=data, done=False),
                        )
                    )
                else:
                    pieces.append(
                        (
                            offset_hole_chunk(cookie, offset + start, end - start),
                            OffsetHoleChunk(cookie=cookie, offset=offset + start, length=end - start, done=False),
                        )
                    )
            pieces = draw(st.permutations(pieces))
            pieces.append((none_chunk(cookie), NoneChunk(cookie=cookie)))
            replies.append(pieces)
        elif kind == "status":
            requests.append(Request(command=Command.BLOCK_STATUS, cookie=cookie, offset=offset, length=1 << 20))
            extents = tuple(
                draw(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=5))
            )
            chunk = block_status_chunk(cookie, 1, extents, done=True)
            replies.append([(chunk, BlockStatusChunk(cookie=cookie, context_id=1, extents=extents, done=True))])
        elif kind == "write":
            requests.append(Request(command=Command.WRITE, cookie=cookie, offset=offset, length=1))
            replies.append([(simple_reply(cookie, 0), SimpleReply(cookie=cookie, error=0))])
        else:
            requests.append(Request(command=Command.TRIM, cookie=cookie, offset=offset, length=9))
            message = draw(st.text(max_size=10).filter(lambda text: "\0" not in text))
            error = draw(st.sampled_from(list(Errno)))
            chunk = error_chunk(cookie, error, message)
            replies.append([(chunk, ErrorChunk(cookie=cookie, error=error, message=message, offset=None, done=True))])
    # Interleave the replies, each one's chunks in order.
    order = draw(st.permutations([index for index, reply in enumerate(replies) for _ in reply]))
    stream, events, positions = b"", [], [0] * len(replies)
    for index in order:
        chunk, event = replies[index][positions[index]]
        positions[index] += 1
        stream += chunk
        events.append(event)
    return requests, stream, events


@settings(max_examples=80, deadline=None)
@given(conversations(), st.data())
def test_reply_decoder_split_anywhere(
    conversation: tuple[list[Request], bytes, list[object]], data: st.DataObject
) -> None:
    requests, stream, expected = conversation
    decoder = decoder_for(*requests)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _wire.feed(decoder.receive_data, stream, cuts) == expected
    assert decoder.in_flight == {}
    assert decoder.buffered == 0


requests_strategy = st.builds(
    Request,
    command=st.sampled_from(list(Command)),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0xFFFF),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(requests_strategy, max_size=8), st.data())
def test_request_decoder_round_trip_split_anywhere(requests: list[Request], data: st.DataObject) -> None:
    # Headers only (WRITE payloads of up to 4 GiB are not made here): the decoder must give back
    # each request as sent; a WRITE's length is capped to a small payload to keep it cheap.
    stream, expected = b"", []
    for request in requests:
        if request.command == Command.DISC:
            continue
        if request.command == Command.WRITE:
            request = Request(
                command=Command.WRITE,
                cookie=request.cookie,
                offset=request.offset,
                length=request.length % 64,
                flags=request.flags,
            )
            payload = data.draw(st.binary(min_size=request.length, max_size=request.length))
            stream += request.header() + payload
            expected.append(RequestReceived(request=request, data=payload))
        else:
            stream += request.header()
            expected.append(RequestReceived(request=request))
    decoder = RequestDecoder()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _wire.feed(decoder.receive_data, stream, cuts) == expected


# malformed replies


@pytest.mark.parametrize(
    ("requests", "stream", "problem"),
    [
        pytest.param([READ], struct.pack(">IIQ", 0x12345678, 0, 1), "reply magic", id="magic"),
        pytest.param([READ], none_chunk(77), "no request in flight", id="unknown-cookie"),
        pytest.param([WRITE], offset_data_chunk(2, 0, b"x", done=True), "in the reply to WRITE", id="data-to-write"),
        pytest.param([READ], chunk_bytes(0, 2, 1, struct.pack(">QIB", 1000, 1, 0)), "not 12", id="hole-size"),
        pytest.param([READ], chunk_bytes(1, 2, 1, struct.pack(">QI", 1000, 0)), "length 0", id="empty-hole"),
        pytest.param([READ], chunk_bytes(0, 1, 1, struct.pack(">Q", 1000)), "OFFSET_DATA chunk of 8", id="data-empty"),
        pytest.param([READ], offset_data_chunk(1, 1000, bytes(11)), "for a read of 10", id="data-too-long"),
        pytest.param([READ], offset_data_chunk(1, 999, b"x"), "outside the request", id="data-before"),
        pytest.param([READ], offset_hole_chunk(1, 1009, 2), "outside the request", id="hole-after"),
        pytest.param(
            [READ], offset_data_chunk(1, 1000, b"abc") + offset_hole_chunk(1, 1002, 2), "overlaps", id="overlap"
        ),
        pytest.param([READ], offset_data_chunk(1, 1000, b"abc") + none_chunk(1), "3 of 10", id="incomplete-read"),
        pytest.param(
            [Request(command=Command.READ, cookie=1, offset=0, length=4, flags=CommandFlag.DF)],
            offset_data_chunk(1, 0, b"ab") + offset_data_chunk(1, 2, b"cd"),
            "DF",
            id="df-fragmented",
        ),
        pytest.param([STATUS], chunk_bytes(1, 5, 3, struct.pack(">I", 1)), "positive multiple", id="no-descriptor"),
        pytest.param([STATUS], chunk_bytes(1, 5, 3, struct.pack(">IIIB", 1, 1, 0, 0)), "multiple of 8", id="ragged"),
        pytest.param([STATUS], block_status_chunk(3, 2, [(1, 0)], done=True), "not selected", id="context"),
        pytest.param(
            [STATUS], block_status_chunk(3, 1, [(1, 0)]) + block_status_chunk(3, 1, [(1, 0)]), "twice", id="twice"
        ),
        pytest.param([STATUS], chunk_bytes(1, 5, 3, struct.pack(">III", 1, 0, 0)), "length 0", id="zero-extent"),
        pytest.param([STATUS], none_chunk(3), "without status", id="status-missing"),
        pytest.param(
            [Request(command=Command.BLOCK_STATUS, cookie=3, length=10, flags=CommandFlag.REQ_ONE)],
            block_status_chunk(3, 1, [(1, 0), (1, 0)]),
            "REQ_ONE",
            id="req-one-count",
        ),
        pytest.param(
            [Request(command=Command.BLOCK_STATUS, cookie=3, length=10, flags=CommandFlag.REQ_ONE)],
            block_status_chunk(3, 1, [(11, 0)]),
            "longer than the request",
            id="req-one-length",
        ),
        pytest.param([WRITE], chunk_bytes(0, 0, 2, b""), "without the DONE", id="none-not-done"),
        pytest.param([WRITE], chunk_bytes(1, 0, 2, b"x"), "NONE chunk with 1", id="none-payload"),
        pytest.param([WRITE], chunk_bytes(1, 3, 2, b""), "unknown chunk type 3", id="unknown-type"),
        pytest.param([WRITE], chunk_bytes(1, 0x8001, 2, struct.pack(">IH2s", 5, 3, b"ab")), "does not fit", id="msg"),
        pytest.param([WRITE], chunk_bytes(1, 0x8001, 2, struct.pack(">IH", 0, 0)), "error value 0", id="error-0"),
        pytest.param([WRITE], chunk_bytes(1, 0x8001, 2, b"abc"), "expected 6", id="error-short"),
        pytest.param(
            [WRITE], chunk_bytes(1, 0x8002, 2, struct.pack(">IHQ", 5, 0, 4)), "outside the request", id="error-offset"
        ),
        pytest.param([WRITE], chunk_bytes(1, 0x8077, 2, struct.pack(">IH", 5, 9)), "does not fit", id="unknown-err"),
    ],
)
def test_reply_decoder_rejects_malformed_replies(requests: list[Request], stream: bytes, problem: str) -> None:
    decoder = decoder_for(*requests)
    with pytest.raises(ProtocolError, match=problem) as caught:
        _wire.bytewise(decoder.receive_data, stream)
    assert caught.value.sender == "server"


def test_chunk_lengths_are_refused_before_their_payload_is_buffered() -> None:
    decoder = decoder_for(STATUS)
    header = struct.pack(">IHHQI", CHUNK_MAGIC, 1, 5, 3, 4 + 8 * (1 << 20))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.receive_data(header)  # the header alone suffices: nothing of the 8 MiB is awaited
    decoder = decoder_for(READ)
    with pytest.raises(ProtocolError, match="for a read of 10"):
        decoder.receive_data(struct.pack(">IHHQI", CHUNK_MAGIC, 1, 1, 1, 2**32 - 1))
    decoder = decoder_for(WRITE)
    with pytest.raises(ProtocolError, match="error chunk"):
        decoder.receive_data(struct.pack(">IHHQI", CHUNK_MAGIC, 1, 0x8001, 2, 1 << 20))


def test_simple_and_structured_modes_are_enforced() -> None:
    with pytest.raises(ProtocolError, match="without structured replies"):
        decoder_for(WRITE, structured=False).receive_data(none_chunk(2))
    with pytest.raises(ProtocolError, match="simple reply to READ"):
        decoder_for(READ).receive_data(simple_reply(1, Errno.EIO))


def test_reply_decoder_usage() -> None:
    decoder = decoder_for(READ)
    with pytest.raises(InvalidRequestError, match="already in flight"):
        decoder.request_sent(READ)
    decoder.request_sent(Request(command=Command.DISC, cookie=1))  # no reply: not remembered
    assert list(decoder.in_flight) == [1]
