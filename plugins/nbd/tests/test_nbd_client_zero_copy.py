"""The reply decoder's zero-copy mode: READ data announced, moved by the caller, checks kept."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imago import InvalidRequestError
from imago_nbd import Command, ProtocolError
from imago_nbd.replies import (
    DataHeader,
    NoneChunk,
    OffsetHoleChunk,
    ReplyDecoder,
    ReplyEvent,
    SimpleReply,
    none_chunk,
    offset_data_chunk,
    offset_hole_chunk,
    simple_reply,
)
from imago_nbd.requests import Request


def _drive(decoder: ReplyDecoder, stream: bytes, cuts: list[int], target: bytearray, base: int) -> list[ReplyEvent]:
    """Feed *stream* cut at *cuts*, moving announced payloads into *target* as an I/O layer would."""
    events: list[ReplyEvent] = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    dest: memoryview | None = None
    for piece in pieces:
        data = memoryview(piece)
        while data:
            if dest is not None:
                count = min(len(dest), len(data))
                dest[:count] = data[:count]  # what recv_into would have done
                decoder.payload_received(count)
                dest, data = dest[count:], data[count:]
                if dest:
                    continue
                dest = None
                new = decoder.receive_data(b"")
            else:
                new = decoder.receive_data(data)
                data = data[len(data) :]
            while new:
                events += new
                last = new[-1]
                new = []
                if isinstance(last, DataHeader):
                    start = last.offset - base
                    view = memoryview(target)[start : start + last.length]
                    moved = decoder.take_payload_into(view)
                    if moved < last.length:
                        dest = view[moved:]
                    else:
                        new = decoder.receive_data(b"")
    assert dest is None
    return events


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=4200), max_size=12))
def test_structured_read_moved_by_the_caller(cuts: list[int]) -> None:
    payload = bytes(range(256)) * 8
    decoder = ReplyDecoder(structured=True, zero_copy=True)
    decoder.request_sent(Request(command=Command.READ, cookie=1, offset=4096, length=4096))
    decoder.request_sent(Request(command=Command.READ, cookie=2, offset=0, length=1000))
    stream = (
        offset_data_chunk(1, 4096 + 2048, payload)
        + offset_hole_chunk(1, 4096 + 1024, 1024)
        + offset_data_chunk(2, 0, payload[:1000], done=True)
        + offset_data_chunk(1, 4096, payload[:1024])
        + none_chunk(1)
    )
    target = bytearray(b"\xee" * 8192)
    events = _drive(decoder, stream, sorted({c for c in cuts if c < len(stream)}), target, 0)
    # Cookie 2's data lands at offset 0 (its own request), cookie 1's at 4096.
    assert target[:1000] == payload[:1000]
    assert target[4096 : 4096 + 1024] == payload[:1024]
    assert target[4096 + 2048 :] == payload
    headers = [event for event in events if isinstance(event, DataHeader)]
    assert [(h.cookie, h.offset, h.length, h.done) for h in headers] == [
        (1, 6144, 2048, False),
        (2, 0, 1000, True),
        (1, 4096, 1024, False),
    ]
    assert any(isinstance(event, OffsetHoleChunk) for event in events)
    assert isinstance(events[-1], NoneChunk)
    assert not decoder.in_flight


def test_simple_read_moved_by_the_caller() -> None:
    decoder = ReplyDecoder(structured=False, zero_copy=True)
    decoder.request_sent(Request(command=Command.READ, cookie=7, offset=512, length=600))
    decoder.request_sent(Request(command=Command.READ, cookie=8, offset=0, length=100))
    decoder.request_sent(Request(command=Command.FLUSH, cookie=9))
    stream = simple_reply(7, data=b"a" * 600) + simple_reply(8, error=5) + simple_reply(9)
    target = bytearray(1200)
    events = _drive(decoder, stream, [10, 30, 300], target, 0)
    assert target[512:1112] == b"a" * 600
    assert isinstance(events[0], DataHeader)
    assert events[0].simple
    assert events[1:] == [SimpleReply(cookie=8, error=5), SimpleReply(cookie=9, error=0)]
    assert not decoder.in_flight


def test_zero_copy_checks_stay() -> None:
    decoder = ReplyDecoder(structured=True, zero_copy=True)
    decoder.request_sent(Request(command=Command.READ, cookie=1, offset=0, length=100))
    with pytest.raises(ProtocolError, match="outside the request"):
        decoder.receive_data(offset_data_chunk(1, 50, b"x" * 100))
    decoder = ReplyDecoder(structured=True, zero_copy=True)
    decoder.request_sent(Request(command=Command.READ, cookie=1, offset=0, length=100))
    chunk = offset_data_chunk(1, 0, b"x" * 100, done=True)
    (header,) = decoder.receive_data(chunk[:40])  # the header and 12 payload bytes
    assert isinstance(header, DataHeader)
    assert decoder.payload_left == 100
    # Payload received past what the decoder holds, or more than announced: misuse.
    with pytest.raises(InvalidRequestError, match="take_payload_into first"):
        decoder.payload_received(10)
    assert decoder.take_payload_into(memoryview(bytearray(100))) == 12
    with pytest.raises(InvalidRequestError, match="announced"):
        decoder.payload_received(89)
    assert decoder.receive_data(b"") == []  # nothing decodes while payload is owed
    decoder.payload_received(88)
    assert not decoder.in_flight


def test_short_done_read_is_a_violation() -> None:
    decoder = ReplyDecoder(structured=True, zero_copy=True)
    decoder.request_sent(Request(command=Command.READ, cookie=1, offset=0, length=100))
    decoder.receive_data(offset_data_chunk(1, 0, b"x" * 60, done=True)[:28])
    with pytest.raises(ProtocolError, match="done with 60 of 100"):
        decoder.payload_received(60)
