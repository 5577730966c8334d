"""``ServerHandshake``: the server side of the fixed newstyle handshake, sans I/O.

It takes received bytes through ``receive_data`` (in fragments of any size) and returns the
events they complete; ``greeting`` and the ``reply_*`` methods return the bytes to send. The
next option is decoded only after the final reply to the previous one. After the handshake
enters transmission, ``trailing_data`` holds any bytes received past its end, for the request
decoder.
"""

from __future__ import annotations

import struct

from .buffer import ReceiveBuffer
from .constants import (
    DEFAULT_MAX_OPTION_LENGTH,
    EXPORT_NAME_ZEROES,
    INIT_PASSWD,
    OPTION_REPLY_MAGIC,
    OPTS_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Option,
    OptionReply,
    TransmissionFlag,
)
from .errors import ProtocolError
from .handshake import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    KNOWN_CLIENT_FLAGS,
    OPTION_HEADER,
    REPLY_HEADER,
    ClientFlagsReceived,
    HandshakeState,
    InvalidOptionReceived,
    OptionReceived,
    ServerEvent,
    usage_error,
)
from .options import (
    ExportInfo,
    Info,
    MalformedPayloadError,
    OptionRequest,
    decode_option,
    encode_string,
)

__all__ = ["ServerHandshake"]

_U32 = struct.Struct(">I")


class ServerHandshake:
    """The server side of the fixed newstyle handshake.

    ``flags`` are the handshake flags offered (fixed newstyle is always offered);
    ``max_option_length`` caps an option's body: a longer one is a protocol violation.
    """

    def __init__(
        self,
        *,
        flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
        max_option_length: int = DEFAULT_MAX_OPTION_LENGTH,
    ) -> None:
        self._buffer = ReceiveBuffer()
        self.flags = HandshakeFlag(flags) | HandshakeFlag.FIXED_NEWSTYLE
        self._max_option_length = max_option_length
        self.state = HandshakeState.GREETING
        #: The client's flags, once received.
        self.client_flags = ClientFlag(0)
        #: The option awaiting its final reply.
        self.pending: OptionRequest | int | None = None
        #: Whether the server acknowledged NBD_OPT_STRUCTURED_REPLY.
        self.structured_replies = False
        #: Metadata contexts the last acknowledged SET_META_CONTEXT selected, by id.
        self.meta_contexts: dict[int, str] = {}
        self._contexts: dict[int, str] = {}
        self._sent_export_info = False
        self._header: tuple[int, int, int] | None = None  # number, length, stream offset

    @property
    def no_zeroes(self) -> bool:
        """Whether EXPORT_NAME's reply drops its 124 zero bytes."""
        return bool(self.client_flags & ClientFlag.NO_ZEROES)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the handshake (for the request decoder); removed when read."""
        return self._buffer.take_all()

    def greeting(self) -> bytes:
        """The server's greeting: the first bytes on the connection."""
        if self.state is not HandshakeState.GREETING:
            raise usage_error("the greeting is sent once, first")
        self.state = HandshakeState.CLIENT_FLAGS
        return GREETING.pack(INIT_PASSWD, OPTS_MAGIC, self.flags)

    def tls_established(self) -> None:
        """Say that TLS now wraps the connection: option haggling goes on (through TLS)."""
        if self.state is not HandshakeState.AWAIT_TLS:
            raise usage_error(f"no TLS upgrade is awaited in state {self.state.value}")
        self.state = HandshakeState.OPTIONS

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        """Take received bytes; returns the events they complete."""
        if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
            raise usage_error(f"the handshake is over (state {self.state.value}): data goes elsewhere")
        if self.state is HandshakeState.AWAIT_TLS and data:
            raise self._violation("plain-text data after the STARTTLS acknowledgement")
        self._buffer.feed(data)
        events: list[ServerEvent] = []
        while True:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
        if self.state is HandshakeState.OPTION_PENDING and len(self._buffer) > self._max_option_length:
            # A client sends nothing while an option is pending, bar a pipelined start of
            # transmission; more than an option's worth is a flood, not a protocol.
            raise self._violation(f"{len(self._buffer)} bytes sent without waiting for the option's reply")
        return events

    def _violation(self, problem: str, offset: int | None = None) -> ProtocolError:
        return ProtocolError(problem, offset=self._buffer.position if offset is None else offset, sender="client")

    def _next_event(self) -> ServerEvent | None:
        if self.state is HandshakeState.CLIENT_FLAGS:
            return self._client_flags()
        if self.state is HandshakeState.OPTIONS:
            return self._option()
        return None

    def _client_flags(self) -> ServerEvent | None:
        start = self._buffer.position
        raw = self._buffer.take(CLIENT_FLAGS.size)
        if raw is None:
            return None
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise self._violation(f"unknown client flags {flags & ~KNOWN_CLIENT_FLAGS:#x}", start)
        if flags & ClientFlag.NO_ZEROES and not self.flags & HandshakeFlag.NO_ZEROES:
            raise self._violation("client flag NO_ZEROES without the server's offer", start)
        self.client_flags = ClientFlag(flags)
        self.state = HandshakeState.OPTIONS
        return ClientFlagsReceived(flags=self.client_flags)

    def _option(self) -> ServerEvent | None:
        start = self._buffer.position
        if self._header is None:
            header = self._buffer.take(OPTION_HEADER.size)
            if header is None:
                return None
            magic, number, length = OPTION_HEADER.unpack(header)
            if magic != OPTS_MAGIC:
                raise self._violation(f"option magic {magic:#018x} is not IHAVEOPT", start)
            if length > self._max_option_length:
                limit = self._max_option_length
                raise self._violation(f"option {number} of {length} bytes exceeds the limit {limit}", start)
            self._header = (number, length, start)
        return self._option_body()

    def _option_body(self) -> ServerEvent | None:
        assert self._header is not None
        number, length, start = self._header
        body = self._buffer.take(length)
        if body is None:
            return None
        self._header = None
        fixed = bool(self.client_flags & ClientFlag.FIXED_NEWSTYLE)
        if not fixed and number != Option.EXPORT_NAME:
            raise self._violation(f"option {number} without fixed newstyle", start)
        self.state = HandshakeState.OPTION_PENDING
        self._contexts = {}
        self._sent_export_info = False
        try:
            option = decode_option(number, body)
        except MalformedPayloadError as error:
            if number == Option.EXPORT_NAME:
                # EXPORT_NAME has no error reply: the session ends.
                raise self._violation(str(error), start) from None
            self.pending = number
            return InvalidOptionReceived(option=number, problem=str(error))
        self.pending = option
        return OptionReceived(option=option)

    # --- replies --------------------------------------------------------------------------

    def _pending_code(self) -> int:
        if self.state is not HandshakeState.OPTION_PENDING or self.pending is None:
            raise usage_error(f"no option awaits a reply (state {self.state.value})")
        return self.pending if isinstance(self.pending, int) else self.pending.code

    def _reply(self, reply: int, body: bytes = b"") -> bytes:
        return REPLY_HEADER.pack(OPTION_REPLY_MAGIC, self._pending_code(), reply, len(body)) + body

    def _done(self, state: HandshakeState) -> None:
        self.pending = None
        self.state = state

    def reply_ack(self) -> bytes:
        """``NBD_REP_ACK``: the final, successful reply (GO enters transmission, STARTTLS awaits TLS)."""
        code = self._pending_code()
        if code == Option.EXPORT_NAME:
            raise usage_error("NBD_OPT_EXPORT_NAME is answered by reply_export_name")
        if code == Option.GO and not self._sent_export_info:
            raise usage_error("NBD_OPT_GO's success needs an NBD_INFO_EXPORT reply first")
        data = self._reply(OptionReply.ACK)
        if code == Option.GO:
            self._done(HandshakeState.TRANSMISSION)
        elif code == Option.STARTTLS:
            if len(self._buffer):
                # Bytes the client sent behind STARTTLS were never encrypted: not to be trusted.
                raise self._violation("plain-text data after NBD_OPT_STARTTLS")
            self._done(HandshakeState.AWAIT_TLS)
        elif code == Option.ABORT:
            self._done(HandshakeState.CLOSED)
        else:
            if code == Option.STRUCTURED_REPLY:
                self.structured_replies = True
            elif code == Option.SET_META_CONTEXT:
                self.meta_contexts = dict(self._contexts)
            self._done(HandshakeState.OPTIONS)
        return data

    def reply_error(self, reply: OptionReply | int, message: str = "") -> bytes:
        """An error reply (*reply* with bit 31 set) with an optional *message*: the final reply."""
        if not reply & (1 << 31):
            raise usage_error(f"reply type {reply:#x} is not an error")
        if self._pending_code() == Option.EXPORT_NAME:
            raise usage_error("NBD_OPT_EXPORT_NAME cannot fail with a reply: close the connection")
        data = self._reply(reply, encode_string(message, "error message"))
        self._done(HandshakeState.OPTIONS)
        return data

    def reply_server(self, name: str, description: str = "") -> bytes:
        """One ``NBD_REP_SERVER`` reply to ``NBD_OPT_LIST`` (not final)."""
        if self._pending_code() != Option.LIST:
            raise usage_error("NBD_REP_SERVER answers NBD_OPT_LIST only")
        raw = encode_string(name, "export name")
        return self._reply(OptionReply.SERVER, _U32.pack(len(raw)) + raw + encode_string(description, "description"))

    def reply_info(self, info: Info) -> bytes:
        """One ``NBD_REP_INFO`` reply to ``NBD_OPT_INFO``/``NBD_OPT_GO`` (not final)."""
        if self._pending_code() not in (Option.INFO, Option.GO):
            raise usage_error("NBD_REP_INFO answers NBD_OPT_INFO and NBD_OPT_GO only")
        if isinstance(info, ExportInfo):
            self._sent_export_info = True
        return self._reply(OptionReply.INFO, info.encode())

    def reply_meta_context(self, context_id: int, name: str) -> bytes:
        """One ``NBD_REP_META_CONTEXT`` reply to LIST/SET_META_CONTEXT (not final)."""
        code = self._pending_code()
        if code not in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            raise usage_error("NBD_REP_META_CONTEXT answers the META_CONTEXT options only")
        if not name:
            raise usage_error("a metadata context has a name")
        if code == Option.SET_META_CONTEXT:
            if context_id in self._contexts:
                raise usage_error(f"metadata context id {context_id} is already used")
            self._contexts[context_id] = name
        return self._reply(OptionReply.META_CONTEXT, _U32.pack(context_id) + encode_string(name, "context name"))

    def reply_export_name(self, size: int, flags: TransmissionFlag) -> bytes:
        """The short reply to ``NBD_OPT_EXPORT_NAME``: size, flags, and the zeroes unless NO_ZEROES."""
        if self._pending_code() != Option.EXPORT_NAME:
            raise usage_error("the export-name reply answers NBD_OPT_EXPORT_NAME only")
        self._done(HandshakeState.TRANSMISSION)
        zeroes = b"" if self.no_zeroes else bytes(EXPORT_NAME_ZEROES)
        return EXPORT_NAME_REPLY.pack(size, flags) + zeroes
