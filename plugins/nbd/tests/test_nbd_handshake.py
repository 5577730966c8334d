"""The fixed newstyle handshake: byte-exact messages (layouts from doc/proto.md, hand-assembled with
struct), both state machines driven against each other, fragmentation, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imago import InvalidRequestError
from imago_nbd import (
    AbortOption,
    BlockSize,
    BlockSizeInfo,
    ClientFlag,
    ClientFlagsReceived,
    ClientHandshake,
    DescriptionInfo,
    ExportInfo,
    ExportListed,
    ExportNameOption,
    GoOption,
    HandshakeFlag,
    HandshakeState,
    InfoOption,
    InfoReceived,
    InfoType,
    InvalidOptionReceived,
    ListMetaContextOption,
    ListOption,
    MetaContextReceived,
    NameInfo,
    OptionAcknowledged,
    OptionFailed,
    OptionReceived,
    OptionReply,
    ProtocolError,
    ServerGreeting,
    ServerHandshake,
    SetMetaContextOption,
    StartTLS,
    StartTLSOption,
    StructuredReplyOption,
    TransmissionFlag,
    TransmissionReady,
    UnknownInfo,
    UnknownOption,
)
from imago_nbd.options import decode_info, decode_option

from . import _wire

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9


def option_bytes(option: int, body: bytes = b"") -> bytes:
    # "Newstyle negotiation": IHAVEOPT, 32-bit option, 32-bit length, data.
    return struct.pack(">QII", IHAVEOPT, option, len(body)) + body


def reply_bytes(option: int, reply: int, body: bytes = b"") -> bytes:
    # "Fixed newstyle negotiation": reply magic, option, reply type, length, data.
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(body)) + body


def greeted_client(flags: int = 3, *, no_zeroes: bool = True) -> ClientHandshake:
    client = ClientHandshake(no_zeroes=no_zeroes)
    client.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
    client.client_flags()
    return client


def server_in_options(client_flags: int = 3) -> ServerHandshake:
    server = ServerHandshake()
    server.greeting()
    server.receive_data(struct.pack(">I", client_flags))
    return server


# --- byte-exact encodings -----------------------------------------------------------------------


def test_greeting_and_client_flags() -> None:
    server = ServerHandshake()
    greeting = server.greeting()
    # "Newstyle negotiation": NBDMAGIC, IHAVEOPT, 16 bits of handshake flags.
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    client = ClientHandshake()
    assert client.receive_data(greeting) == [
        ServerGreeting(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    ]
    flags = client.client_flags()
    assert flags == struct.pack(">I", 3)
    assert server.receive_data(flags) == [ClientFlagsReceived(flags=ClientFlag(3))]
    assert server.no_zeroes
    assert client.no_zeroes


def test_client_does_not_ask_for_what_was_not_offered() -> None:
    client = ClientHandshake(no_zeroes=True)
    client.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 0x8000))  # unknown bit ignored
    assert client.client_flags() == struct.pack(">I", 1)
    refusing = ClientHandshake(no_zeroes=False)
    refusing.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    assert refusing.client_flags() == struct.pack(">I", 1)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        pytest.param(ExportNameOption(name="disk"), option_bytes(1, b"disk"), id="EXPORT_NAME"),
        pytest.param(AbortOption(), option_bytes(2), id="ABORT"),
        pytest.param(ListOption(), option_bytes(3), id="LIST"),
        pytest.param(StartTLSOption(), option_bytes(5), id="STARTTLS"),
        pytest.param(
            InfoOption(name="a", requests=(InfoType.NAME, InfoType.BLOCK_SIZE)),
            # "NBD_OPT_INFO and NBD_OPT_GO": 32-bit name length, name, 16-bit count, 16-bit requests.
            option_bytes(6, struct.pack(">I1sHHH", 1, b"a", 2, 1, 3)),
            id="INFO",
        ),
        pytest.param(GoOption(name=""), option_bytes(7, struct.pack(">IH", 0, 0)), id="GO"),
        pytest.param(StructuredReplyOption(), option_bytes(8), id="STRUCTURED_REPLY"),
        pytest.param(
            ListMetaContextOption(export="x", queries=("base:",)),
            # "NBD_OPT_LIST_META_CONTEXT": export name length and name, query count, each query.
            option_bytes(9, struct.pack(">I1sII5s", 1, b"x", 1, 5, b"base:")),
            id="LIST_META_CONTEXT",
        ),
        pytest.param(
            SetMetaContextOption(export="", queries=("base:allocation", "qemu:")),
            option_bytes(10, struct.pack(">III15sI5s", 0, 2, 15, b"base:allocation", 5, b"qemu:")),
            id="SET_META_CONTEXT",
        ),
        pytest.param(UnknownOption(number=77, data=b"xyz"), option_bytes(77, b"xyz"), id="unknown"),
    ],
)
def test_option_encoding_and_server_decoding(option: object, expected: bytes) -> None:
    client = greeted_client()
    assert client.send_option(option) == expected  # type: ignore[arg-type]
    server = server_in_options()
    assert server.receive_data(expected) == [OptionReceived(option=option)]  # type: ignore[arg-type]
    assert server.state is HandshakeState.OPTION_PENDING


def test_option_replies_byte_exact() -> None:
    server = server_in_options()
    server.receive_data(option_bytes(7, struct.pack(">I4sHH", 4, b"disk", 1, 3)))
    export = server.reply_info(ExportInfo(size=1 << 30, flags=TransmissionFlag(0x4D)))
    # "NBD_INFO_EXPORT": 16-bit type 0, 64-bit size, 16-bit transmission flags.
    assert export == reply_bytes(7, 3, struct.pack(">HQH", 0, 1 << 30, 0x4D))
    sizes = server.reply_info(BlockSizeInfo(block_size=BlockSize(minimum=512, preferred=4096, maximum=1 << 25)))
    # "NBD_INFO_BLOCK_SIZE": 16-bit type 3, then minimum, preferred, maximum as 32 bits.
    assert sizes == reply_bytes(7, 3, struct.pack(">HIII", 3, 512, 4096, 1 << 25))
    assert server.reply_info(NameInfo(name="disk")) == reply_bytes(7, 3, struct.pack(">H4s", 1, b"disk"))
    assert server.reply_info(DescriptionInfo(description="d")) == reply_bytes(7, 3, b"\x00\x02d")
    assert server.reply_ack() == reply_bytes(7, 1)
    assert server.state is HandshakeState.TRANSMISSION

    server = server_in_options()
    server.receive_data(option_bytes(3))
    # "NBD_REP_SERVER": 32-bit name length, name, then the description.
    assert server.reply_server("disk", "text") == reply_bytes(3, 2, struct.pack(">I4s4s", 4, b"disk", b"text"))
    assert server.reply_error(OptionReply.ERR_POLICY, "no") == reply_bytes(3, 2**31 + 2, b"no")

    server = server_in_options()
    server.receive_data(option_bytes(10, struct.pack(">III5s", 0, 1, 5, b"base:")))
    # "NBD_REP_META_CONTEXT": 32-bit context id, then the name.
    meta = server.reply_meta_context(7, "base:allocation")
    assert meta == reply_bytes(10, 4, struct.pack(">I15s", 7, b"base:allocation"))
    assert server.reply_ack() == reply_bytes(10, 1)
    assert server.meta_contexts == {7: "base:allocation"}


@pytest.mark.parametrize(("client_flags", "zeroes"), [(1, 124), (3, 0)])
def test_export_name_reply_with_and_without_zeroes(client_flags: int, zeroes: int) -> None:
    server = server_in_options(client_flags)
    server.receive_data(option_bytes(1, b"disk"))
    reply = server.reply_export_name(1 << 20, TransmissionFlag(1))
    # "NBD_OPT_EXPORT_NAME" reply: 64-bit size, 16-bit flags, 124 zero bytes unless NO_ZEROES.
    assert reply == struct.pack(">QH", 1 << 20, 1) + bytes(zeroes)
    assert server.state is HandshakeState.TRANSMISSION

    client = greeted_client(3, no_zeroes=client_flags == 3)
    client.send_option(ExportNameOption(name="disk"))
    # Byte by byte up to the last one, which comes with a first transmission byte behind it.
    events = _wire.bytewise(client.receive_data, reply[:-1]) + client.receive_data(reply[-1:] + b"\x67")
    assert len(events) == 1
    assert isinstance(events[0], TransmissionReady)
    assert (events[0].export.size, events[0].export.name) == (1 << 20, "disk")
    assert client.trailing_data == b"\x67"


# --- the two state machines against each other --------------------------------------------------

CONVERSATION = [
    ListOption(),
    StructuredReplyOption(),
    ListMetaContextOption(export="disk", queries=()),
    SetMetaContextOption(export="disk", queries=("base:",)),
    UnknownOption(number=99, data=b"?"),
    InfoOption(name="missing"),
    InfoOption(name="disk", requests=(InfoType.NAME,)),
    GoOption(name="disk", requests=(InfoType.BLOCK_SIZE, InfoType.DESCRIPTION)),
]


def check_conversation(client: ClientHandshake, server: ServerHandshake, events: list[object]) -> None:
    kinds = [type(event).__name__ for event in events]
    assert kinds == [
        "ServerGreeting",
        "ExportListed",
        "ExportListed",
        "OptionAcknowledged",  # LIST
        "OptionAcknowledged",  # STRUCTURED_REPLY
        "MetaContextReceived",
        "MetaContextReceived",
        "OptionAcknowledged",  # LIST_META_CONTEXT
        "MetaContextReceived",
        "OptionAcknowledged",  # SET_META_CONTEXT
        "OptionFailed",  # unknown option
        "OptionFailed",  # INFO on a missing export
        "InfoReceived",
        "InfoReceived",
        "OptionAcknowledged",  # INFO
        "InfoReceived",
        "InfoReceived",
        "InfoReceived",
        "TransmissionReady",
    ]
    assert ExportListed(name="disk", description="the test disk") in events
    assert OptionFailed(option=99, reply=OptionReply.ERR_UNSUP, message="") in events
    assert MetaContextReceived(option=10, context_id=1, name="base:allocation") in events
    ready = events[-1]
    assert isinstance(ready, TransmissionReady)
    assert ready.export.size == 1 << 20
    assert ready.export.flags == _wire.FLAGS
    assert ready.export.block_size == _wire.BLOCK_SIZE
    assert ready.export.description == "the test disk"
    assert client.state is server.state is HandshakeState.TRANSMISSION
    assert client.structured_replies
    assert server.structured_replies
    assert client.meta_contexts == server.meta_contexts == {1: "base:allocation"}


def test_full_handshake_in_memory() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    check_conversation(client, server, _wire.converse(client, server, CONVERSATION))


def test_full_handshake_one_byte_at_a_time() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    events = _wire.converse(client, server, CONVERSATION, cut=lambda data: list(range(len(data))))
    check_conversation(client, server, events)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_full_handshake_split_anywhere(data: st.DataObject) -> None:
    def cut(chunk: bytes) -> list[int]:
        return data.draw(st.lists(st.integers(0, len(chunk)), max_size=6))

    client, server = ClientHandshake(), ServerHandshake()
    check_conversation(client, server, _wire.converse(client, server, CONVERSATION, cut))


def test_starttls_then_options_go_on() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    events = _wire.converse(client, server, [StartTLSOption()])
    assert events[-1] == StartTLS()
    assert client.state is server.state is HandshakeState.AWAIT_TLS
    with pytest.raises(InvalidRequestError):
        client.send_option(ListOption())
    client.tls_established()
    server.tls_established()
    request = client.send_option(GoOption(name=""))
    reply = b"".join(_wire.answer(server, event) for event in server.receive_data(request))
    assert isinstance(client.receive_data(reply)[-1], TransmissionReady)


def test_starttls_refused_keeps_plain_text() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    _wire.converse(client, server, [])
    option = client.send_option(StartTLSOption())
    reply = b"".join(_wire.answer(server, event, tls=False) for event in server.receive_data(option))
    assert client.receive_data(reply) == [OptionFailed(option=5, reply=OptionReply.ERR_POLICY, message="no TLS here")]
    assert client.state is HandshakeState.OPTIONS


def test_abort() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    events = _wire.converse(client, server, [AbortOption()])
    assert events[-1] == OptionAcknowledged(option=2)
    assert client.state is server.state is HandshakeState.CLOSED


def test_export_name_conversation_without_no_zeroes() -> None:
    client, server = ClientHandshake(no_zeroes=False), ServerHandshake()
    events = _wire.converse(client, server, [ExportNameOption(name="disk")], cut=lambda d: list(range(0, len(d), 7)))
    assert isinstance(events[-1], TransmissionReady)
    assert events[-1].export.size == 1 << 20
    assert client.state is server.state is HandshakeState.TRANSMISSION


# --- round trips --------------------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)
info_requests = st.lists(st.integers(0, 0xFFFF), max_size=8).map(tuple)
options = st.one_of(
    st.builds(ExportNameOption, name=names),
    st.just(AbortOption()),
    st.just(ListOption()),
    st.just(StartTLSOption()),
    st.just(StructuredReplyOption()),
    st.builds(InfoOption, name=names, requests=info_requests),
    st.builds(GoOption, name=names, requests=info_requests),
    st.builds(ListMetaContextOption, export=names, queries=st.lists(names, max_size=4).map(tuple)),
    st.builds(SetMetaContextOption, export=names, queries=st.lists(names, max_size=4).map(tuple)),
    st.builds(UnknownOption, number=st.integers(12, 2**32 - 1), data=st.binary(max_size=64)),
)
powers = st.integers(0, 16).map(lambda bit: 1 << bit)


@st.composite
def block_sizes(draw: st.DrawFn) -> BlockSize:
    minimum = draw(powers)
    preferred = minimum << draw(st.integers(0, 8))
    maximum = draw(st.one_of(st.just(0xFFFFFFFF), st.integers(1, 0xFFFFFFFF // minimum).map(lambda n: n * minimum)))
    return BlockSize(minimum=minimum, preferred=preferred, maximum=maximum)


infos = st.one_of(
    st.builds(ExportInfo, size=st.integers(0, 2**64 - 1), flags=st.integers(0, 0xFFFF)),
    st.builds(NameInfo, name=names),
    st.builds(DescriptionInfo, description=names),
    st.builds(BlockSizeInfo, block_size=block_sizes()),
    st.builds(UnknownInfo, info_type=st.integers(4, 0xFFFF), data=st.binary(max_size=32)),
)


@settings(max_examples=200, deadline=None)
@given(options)
def test_option_round_trip(option: object) -> None:
    body = option.encode()  # type: ignore[attr-defined]
    assert decode_option(option.code, body) == option  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(infos)
def test_info_round_trip(info: object) -> None:
    assert decode_info(info.encode()) == info  # type: ignore[attr-defined]


# --- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("greeting", "problem"),
    [
        (struct.pack(">QQH", 0x1234, IHAVEOPT, 1), "NBDMAGIC"),
        (struct.pack(">QQ", NBDMAGIC, 0x00420281861253), "oldstyle"),
        (struct.pack(">QQH", NBDMAGIC, 0x1234, 1), "IHAVEOPT"),
    ],
)
def test_client_rejects_bad_greetings(greeting: bytes, problem: str) -> None:
    client = ClientHandshake()
    with pytest.raises(ProtocolError, match=problem):
        client.receive_data(greeting + bytes(8))


def go_client() -> ClientHandshake:
    client = greeted_client()
    client.send_option(GoOption(name="disk"))
    return client


EXPORT_INFO = reply_bytes(7, 3, struct.pack(">HQH", 0, 4096, 1))


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        pytest.param(struct.pack(">QIII", 0x99, 7, 1, 0), "magic", id="magic"),
        pytest.param(reply_bytes(3, 1), "option 3 while option 7", id="other-option"),
        pytest.param(reply_bytes(7, 1, b"x"), "ACK carries", id="ack-with-data"),
        pytest.param(reply_bytes(7, 1), "without NBD_INFO_EXPORT", id="go-without-export"),
        pytest.param(reply_bytes(7, 3, struct.pack(">HQ", 0, 1)), "NBD_INFO_EXPORT is 10", id="short-export"),
        pytest.param(reply_bytes(7, 3, b"\x00"), "no information type", id="info-without-type"),
        pytest.param(
            EXPORT_INFO + reply_bytes(7, 3, struct.pack(">HIII", 3, 3, 4096, 4096)), "minimum", id="bad-block-size"
        ),
        pytest.param(reply_bytes(7, 2, struct.pack(">I", 0)), "not a valid reply", id="server-to-go"),
        pytest.param(reply_bytes(7, 4, struct.pack(">I1s", 1, b"a")), "not a valid reply", id="meta-to-go"),
        pytest.param(reply_bytes(7, 77), "not a valid reply", id="unknown-type"),
        pytest.param(reply_bytes(7, 2**31 + 1, b"\xff\xfe"), "not UTF-8", id="bad-utf8"),
        pytest.param(reply_bytes(7, 3, b"\x00\x01a\x00b"), "NUL", id="nul-in-name"),
        pytest.param(struct.pack(">QIII", REPLY_MAGIC, 7, 3, 1 << 20), "exceeds the limit", id="oversized"),
    ],
)
def test_client_rejects_malformed_replies(stream: bytes, problem: str) -> None:
    client = go_client()
    with pytest.raises(ProtocolError, match=problem) as caught:
        _wire.bytewise(client.receive_data, stream)
    assert caught.value.sender == "server"
    assert caught.value.offset is not None
    assert caught.value.offset >= 18


def test_client_rejects_bad_list_replies() -> None:
    client = greeted_client()
    client.send_option(ListOption())
    with pytest.raises(ProtocolError, match="name length 9 exceeds"):
        client.receive_data(reply_bytes(3, 2, struct.pack(">I4s", 9, b"disk")))


def test_client_rejects_duplicate_context_ids() -> None:
    client = greeted_client()
    client.send_option(SetMetaContextOption(export="", queries=("base:",)))
    client.receive_data(reply_bytes(10, 4, struct.pack(">I1s", 1, b"a")))
    with pytest.raises(ProtocolError, match="twice"):
        client.receive_data(reply_bytes(10, 4, struct.pack(">I1s", 1, b"b")))


def test_client_rejects_plain_text_after_starttls() -> None:
    client = greeted_client()
    client.send_option(StartTLSOption())
    with pytest.raises(ProtocolError, match="plain-text"):
        client.receive_data(reply_bytes(5, 1) + b"injected")
    client = greeted_client()
    client.send_option(StartTLSOption())
    assert client.receive_data(reply_bytes(5, 1)) == [StartTLS()]
    with pytest.raises(ProtocolError, match="plain-text"):
        client.receive_data(b"x")


def test_client_rejects_unsolicited_data() -> None:
    client = ClientHandshake()
    with pytest.raises(ProtocolError, match="1 unsolicited bytes"):
        client.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3) + b"!")
    client = greeted_client()
    client.send_option(ListOption())
    with pytest.raises(ProtocolError, match="unsolicited"):
        client.receive_data(reply_bytes(3, 1) + reply_bytes(3, 1))


def test_client_usage_errors() -> None:
    client = ClientHandshake()
    with pytest.raises(InvalidRequestError):
        client.client_flags()
    client = go_client()
    with pytest.raises(InvalidRequestError, match="cannot be sent"):
        client.send_option(ListOption())
    old = greeted_client(0)  # a server without fixed newstyle
    with pytest.raises(InvalidRequestError, match="EXPORT_NAME is the only option"):
        old.send_option(ListOption())
    with pytest.raises(ValueError, match="4096"):
        greeted_client().send_option(ExportNameOption(name="x" * 4097))


@pytest.mark.parametrize(
    ("flags", "problem"),
    [(4, "unknown client flags"), (0x80000001, "unknown client flags")],
)
def test_server_rejects_unknown_client_flags(flags: int, problem: str) -> None:
    server = ServerHandshake()
    server.greeting()
    with pytest.raises(ProtocolError, match=problem):
        server.receive_data(struct.pack(">I", flags))


def test_server_rejects_no_zeroes_it_did_not_offer() -> None:
    server = ServerHandshake(flags=HandshakeFlag.FIXED_NEWSTYLE)
    assert server.greeting()[-2:] == b"\x00\x01"
    with pytest.raises(ProtocolError, match="NO_ZEROES"):
        server.receive_data(struct.pack(">I", 3))


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        pytest.param(struct.pack(">QII", 0x1234, 3, 0), "IHAVEOPT", id="magic"),
        pytest.param(struct.pack(">QII", IHAVEOPT, 3, 65537), "exceeds the limit", id="oversized"),
        pytest.param(option_bytes(1, b"a\x00b"), "NUL", id="export-name-nul"),
    ],
)
def test_server_rejects_malformed_options(stream: bytes, problem: str) -> None:
    server = server_in_options()
    with pytest.raises(ProtocolError, match=problem) as caught:
        _wire.bytewise(server.receive_data, stream)
    assert caught.value.sender == "client"
    assert caught.value.offset == 4  # the option's start, behind the 4 bytes of client flags


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        pytest.param(option_bytes(3, b"x"), "carries 1 bytes", id="list-with-data"),
        pytest.param(option_bytes(7, struct.pack(">I", 10) + b"abc"), "needs 10 bytes", id="go-short-name"),
        pytest.param(option_bytes(7, struct.pack(">I1sHH", 1, b"a", 2, 0)), "needs 2 bytes", id="go-short-list"),
        pytest.param(option_bytes(6, struct.pack(">IH", 0, 0) + b"!"), "left over", id="info-trailing"),
        pytest.param(option_bytes(7, struct.pack(">I", 5000) + bytes(5000)), "exceeds 4096", id="long-name"),
        pytest.param(option_bytes(10, struct.pack(">II", 0, 100000)), "do not fit", id="query-count"),
        pytest.param(option_bytes(9, struct.pack(">III2s", 0, 1, 2, b"\xc3\x28")), "UTF-8", id="bad-utf8"),
    ],
)
def test_server_reports_invalid_options(stream: bytes, problem: str) -> None:
    server = server_in_options()
    (event,) = _wire.bytewise(server.receive_data, stream)
    assert isinstance(event, InvalidOptionReceived)
    assert problem in event.problem
    reply = server.reply_error(OptionReply.ERR_INVALID, "bad")
    assert reply[8:16] == stream[8:12] + struct.pack(">I", 2**31 + 3)
    assert server.state is HandshakeState.OPTIONS


def test_server_one_option_at_a_time() -> None:
    server = server_in_options()
    events = server.receive_data(option_bytes(3) + option_bytes(8))
    assert events == [OptionReceived(option=ListOption())]  # the second waits for the reply
    assert server.receive_data(b"") == []
    server.reply_ack()
    assert server.receive_data(b"") == [OptionReceived(option=StructuredReplyOption())]


def test_server_rejects_a_flood_while_an_option_is_pending() -> None:
    server = server_in_options()
    server.receive_data(option_bytes(3))
    with pytest.raises(ProtocolError, match="without waiting"):
        server.receive_data(bytes(70000))


def test_server_rejects_plain_text_after_starttls() -> None:
    server = server_in_options()
    server.receive_data(option_bytes(5) + b"early")
    with pytest.raises(ProtocolError, match="plain-text"):
        server.reply_ack()


def test_server_rejects_options_without_fixed_newstyle() -> None:
    server = server_in_options(0)
    with pytest.raises(ProtocolError, match="fixed newstyle"):
        server.receive_data(option_bytes(3))
    server = server_in_options(0)
    assert server.receive_data(option_bytes(1, b"disk")) == [OptionReceived(option=ExportNameOption(name="disk"))]


def test_server_usage_errors() -> None:
    server = server_in_options()
    with pytest.raises(InvalidRequestError, match="no option awaits"):
        server.reply_ack()
    server.receive_data(option_bytes(7, struct.pack(">IH", 0, 0)))
    with pytest.raises(InvalidRequestError, match="NBD_INFO_EXPORT"):
        server.reply_ack()
    with pytest.raises(InvalidRequestError, match="LIST only"):
        server.reply_server("x")
    with pytest.raises(InvalidRequestError, match="not an error"):
        server.reply_error(OptionReply.ACK)
    server = server_in_options()
    server.receive_data(option_bytes(1, b""))
    with pytest.raises(InvalidRequestError, match="close the connection"):
        server.reply_error(OptionReply.ERR_UNKNOWN)
    with pytest.raises(InvalidRequestError, match="reply_export_name"):
        server.reply_ack()


def test_events_carry_enum_members() -> None:
    client, server = ClientHandshake(), ServerHandshake()
    events = _wire.converse(client, server, [InfoOption(name="disk")])
    infos = [event for event in events if isinstance(event, InfoReceived)]
    assert infos == [InfoReceived(option=6, info=ExportInfo(size=1 << 20, flags=_wire.FLAGS))]
