"""Helpers for the codec tests: feeding bytes in pieces, and a tiny in-memory server policy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from imago_nbd import (
    BlockSize,
    BlockSizeInfo,
    ClientHandshake,
    DescriptionInfo,
    ExportInfo,
    ExportNameOption,
    InfoOption,
    InfoType,
    InvalidOptionReceived,
    ListMetaContextOption,
    ListOption,
    NameInfo,
    OptionReceived,
    OptionReply,
    ServerHandshake,
    SetMetaContextOption,
    StartTLSOption,
    TransmissionFlag,
)

T = TypeVar("T")

EXPORTS = {"disk": (1 << 20, "the test disk"), "": (4096, "")}
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
BLOCK_SIZE = BlockSize(minimum=512, preferred=4096, maximum=1 << 25)
CONTEXTS = {"base:allocation": 1, "qemu:allocation-depth": 2}


def feed(receive: Callable[[bytes], list[T]], data: bytes, cuts: Iterable[int] = ()) -> list[T]:
    """Feed *data* to *receive* split at *cuts* (positions), collecting the events."""
    events: list[T] = []
    start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        events += receive(data[start:cut])
        start = cut
    events += receive(data[start:])
    return events


def bytewise(receive: Callable[[bytes], list[T]], data: bytes) -> list[T]:
    """Feed *data* one byte at a time."""
    return feed(receive, data, range(len(data)))


def answer(server: ServerHandshake, event: object, *, tls: bool = True) -> bytes:
    """What a simple server says to one handshake event."""
    if isinstance(event, InvalidOptionReceived):
        return server.reply_error(OptionReply.ERR_INVALID, event.problem)
    if not isinstance(event, OptionReceived):
        return b""
    option = event.option
    if isinstance(option, ExportNameOption):
        size = EXPORTS[option.name][0]
        return server.reply_export_name(size, FLAGS)
    if isinstance(option, ListOption):
        data = b"".join(server.reply_server(name, text) for name, (_, text) in EXPORTS.items())
        return data + server.reply_ack()
    if isinstance(option, InfoOption):  # INFO and GO
        if option.name not in EXPORTS:
            return server.reply_error(OptionReply.ERR_UNKNOWN, f"no export {option.name!r}")
        size, text = EXPORTS[option.name]
        data = server.reply_info(ExportInfo(size=size, flags=FLAGS))
        if InfoType.NAME in option.requests:
            data += server.reply_info(NameInfo(name=option.name))
        if InfoType.DESCRIPTION in option.requests:
            data += server.reply_info(DescriptionInfo(description=text))
        if InfoType.BLOCK_SIZE in option.requests:
            data += server.reply_info(BlockSizeInfo(block_size=BLOCK_SIZE))
        return data + server.reply_ack()
    if isinstance(option, ListMetaContextOption):  # LIST and SET
        data = b""
        for name, context_id in CONTEXTS.items():
            if any(name.startswith(query) for query in option.queries) or not option.queries:
                if isinstance(option, SetMetaContextOption) and not option.queries:
                    continue
                data += server.reply_meta_context(context_id, name)
        return data + server.reply_ack()
    if isinstance(option, StartTLSOption) and not tls:
        return server.reply_error(OptionReply.ERR_POLICY, "no TLS here")
    if option.code in (2, 5, 8):  # ABORT, STARTTLS, STRUCTURED_REPLY
        return server.reply_ack()
    return server.reply_error(OptionReply.ERR_UNSUP)


def converse(
    client: ClientHandshake,
    server: ServerHandshake,
    options: Sequence[object],
    cut: Callable[[bytes], list[int]] = lambda data: [],
) -> list[object]:
    """Run a handshake in memory: greeting, flags, then each option and the server's answers.

    Every transfer is split where *cut* says. Returns the client's events.
    """
    greeting = server.greeting()
    client_events: list[object] = feed(client.receive_data, greeting, cut(greeting))
    flags = client.client_flags()
    for event in feed(server.receive_data, flags, cut(flags)):
        assert not answer(server, event)
    for option in options:
        request = client.send_option(option)  # type: ignore[arg-type]
        reply = b"".join(answer(server, event) for event in feed(server.receive_data, request, cut(request)))
        client_events += feed(client.receive_data, reply, cut(reply))
    return client_events


__all__ = ["BLOCK_SIZE", "CONTEXTS", "EXPORTS", "FLAGS", "answer", "bytewise", "converse", "feed"]
