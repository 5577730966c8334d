"""The fixed newstyle handshake's shared parts: wire layouts, states and the events both state machines report.

The state machines are :class:`~imago_nbd.client_handshake.ClientHandshake` and
:class:`~imago_nbd.server_handshake.ServerHandshake`.
"""

from __future__ import annotations

import enum
import struct

import attrs

from imago import InvalidRequestError

from .block_size import BlockSize
from .constants import ClientFlag, HandshakeFlag, TransmissionFlag
from .options import Info, OptionRequest

__all__ = [
    "CLIENT_FLAGS",
    "EXPORT_NAME_REPLY",
    "GREETING",
    "KNOWN_CLIENT_FLAGS",
    "OPTION_HEADER",
    "REPLY_HEADER",
    "ClientEvent",
    "ClientFlagsReceived",
    "ExportDetails",
    "ExportListed",
    "HandshakeState",
    "InfoReceived",
    "InvalidOptionReceived",
    "MetaContextReceived",
    "OptionAcknowledged",
    "OptionFailed",
    "OptionReceived",
    "ServerEvent",
    "ServerGreeting",
    "StartTLS",
    "TransmissionReady",
    "usage_error",
]

GREETING = struct.Struct(">QQH")  # INIT_PASSWD, OPTS_MAGIC, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # OPTS_MAGIC, option, length
REPLY_HEADER = struct.Struct(">QIII")  # OPTION_REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_U32 = struct.Struct(">I")

#: The client flags this codec knows (a plain int: an IntFlag's complement drops unknown bits).
KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class HandshakeState(enum.Enum):
    """Where a handshake state machine stands."""

    GREETING = "greeting"  #: the server's greeting is next
    CLIENT_FLAGS = "client flags"  #: the client's flags are next
    OPTIONS = "options"  #: the client may send an option
    OPTION_PENDING = "option pending"  #: an option awaits its final reply
    AWAIT_TLS = "await TLS"  #: STARTTLS was acknowledged: TLS must be set up before anything else
    TRANSMISSION = "transmission"  #: the handshake is over
    CLOSED = "closed"  #: ABORT was acknowledged


# --- events -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ExportDetails:
    """What the handshake learnt about the export it entered transmission on."""

    size: int
    flags: TransmissionFlag
    name: str | None = None
    description: str | None = None
    block_size: BlockSize | None = None


@attrs.frozen(kw_only=True)
class ServerGreeting:
    """Client side: the server's greeting arrived; send ``client_flags()`` next."""

    flags: HandshakeFlag


@attrs.frozen(kw_only=True)
class OptionAcknowledged:
    """Client side: ``NBD_REP_ACK`` to *option* (its final reply)."""

    option: int


@attrs.frozen(kw_only=True)
class OptionFailed:
    """Client side: an error reply (*reply*, bit 31 set) to *option*, with the server's *message*."""

    option: int
    reply: int
    message: str


@attrs.frozen(kw_only=True)
class ExportListed:
    """Client side: one ``NBD_REP_SERVER`` reply to ``NBD_OPT_LIST``."""

    name: str
    description: str


@attrs.frozen(kw_only=True)
class InfoReceived:
    """Client side: one ``NBD_REP_INFO`` reply to ``NBD_OPT_INFO``/``NBD_OPT_GO``."""

    option: int
    info: Info


@attrs.frozen(kw_only=True)
class MetaContextReceived:
    """Client side: one ``NBD_REP_META_CONTEXT`` reply to a LIST/SET_META_CONTEXT option."""

    option: int
    context_id: int
    name: str


@attrs.frozen(kw_only=True)
class StartTLS:
    """Client side: STARTTLS was acknowledged: wrap the connection in TLS now, then call ``tls_established``."""


@attrs.frozen(kw_only=True)
class TransmissionReady:
    """Client side: the handshake is over (GO acknowledged, or EXPORT_NAME answered)."""

    export: ExportDetails


ClientEvent = (
    ServerGreeting
    | OptionAcknowledged
    | OptionFailed
    | ExportListed
    | InfoReceived
    | MetaContextReceived
    | StartTLS
    | TransmissionReady
)


@attrs.frozen(kw_only=True)
class ClientFlagsReceived:
    """Server side: the client's flags arrived (checked against the server's offer)."""

    flags: ClientFlag


@attrs.frozen(kw_only=True)
class OptionReceived:
    """Server side: an option arrived; answer it with the ``reply_*`` methods, ending with a final reply."""

    option: OptionRequest


@attrs.frozen(kw_only=True)
class InvalidOptionReceived:
    """Server side: an option whose body breaks the protocol; answer it ``reply_error(ERR_INVALID)``."""

    option: int
    problem: str


ServerEvent = ClientFlagsReceived | OptionReceived | InvalidOptionReceived


def usage_error(message: str) -> InvalidRequestError:
    """The error for local misuse of a state machine (not the peer's fault)."""
    return InvalidRequestError(message)
