"""Connecting to an NBD server: the socket, the fixed newstyle handshake (blocking), TLS.

The handshake runs on a blocking socket with a timeout (the ``timeout`` driver option); the
transmission phase then switches it to non-blocking mode (see :mod:`.connection`).
"""

from __future__ import annotations

import socket
import ssl

import attrs

from ..block_size import DEFAULT_BLOCK_SIZE, BlockSize
from ..client_handshake import ClientHandshake
from ..constants import HandshakeFlag, InfoType, OptionReply, TransmissionFlag
from ..errors import NbdConnectionError, ProtocolError
from ..handshake import (
    ClientEvent,
    ExportDetails,
    MetaContextReceived,
    OptionAcknowledged,
    OptionFailed,
    ServerGreeting,
    StartTLS,
    TransmissionReady,
)
from ..options import (
    ExportNameOption,
    GoOption,
    OptionRequest,
    SetMetaContextOption,
    StartTLSOption,
    StructuredReplyOption,
)
from .tls import client_context
from .uri import NbdAddress

__all__ = ["BASE_ALLOCATION", "Negotiated", "negotiate"]

#: The metadata context whose block status the client asks for.
BASE_ALLOCATION = "base:allocation"
_FINAL = (OptionAcknowledged, OptionFailed, StartTLS, TransmissionReady)


@attrs.frozen(kw_only=True)
class Negotiated:
    """A socket in transmission phase and what the handshake agreed on."""

    sock: socket.socket
    export: ExportDetails
    structured: bool
    #: The id of ``base:allocation`` (``None``: block status unavailable).
    allocation_context: int | None
    block_size: BlockSize
    #: Bytes the server sent past the handshake (normally none).
    trailing: bytes


def _connect(address: NbdAddress, timeout: float) -> socket.socket:
    try:
        if address.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert address.host is not None
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except TimeoutError:
        raise NbdConnectionError(address.uri, f"connecting timed out after {timeout} s") from None
    except OSError as error:
        raise NbdConnectionError(address.uri, f"cannot connect: {error.strerror or error}") from None


class _Exchange:
    """Drives a :class:`ClientHandshake` over a blocking socket."""

    def __init__(self, address: NbdAddress, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.handshake = ClientHandshake()

    def fail(self, reason: str) -> NbdConnectionError:
        return NbdConnectionError(self.address.uri, reason)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, final: tuple[type, ...]) -> list[ClientEvent]:
        """Receive until an event of a *final* type; returns every event up to it."""
        events: list[ClientEvent] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise self.fail("the server closed the connection during the handshake")
            events += self.handshake.receive_data(data)
            if events and isinstance(events[-1], final):
                return events

    def option(self, option: OptionRequest) -> list[ClientEvent]:
        """Send *option*; its replies up to the final one. A TLS demand becomes a clear error."""
        self.send(self.handshake.send_option(option))
        events = self.until(_FINAL)
        last = events[-1]
        if isinstance(last, OptionFailed) and last.reply == OptionReply.ERR_TLS_REQD:
            raise self.fail("the server requires TLS: use an nbds:// or nbds+unix:// URI")
        return events


def negotiate(address: NbdAddress, *, timeout: float, tls_certificates: str | None) -> Negotiated:
    """Connect to *address* and run the handshake into transmission on its export (blocking)."""
    sock = _connect(address, timeout)
    try:
        return _negotiate(address, sock, timeout=timeout, tls_certificates=tls_certificates)
    except BaseException:
        sock.close()
        raise


def _negotiate(address: NbdAddress, sock: socket.socket, *, timeout: float, tls_certificates: str | None) -> Negotiated:
    exchange = _Exchange(address, sock)
    handshake = exchange.handshake
    try:
        greeting = exchange.until((ServerGreeting,))[-1]
        assert isinstance(greeting, ServerGreeting)
        exchange.send(handshake.client_flags())
        fixed = bool(greeting.flags & HandshakeFlag.FIXED_NEWSTYLE)
        if address.tls:
            if not fixed:
                raise exchange.fail("the server does not speak fixed newstyle, so it cannot do TLS")
            last = exchange.option(StartTLSOption())[-1]
            if not isinstance(last, StartTLS):
                message = last.message if isinstance(last, OptionFailed) else ""
                raise exchange.fail(f"the server refused TLS{': ' + message if message else ''}")
            tls_context = client_context(
                tls_certificates,
                check_hostname=address.tls_hostname is not None,
                verify_peer=address.tls_verify_peer,
            )
            try:
                sock = tls_context.wrap_socket(sock, server_hostname=address.tls_hostname)
            except ssl.SSLError as error:
                raise exchange.fail(f"TLS handshake failed: {error}") from None
            exchange.sock = sock
            handshake.tls_established()
        if not fixed:
            return _export_name(exchange, structured=False, context=None)
        structured = isinstance(exchange.option(StructuredReplyOption())[-1], OptionAcknowledged)
        context = None
        if structured:
            events = exchange.option(SetMetaContextOption(export=address.export, queries=(BASE_ALLOCATION,)))
            if isinstance(events[-1], OptionAcknowledged):
                for event in events:
                    if isinstance(event, MetaContextReceived) and event.name == BASE_ALLOCATION:
                        context = event.context_id
        events = exchange.option(GoOption(name=address.export, requests=(InfoType.BLOCK_SIZE,)))
        last = events[-1]
        if isinstance(last, OptionFailed):
            if last.reply == OptionReply.ERR_UNSUP:
                # An old server without NBD_OPT_GO: the export's name alone, as before GO existed.
                return _export_name(exchange, structured=structured, context=context)
            if last.reply == OptionReply.ERR_UNKNOWN:
                detail = f" ({last.message})" if last.message else ""
                raise exchange.fail(f"the server has no export named {address.export!r}{detail}")
            name = OptionReply(last.reply).name if last.reply in OptionReply._value2member_map_ else hex(last.reply)
            raise exchange.fail(f"the server refused export {address.export!r}: {name} {last.message}".rstrip())
        assert isinstance(last, TransmissionReady)
        return _finish(exchange, last.export, structured, context)
    except TimeoutError:
        raise exchange.fail(f"the handshake timed out after {timeout} s") from None
    except (NbdConnectionError, ProtocolError):
        raise
    except OSError as error:
        raise exchange.fail(f"the connection broke during the handshake: {error.strerror or error}") from None


def _export_name(exchange: _Exchange, *, structured: bool, context: int | None) -> Negotiated:
    exchange.send(exchange.handshake.send_option(ExportNameOption(name=exchange.address.export)))
    try:
        ready = exchange.until((TransmissionReady,))[-1]
    except NbdConnectionError:
        raise exchange.fail(
            f"the server closed the connection on export {exchange.address.export!r} (no such export?)"
        ) from None
    assert isinstance(ready, TransmissionReady)
    return _finish(exchange, ready.export, structured, context)


def _finish(exchange: _Exchange, export: ExportDetails, structured: bool, context: int | None) -> Negotiated:
    flags = export.flags
    if not flags & TransmissionFlag.HAS_FLAGS:
        flags = TransmissionFlag.HAS_FLAGS  # flags without HAS_FLAGS mean nothing
        export = attrs.evolve(export, flags=flags)
    return Negotiated(
        sock=exchange.sock,
        export=export,
        structured=structured,
        allocation_context=context if structured else None,
        block_size=export.block_size or DEFAULT_BLOCK_SIZE,
        trailing=exchange.handshake.trailing_data,
    )
