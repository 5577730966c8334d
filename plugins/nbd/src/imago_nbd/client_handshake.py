"""``ClientHandshake``: the client side of the fixed newstyle handshake, sans I/O.

It takes received bytes through ``receive_data`` (in fragments of any size) and returns the
events they complete; ``client_flags`` and ``send_option`` return the bytes to send. One option
is outstanding at a time, as the protocol requires: another is refused until the final reply.
After the handshake enters transmission, ``trailing_data`` holds any bytes received past its
end, for the reply decoder.
"""

from __future__ import annotations

import struct

from .buffer import ReceiveBuffer
from .constants import (
    CLISERV_MAGIC,
    DEFAULT_MAX_OPTION_LENGTH,
    EXPORT_NAME_ZEROES,
    INIT_PASSWD,
    OPTION_REPLY_MAGIC,
    OPTS_MAGIC,
    ClientFlag,
    HandshakeFlag,
    OptionReply,
    TransmissionFlag,
)
from .errors import ProtocolError
from .handshake import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    OPTION_HEADER,
    REPLY_HEADER,
    ClientEvent,
    ExportDetails,
    ExportListed,
    HandshakeState,
    InfoReceived,
    MetaContextReceived,
    OptionAcknowledged,
    OptionFailed,
    ServerGreeting,
    StartTLS,
    TransmissionReady,
    usage_error,
)
from .options import (
    AbortOption,
    BlockSizeInfo,
    DescriptionInfo,
    ExportInfo,
    ExportNameOption,
    GoOption,
    Info,
    InfoOption,
    ListMetaContextOption,
    ListOption,
    MalformedPayloadError,
    NameInfo,
    OptionRequest,
    SetMetaContextOption,
    StartTLSOption,
    StructuredReplyOption,
    decode_info,
    decode_string,
)

__all__ = ["ClientHandshake"]

_U32 = struct.Struct(">I")


class ClientHandshake:
    """The client side of the fixed newstyle handshake.

    ``no_zeroes`` asks the server to drop the 124 zero bytes of EXPORT_NAME's reply when it
    offers to; ``max_reply_length`` caps an option reply's body (larger ones are a protocol
    violation, not a reason to buffer).
    """

    def __init__(self, *, no_zeroes: bool = True, max_reply_length: int = DEFAULT_MAX_OPTION_LENGTH) -> None:
        self._buffer = ReceiveBuffer()
        self._want_no_zeroes = no_zeroes
        self._max_reply_length = max_reply_length
        self.state = HandshakeState.GREETING
        #: The server's handshake flags, once greeted.
        self.server_flags = HandshakeFlag(0)
        #: The flags this client sent.
        self.client_flags_sent = ClientFlag(0)
        #: Whether the server acknowledged NBD_OPT_STRUCTURED_REPLY.
        self.structured_replies = False
        #: Metadata contexts the last acknowledged SET_META_CONTEXT selected, by id.
        self.meta_contexts: dict[int, str] = {}
        #: The export transmission was entered on, once it was.
        self.export: ExportDetails | None = None
        self._pending: OptionRequest | None = None
        self._infos: list[Info] = []
        self._contexts: dict[int, str] = {}
        self._reply_header: tuple[int, int, int, int] | None = None

    @property
    def no_zeroes(self) -> bool:
        """Whether both sides agreed to drop EXPORT_NAME's 124 zero bytes."""
        return bool(self.client_flags_sent & ClientFlag.NO_ZEROES)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the handshake (for the transmission decoder); removed when read."""
        return self._buffer.take_all()

    def client_flags(self) -> bytes:
        """The client's flags, sent once after the greeting."""
        if self.state is not HandshakeState.CLIENT_FLAGS:
            raise usage_error(f"client flags are sent after the greeting, not in state {self.state.value}")
        flags = ClientFlag(0)
        if self.server_flags & HandshakeFlag.FIXED_NEWSTYLE:
            flags |= ClientFlag.FIXED_NEWSTYLE
        if self._want_no_zeroes and self.server_flags & HandshakeFlag.NO_ZEROES:
            flags |= ClientFlag.NO_ZEROES
        self.client_flags_sent = flags
        self.state = HandshakeState.OPTIONS
        return CLIENT_FLAGS.pack(flags)

    def send_option(self, option: OptionRequest) -> bytes:
        """The bytes of *option*; its replies arrive as events from ``receive_data``."""
        if self.state is not HandshakeState.OPTIONS:
            raise usage_error(f"an option cannot be sent in state {self.state.value}")
        fixed = bool(self.client_flags_sent & ClientFlag.FIXED_NEWSTYLE)
        if not fixed and not isinstance(option, ExportNameOption):
            raise usage_error("the server does not speak fixed newstyle: NBD_OPT_EXPORT_NAME is the only option")
        body = option.encode()
        self._pending = option
        self._infos = []
        self._contexts = {}
        self.state = HandshakeState.OPTION_PENDING
        return OPTION_HEADER.pack(OPTS_MAGIC, option.code, len(body)) + body

    def tls_established(self) -> None:
        """Say that TLS now wraps the connection: option haggling goes on (through TLS)."""
        if self.state is not HandshakeState.AWAIT_TLS:
            raise usage_error(f"no TLS upgrade is awaited in state {self.state.value}")
        self.state = HandshakeState.OPTIONS

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Take received bytes; returns the events they complete."""
        if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
            raise usage_error(f"the handshake is over (state {self.state.value}): data goes elsewhere")
        if self.state is HandshakeState.AWAIT_TLS and data:
            raise self._violation("plain-text data after the STARTTLS acknowledgement")
        self._buffer.feed(data)
        events: list[ClientEvent] = []
        while True:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
            if self.state is HandshakeState.AWAIT_TLS and len(self._buffer):
                # Bytes behind the ACK were sent before TLS: an attacker's injection.
                raise self._violation("plain-text data after the STARTTLS acknowledgement")
        if self.state in (HandshakeState.CLIENT_FLAGS, HandshakeState.OPTIONS) and len(self._buffer):
            # The server speaks only when spoken to: these bytes answer nothing.
            raise self._violation(f"{len(self._buffer)} unsolicited bytes")
        return events

    def _violation(self, problem: str, offset: int | None = None) -> ProtocolError:
        return ProtocolError(problem, offset=self._buffer.position if offset is None else offset, sender="server")

    def _next_event(self) -> ClientEvent | None:
        if self.state is HandshakeState.GREETING:
            return self._greeting()
        if self.state is HandshakeState.OPTION_PENDING:
            if isinstance(self._pending, ExportNameOption):
                return self._export_name_reply()
            return self._option_reply()
        return None  # nothing is expected: bytes wait (transmission's, or a violation found later)

    def _greeting(self) -> ClientEvent | None:
        start = self._buffer.position
        header = self._buffer.take(GREETING.size)
        if header is None:
            return None
        passwd, magic, flags = GREETING.unpack(header)
        if passwd != INIT_PASSWD:
            raise self._violation(f"greeting starts with {passwd:#018x}, not NBDMAGIC", start)
        if magic == CLISERV_MAGIC:
            raise self._violation("oldstyle negotiation is not supported", start + 8)
        if magic != OPTS_MAGIC:
            raise self._violation(f"greeting magic {magic:#018x} is not IHAVEOPT", start + 8)
        # Unknown handshake flags are ignored, as the protocol asks of clients.
        self.server_flags = HandshakeFlag(flags & (HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        self.state = HandshakeState.CLIENT_FLAGS
        return ServerGreeting(flags=self.server_flags)

    def _export_name_reply(self) -> ClientEvent | None:
        length = EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else EXPORT_NAME_ZEROES)
        reply = self._buffer.take(length)
        if reply is None:
            return None
        size, flags = EXPORT_NAME_REPLY.unpack_from(reply)
        assert isinstance(self._pending, ExportNameOption)
        self.export = ExportDetails(size=size, flags=TransmissionFlag(flags), name=self._pending.name)
        self._pending = None
        self.state = HandshakeState.TRANSMISSION
        return TransmissionReady(export=self.export)

    def _option_reply(self) -> ClientEvent | None:
        if self._reply_header is None:
            # The header is checked before the body is awaited: a bad length must not make us buffer.
            start = self._buffer.position
            header = self._buffer.take(REPLY_HEADER.size)
            if header is None:
                return None
            magic, option, reply, length = REPLY_HEADER.unpack(header)
            assert self._pending is not None
            if magic != OPTION_REPLY_MAGIC:
                raise self._violation(f"option reply magic {magic:#x} is wrong", start)
            if option != self._pending.code:
                raise self._violation(f"reply to option {option} while option {self._pending.code} is pending", start)
            if length > self._max_reply_length:
                raise self._violation(
                    f"option reply of {length} bytes exceeds the limit {self._max_reply_length}", start
                )
            self._reply_header = (self._pending.code, reply, length, start)
        option, reply, length, start = self._reply_header
        body = self._buffer.take(length)
        if body is None:
            return None
        self._reply_header = None
        try:
            return self._reply_event(option, reply, body)
        except MalformedPayloadError as error:
            raise self._violation(str(error), start) from None

    def _reply_event(self, option: int, reply: int, body: bytes) -> ClientEvent:
        pending = self._pending
        assert pending is not None
        if reply & (1 << 31):
            message = decode_string(body, "error message")
            known = reply in OptionReply._value2member_map_
            failed = OptionFailed(option=option, reply=OptionReply(reply) if known else reply, message=message)
            return self._final(failed)
        if reply == OptionReply.ACK:
            if body:
                raise MalformedPayloadError(f"NBD_REP_ACK carries {len(body)} bytes")
            return self._acknowledged(pending)
        if reply == OptionReply.SERVER and isinstance(pending, ListOption):
            if len(body) < 4:
                raise MalformedPayloadError("NBD_REP_SERVER is shorter than its name length")
            (name_length,) = _U32.unpack_from(body)
            if name_length > len(body) - 4:
                raise MalformedPayloadError(f"NBD_REP_SERVER name length {name_length} exceeds the reply")
            name = decode_string(body[4 : 4 + name_length], "export name")
            description = decode_string(body[4 + name_length :], "export description")
            return ExportListed(name=name, description=description)
        if reply == OptionReply.INFO and isinstance(pending, InfoOption):
            info = decode_info(body)
            self._infos.append(info)
            return InfoReceived(option=option, info=info)
        if reply == OptionReply.META_CONTEXT and isinstance(pending, ListMetaContextOption):
            if len(body) < 5:
                raise MalformedPayloadError("NBD_REP_META_CONTEXT has no context name")
            (context_id,) = _U32.unpack_from(body)
            name = decode_string(body[4:], "metadata context name")
            if isinstance(pending, SetMetaContextOption):
                if context_id in self._contexts:
                    raise MalformedPayloadError(f"metadata context id {context_id} given twice")
                self._contexts[context_id] = name
            return MetaContextReceived(option=option, context_id=context_id, name=name)
        raise MalformedPayloadError(f"reply type {reply:#x} is not a valid reply to option {option}")

    def _final(self, event: ClientEvent) -> ClientEvent:
        self._pending = None
        self.state = HandshakeState.OPTIONS
        return event

    def _acknowledged(self, pending: OptionRequest) -> ClientEvent:
        if isinstance(pending, GoOption):
            exports = [info for info in self._infos if isinstance(info, ExportInfo)]
            if not exports:
                raise MalformedPayloadError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            names = [info.name for info in self._infos if isinstance(info, NameInfo)]
            descriptions = [info.description for info in self._infos if isinstance(info, DescriptionInfo)]
            sizes = [info.block_size for info in self._infos if isinstance(info, BlockSizeInfo)]
            self.export = ExportDetails(
                size=exports[-1].size,
                flags=exports[-1].flags,
                name=names[-1] if names else pending.name,
                description=descriptions[-1] if descriptions else None,
                block_size=sizes[-1] if sizes else None,
            )
            self._pending = None
            self.state = HandshakeState.TRANSMISSION
            return TransmissionReady(export=self.export)
        if isinstance(pending, StartTLSOption):
            self._pending = None
            self.state = HandshakeState.AWAIT_TLS
            return StartTLS()
        if isinstance(pending, AbortOption):
            self._pending = None
            self.state = HandshakeState.CLOSED
            return OptionAcknowledged(option=pending.code)
        if isinstance(pending, StructuredReplyOption):
            self.structured_replies = True
        if isinstance(pending, SetMetaContextOption):
            self.meta_contexts = dict(self._contexts)
        return self._final(OptionAcknowledged(option=pending.code))
