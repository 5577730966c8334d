"""imago-nbd: the Network Block Device protocol.

- The ``nbd`` storage driver (:class:`Nbd`, :mod:`imago_nbd.client`): images on NBD exports,
  opened from URIs (``nbd://``, ``nbd+unix://``, ``nbds://``, ``nbds+unix://``).
- The server (:func:`serve`, :class:`NbdServer`, :mod:`imago_nbd.server`): an open image served
  to NBD clients; ``imago serve`` on the command line.
- The sans-I/O protocol codec both are built on: the fixed newstyle handshake as client and
  server state machines (:mod:`imago_nbd.client_handshake`, :mod:`imago_nbd.server_handshake`),
  option bodies (:mod:`imago_nbd.options`), requests and the server's request decoder
  (:mod:`imago_nbd.requests`), simple and structured replies and the client's reply decoder
  (:mod:`imago_nbd.replies`). Bytes in, events out, bytes to send returned.

Names are imported on first use: loading the plugin (every probe of an image's format does)
must not cost the codec's, the client's and the server's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .block_size import DEFAULT_BLOCK_SIZE, NO_MAXIMUM, BlockSize
    from .client import Nbd
    from .client_handshake import ClientHandshake
    from .constants import (
        URI_SCHEMES,
        ClientFlag,
        Command,
        CommandFlag,
        Errno,
        HandshakeFlag,
        InfoType,
        Option,
        OptionReply,
        ReplyFlag,
        ReplyType,
        StateFlag,
        TransmissionFlag,
        errno_from_nbd,
        nbd_from_errno,
    )
    from .errors import NbdConnectionError, NbdServerError, ProtocolError
    from .handshake import (
        ClientFlagsReceived,
        ExportDetails,
        ExportListed,
        HandshakeState,
        InfoReceived,
        InvalidOptionReceived,
        MetaContextReceived,
        OptionAcknowledged,
        OptionFailed,
        OptionReceived,
        ServerGreeting,
        StartTLS,
        TransmissionReady,
    )
    from .options import (
        AbortOption,
        BlockSizeInfo,
        DescriptionInfo,
        ExportInfo,
        ExportNameOption,
        GoOption,
        InfoOption,
        ListMetaContextOption,
        ListOption,
        NameInfo,
        SetMetaContextOption,
        StartTLSOption,
        StructuredReplyOption,
        UnknownInfo,
        UnknownOption,
    )
    from .replies import (
        BlockStatusChunk,
        ErrorChunk,
        NoneChunk,
        OffsetDataChunk,
        OffsetHoleChunk,
        ReplyDecoder,
        SimpleReply,
        block_status_chunk,
        error_chunk,
        none_chunk,
        offset_data_chunk,
        offset_data_header,
        offset_hole_chunk,
        simple_reply,
    )
    from .requests import OversizedRequest, Request, RequestDecoder, RequestReceived, encode_request, request_error
    from .server import NbdServer, serve
    from .server_handshake import ServerHandshake

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "NO_MAXIMUM",
    "URI_SCHEMES",
    "AbortOption",
    "BlockSize",
    "BlockSizeInfo",
    "BlockStatusChunk",
    "ClientFlag",
    "ClientFlagsReceived",
    "ClientHandshake",
    "Command",
    "CommandFlag",
    "DescriptionInfo",
    "Errno",
    "ErrorChunk",
    "ExportDetails",
    "ExportInfo",
    "ExportListed",
    "ExportNameOption",
    "GoOption",
    "HandshakeFlag",
    "HandshakeState",
    "InfoOption",
    "InfoReceived",
    "InfoType",
    "InvalidOptionReceived",
    "ListMetaContextOption",
    "ListOption",
    "MetaContextReceived",
    "NameInfo",
    "Nbd",
    "NbdConnectionError",
    "NbdServer",
    "NbdServerError",
    "NoneChunk",
    "OffsetDataChunk",
    "OffsetHoleChunk",
    "Option",
    "OptionAcknowledged",
    "OptionFailed",
    "OptionReceived",
    "OptionReply",
    "OversizedRequest",
    "ProtocolError",
    "ReplyDecoder",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "RequestDecoder",
    "RequestReceived",
    "ServerGreeting",
    "ServerHandshake",
    "SetMetaContextOption",
    "SimpleReply",
    "StartTLS",
    "StartTLSOption",
    "StateFlag",
    "StructuredReplyOption",
    "TransmissionFlag",
    "TransmissionReady",
    "UnknownInfo",
    "UnknownOption",
    "block_status_chunk",
    "encode_request",
    "errno_from_nbd",
    "error_chunk",
    "nbd_from_errno",
    "none_chunk",
    "offset_data_chunk",
    "offset_data_header",
    "offset_hole_chunk",
    "request_error",
    "serve",
    "simple_reply",
]

# Where each name lives.
_HOMES = {
    "DEFAULT_BLOCK_SIZE": "block_size",
    "NO_MAXIMUM": "block_size",
    "URI_SCHEMES": "constants",
    "AbortOption": "options",
    "BlockSize": "block_size",
    "BlockSizeInfo": "options",
    "BlockStatusChunk": "replies",
    "ClientFlag": "constants",
    "ClientFlagsReceived": "handshake",
    "ClientHandshake": "client_handshake",
    "Command": "constants",
    "CommandFlag": "constants",
    "DescriptionInfo": "options",
    "Errno": "constants",
    "ErrorChunk": "replies",
    "ExportDetails": "handshake",
    "ExportInfo": "options",
    "ExportListed": "handshake",
    "ExportNameOption": "options",
    "GoOption": "options",
    "HandshakeFlag": "constants",
    "HandshakeState": "handshake",
    "InfoOption": "options",
    "InfoReceived": "handshake",
    "InfoType": "constants",
    "InvalidOptionReceived": "handshake",
    "ListMetaContextOption": "options",
    "ListOption": "options",
    "MetaContextReceived": "handshake",
    "NameInfo": "options",
    "Nbd": "client",
    "NbdConnectionError": "errors",
    "NbdServer": "server",
    "NbdServerError": "errors",
    "NoneChunk": "replies",
    "OffsetDataChunk": "replies",
    "OffsetHoleChunk": "replies",
    "Option": "constants",
    "OptionAcknowledged": "handshake",
    "OptionFailed": "handshake",
    "OptionReceived": "handshake",
    "OptionReply": "constants",
    "OversizedRequest": "requests",
    "ProtocolError": "errors",
    "ReplyDecoder": "replies",
    "ReplyFlag": "constants",
    "ReplyType": "constants",
    "Request": "requests",
    "RequestDecoder": "requests",
    "RequestReceived": "requests",
    "ServerGreeting": "handshake",
    "ServerHandshake": "server_handshake",
    "SetMetaContextOption": "options",
    "SimpleReply": "replies",
    "StartTLS": "handshake",
    "StartTLSOption": "options",
    "StateFlag": "constants",
    "StructuredReplyOption": "options",
    "TransmissionFlag": "constants",
    "TransmissionReady": "handshake",
    "UnknownInfo": "options",
    "UnknownOption": "options",
    "block_status_chunk": "replies",
    "encode_request": "requests",
    "errno_from_nbd": "constants",
    "error_chunk": "replies",
    "nbd_from_errno": "constants",
    "none_chunk": "replies",
    "offset_data_chunk": "replies",
    "offset_data_header": "replies",
    "offset_hole_chunk": "replies",
    "request_error": "requests",
    "serve": "server",
    "simple_reply": "replies",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
