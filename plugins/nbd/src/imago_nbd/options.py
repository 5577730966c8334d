"""Option requests and option-reply payloads of the fixed newstyle handshake: values and codecs.

Every class here is one message body; the 16-byte option header and the 20-byte option-reply
header are framed by :mod:`imago_nbd.handshake`. Decoders raise :class:`MalformedPayloadError` for a
body the protocol does not allow; the state machines turn that into the fitting answer (an
``ERR_INVALID`` reply on the server, a :class:`~imago_nbd.errors.ProtocolError` on the client).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import ClassVar, cast

import attrs

from .block_size import BlockSize
from .constants import MAX_STRING_LENGTH, InfoType, Option, TransmissionFlag

__all__ = [
    "AbortOption",
    "BlockSizeInfo",
    "DescriptionInfo",
    "ExportInfo",
    "ExportNameOption",
    "GoOption",
    "Info",
    "InfoOption",
    "ListMetaContextOption",
    "ListOption",
    "MalformedPayloadError",
    "NameInfo",
    "OptionRequest",
    "SetMetaContextOption",
    "StartTLSOption",
    "StructuredReplyOption",
    "UnknownInfo",
    "UnknownOption",
    "decode_info",
    "decode_option",
    "decode_string",
    "encode_string",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_EXPORT = struct.Struct(">HQH")  # info type, size, transmission flags
_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum


class MalformedPayloadError(Exception):
    """A message body breaks the protocol's layout rules; the message says how."""


def encode_string(text: str, what: str) -> bytes:
    """*text* as UTF-8, checked against the protocol's string rules (``ValueError`` naming *what*)."""
    raw = text.encode()
    if len(raw) > MAX_STRING_LENGTH:
        raise ValueError(f"{what} is {len(raw)} bytes long, more than the protocol's {MAX_STRING_LENGTH}")
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL character")
    return raw


def decode_string(raw: bytes, what: str) -> str:
    """A protocol string from *raw*: at most 4096 bytes of UTF-8 without NUL."""
    if len(raw) > MAX_STRING_LENGTH:
        raise MalformedPayloadError(f"{what} is {len(raw)} bytes long, more than {MAX_STRING_LENGTH}")
    if b"\0" in raw:
        raise MalformedPayloadError(f"{what} contains a NUL byte")
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise MalformedPayloadError(f"{what} is not UTF-8: {error.reason} at byte {error.start}") from None


def _name_field(text: str, what: str) -> bytes:
    """A 32-bit length followed by the string."""
    raw = encode_string(text, what)
    return _U32.pack(len(raw)) + raw


class _Reader:
    """Reads fields off an option body; running out is a :class:`MalformedPayloadError`."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def bytes(self, length: int, field: str) -> bytes:
        if length > len(self.data) - self.pos:
            raise MalformedPayloadError(f"{self.what}: {field} needs {length} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self.bytes(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self.bytes(4, field))[0]
        return value

    def string(self, field: str) -> str:
        length = self.u32(f"length of {field}")
        if length > MAX_STRING_LENGTH:
            raise MalformedPayloadError(f"{self.what}: {field} length {length} exceeds {MAX_STRING_LENGTH}")
        return decode_string(self.bytes(length, field), f"{self.what}: {field}")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedPayloadError(f"{self.what}: {len(self.data) - self.pos} bytes left over")


# --- option requests (client -> server) -----------------------------------------------------


@attrs.frozen(kw_only=True)
class _NoData:
    """An option without a body; a body sent anyway is malformed."""

    code: ClassVar[Option]

    def encode(self) -> bytes:
        """The option's body (none)."""
        return b""

    @classmethod
    def _decode(cls, data: bytes) -> _NoData:
        if data:
            raise MalformedPayloadError(f"NBD_OPT_{cls.code.name} carries {len(data)} bytes of data, it takes none")
        return cls()


@attrs.frozen(kw_only=True)
class ExportNameOption:
    """``NBD_OPT_EXPORT_NAME``: enter transmission on *name* (no option reply; the short export reply)."""

    code: ClassVar[Option] = Option.EXPORT_NAME
    name: str = ""

    def encode(self) -> bytes:
        """The option's body: the bare name."""
        return encode_string(self.name, "export name")

    @classmethod
    def _decode(cls, data: bytes) -> ExportNameOption:
        return cls(name=decode_string(data, "NBD_OPT_EXPORT_NAME: export name"))


@attrs.frozen(kw_only=True)
class AbortOption(_NoData):
    """``NBD_OPT_ABORT``: end the session softly."""

    code: ClassVar[Option] = Option.ABORT


@attrs.frozen(kw_only=True)
class ListOption(_NoData):
    """``NBD_OPT_LIST``: list the exports (``NBD_REP_SERVER`` replies, then an ACK)."""

    code: ClassVar[Option] = Option.LIST


@attrs.frozen(kw_only=True)
class StartTLSOption(_NoData):
    """``NBD_OPT_STARTTLS``: upgrade the connection to TLS after the ACK."""

    code: ClassVar[Option] = Option.STARTTLS


@attrs.frozen(kw_only=True)
class StructuredReplyOption(_NoData):
    """``NBD_OPT_STRUCTURED_REPLY``: use structured replies in transmission."""

    code: ClassVar[Option] = Option.STRUCTURED_REPLY


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _transmission_flags(value: int) -> TransmissionFlag:
    return TransmissionFlag(value)


def _info_requests(value: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(InfoType(item) if item in InfoType._value2member_map_ else item for item in value)


@attrs.frozen(kw_only=True)
class InfoOption:
    """``NBD_OPT_INFO``: describe export *name*; *requests* lists the information types wanted."""

    code: ClassVar[Option] = Option.INFO
    name: str = ""
    requests: tuple[int, ...] = attrs.field(default=(), converter=_info_requests)

    def encode(self) -> bytes:
        """The option's body: name, request count, requested information types."""
        if len(self.requests) > 0xFFFF:
            raise ValueError(f"{len(self.requests)} information requests do not fit the 16-bit count")
        count = _U16.pack(len(self.requests))
        return _name_field(self.name, "export name") + count + b"".join(_U16.pack(item) for item in self.requests)

    @classmethod
    def _decode(cls, data: bytes) -> InfoOption:
        reader = _Reader(data, f"NBD_OPT_{cls.code.name}")
        name = reader.string("export name")
        count = reader.u16("number of information requests")
        requests = tuple(reader.u16("information request") for _ in range(count))
        reader.end()
        return cls(name=name, requests=requests)


@attrs.frozen(kw_only=True)
class GoOption(InfoOption):
    """``NBD_OPT_GO``: like ``NBD_OPT_INFO``, then enter transmission on the ACK."""

    code: ClassVar[Option] = Option.GO


@attrs.frozen(kw_only=True)
class ListMetaContextOption:
    """``NBD_OPT_LIST_META_CONTEXT``: the metadata contexts of *export* matching *queries*."""

    code: ClassVar[Option] = Option.LIST_META_CONTEXT
    export: str = ""
    queries: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def encode(self) -> bytes:
        """The option's body: export name, query count, queries."""
        fields = [_name_field(self.export, "export name"), _U32.pack(len(self.queries))]
        fields += [_name_field(query, "metadata context query") for query in self.queries]
        return b"".join(fields)

    @classmethod
    def _decode(cls, data: bytes) -> ListMetaContextOption:
        reader = _Reader(data, f"NBD_OPT_{cls.code.name}")
        export = reader.string("export name")
        count = reader.u32("number of queries")
        # Each query takes at least its 4-byte length: a count the body cannot hold is malformed
        # before any list is built for it.
        if count > (len(data) - reader.pos) // 4:
            raise MalformedPayloadError(f"NBD_OPT_{cls.code.name}: {count} queries do not fit the option's length")
        queries = tuple(reader.string("metadata context query") for _ in range(count))
        reader.end()
        return cls(export=export, queries=queries)


@attrs.frozen(kw_only=True)
class SetMetaContextOption(ListMetaContextOption):
    """``NBD_OPT_SET_META_CONTEXT``: select the metadata contexts of *export* matching *queries*."""

    code: ClassVar[Option] = Option.SET_META_CONTEXT


@attrs.frozen(kw_only=True)
class UnknownOption:
    """An option this codec does not know; a server answers it ``NBD_REP_ERR_UNSUP``."""

    number: int
    data: bytes = b""

    @property
    def code(self) -> int:
        """The option number."""
        return self.number

    def encode(self) -> bytes:
        """The option's body, as given."""
        return self.data


OptionRequest = (
    ExportNameOption
    | AbortOption
    | ListOption
    | StartTLSOption
    | StructuredReplyOption
    | InfoOption
    | GoOption
    | ListMetaContextOption
    | SetMetaContextOption
    | UnknownOption
)

_OPTION_CLASSES: dict[int, type[ExportNameOption | _NoData | InfoOption | ListMetaContextOption]] = {
    Option.EXPORT_NAME: ExportNameOption,
    Option.ABORT: AbortOption,
    Option.LIST: ListOption,
    Option.STARTTLS: StartTLSOption,
    Option.STRUCTURED_REPLY: StructuredReplyOption,
    Option.INFO: InfoOption,
    Option.GO: GoOption,
    Option.LIST_META_CONTEXT: ListMetaContextOption,
    Option.SET_META_CONTEXT: SetMetaContextOption,
}


def decode_option(number: int, data: bytes) -> OptionRequest:
    """The option *number* with body *data*; :class:`MalformedPayloadError` when the body is wrong."""
    cls = _OPTION_CLASSES.get(number)
    if cls is None:
        return UnknownOption(number=number, data=data)
    # Every class in the table is a member of the union (_NoData only through its subclasses).
    return cast(OptionRequest, cls._decode(data))


# --- information replies (NBD_REP_INFO bodies) ----------------------------------------------


@attrs.frozen(kw_only=True)
class ExportInfo:
    """``NBD_INFO_EXPORT``: the export's size and transmission flags."""

    size: int
    flags: TransmissionFlag = attrs.field(converter=_transmission_flags)

    def encode(self) -> bytes:
        """The reply body."""
        return _EXPORT.pack(InfoType.EXPORT, self.size, self.flags)


@attrs.frozen(kw_only=True)
class NameInfo:
    """``NBD_INFO_NAME``: the export's canonical name."""

    name: str

    def encode(self) -> bytes:
        """The reply body."""
        return _U16.pack(InfoType.NAME) + encode_string(self.name, "export name")


@attrs.frozen(kw_only=True)
class DescriptionInfo:
    """``NBD_INFO_DESCRIPTION``: a description of the export for people."""

    description: str

    def encode(self) -> bytes:
        """The reply body."""
        return _U16.pack(InfoType.DESCRIPTION) + encode_string(self.description, "export description")


@attrs.frozen(kw_only=True)
class BlockSizeInfo:
    """``NBD_INFO_BLOCK_SIZE``: the export's block-size constraints."""

    block_size: BlockSize

    def encode(self) -> bytes:
        """The reply body."""
        size = self.block_size
        return _BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, size.minimum, size.preferred, size.maximum)


@attrs.frozen(kw_only=True)
class UnknownInfo:
    """An information type this codec does not know (clients ignore it)."""

    info_type: int
    data: bytes = b""

    def encode(self) -> bytes:
        """The reply body."""
        return _U16.pack(self.info_type) + self.data


Info = ExportInfo | NameInfo | DescriptionInfo | BlockSizeInfo | UnknownInfo


def decode_info(data: bytes) -> Info:
    """The body of an ``NBD_REP_INFO`` reply; :class:`MalformedPayloadError` when it is wrong."""
    if len(data) < 2:
        raise MalformedPayloadError(f"NBD_REP_INFO body of {len(data)} bytes has no information type")
    (info_type,) = _U16.unpack_from(data)
    if info_type == InfoType.EXPORT:
        if len(data) != _EXPORT.size:
            raise MalformedPayloadError(f"NBD_INFO_EXPORT is {len(data)} bytes, not {_EXPORT.size}")
        _, size, flags = _EXPORT.unpack(data)
        return ExportInfo(size=size, flags=flags)
    if info_type == InfoType.NAME:
        return NameInfo(name=decode_string(data[2:], "NBD_INFO_NAME"))
    if info_type == InfoType.DESCRIPTION:
        return DescriptionInfo(description=decode_string(data[2:], "NBD_INFO_DESCRIPTION"))
    if info_type == InfoType.BLOCK_SIZE:
        if len(data) != _BLOCK_SIZE.size:
            raise MalformedPayloadError(f"NBD_INFO_BLOCK_SIZE is {len(data)} bytes, not {_BLOCK_SIZE.size}")
        _, minimum, preferred, maximum = _BLOCK_SIZE.unpack(data)
        try:
            return BlockSizeInfo(block_size=BlockSize(minimum=minimum, preferred=preferred, maximum=maximum))
        except ValueError as error:
            raise MalformedPayloadError(f"NBD_INFO_BLOCK_SIZE: {error}") from None
    return UnknownInfo(info_type=info_type, data=data[2:])
