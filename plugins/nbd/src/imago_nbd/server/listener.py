"""``NbdServer`` and :func:`serve`: listening for NBD clients of one export.

The server accepts on a Unix socket or a TCP address, at most *max_clients* at once (more wait
in the listen backlog until one leaves, as with qemu-nbd's ``--shared``), and runs each client
as a :class:`~imago_nbd.server.connection.Connection`. Closing stops accepting, lets every
connection answer the requests it has in flight, closes the connections and removes the Unix
socket; the image stays open (it belongs to the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from types import TracebackType

from imago import FormatAccess, InvalidRequestError

from .connection import Connection
from .export import Export

__all__ = ["DEFAULT_PORT", "SHUTDOWN_TIMEOUT", "NbdServer", "serve"]

log = logging.getLogger("imago_nbd.server")

#: The NBD port (IANA), qemu-nbd's default.
DEFAULT_PORT = 10809
#: Seconds :meth:`NbdServer.close` lets clients take their last replies before cutting them off.
SHUTDOWN_TIMEOUT = 30.0
#: The send buffer asked for on Unix sockets (the system caps it at net.core.wmem_max).
_UNIX_SEND_BUFFER = 4 * 1024 * 1024


class NbdServer:
    """An NBD server of one :class:`Export`; start it with :meth:`start` or ``async with``.

    *persistent* false makes :meth:`serve_forever` return once the last client has left (after
    at least one came), as qemu-nbd does without ``--persistent``.
    """

    def __init__(
        self,
        export: Export,
        *,
        unix_socket: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        tls: ssl.SSLContext | None = None,
        max_clients: int = 0,
        persistent: bool = True,
    ) -> None:
        if unix_socket is not None and (host is not None or port is not None):
            raise InvalidRequestError("serve on a Unix socket or on a TCP address, not both")
        if max_clients < 0:
            raise InvalidRequestError(f"max_clients must be 0 (no limit) or more, not {max_clients}")
        if port is not None and not 0 <= port <= 65535:
            raise InvalidRequestError(f"port {port} is not a TCP port")
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise InvalidRequestError("tls must be an ssl.SSLContext for the server side")
        self.export = export
        self.unix_socket = None if unix_socket is None else os.fspath(unix_socket)
        self.host = host
        self.port = port
        self.tls = tls
        self.max_clients = max_clients
        self.persistent = persistent
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[Connection] = set()
        self._slot: asyncio.Event | None = None
        self._served = False
        self._done: asyncio.Future[None] | None = None
        self._closing = False
        self._accepted = 0

    # --- facts --------------------------------------------------------------------------------

    @property
    def address(self) -> str | tuple[str, int]:
        """Where the server listens: the socket's path, or (host, port) with the port bound."""
        if self._listener is None:
            raise InvalidRequestError("the server is not started")
        if self.unix_socket is not None:
            return self.unix_socket
        name = self._listener.getsockname()
        return (name[0], name[1])

    @property
    def uri(self) -> str:
        """An NBD URI of the export (``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``)."""
        scheme = "nbds" if self.tls is not None else "nbd"
        address = self.address
        name = self.export.name
        if isinstance(address, str):
            return f"{scheme}+unix:///{name}?socket={address}"
        host = address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{address[1]}/{name}"

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return len(self._connections)

    # --- life ---------------------------------------------------------------------------------

    async def start(self) -> NbdServer:
        """Bind and listen; returns once clients can connect."""
        if self._listener is not None:
            raise InvalidRequestError("the server is already started")
        loop = asyncio.get_running_loop()
        self._listener = self._bind()
        self._slot = asyncio.Event()
        self._slot.set()
        self._done = loop.create_future()
        self._accepting = loop.create_task(self._accept_loop())
        log.info("listening on %s", self.uri)
        return self

    def _bind(self) -> socket.socket:
        if self.unix_socket is not None:
            path = self.unix_socket
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket, as QEMU replaces it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                sock.listen(128)
            except OSError:
                sock.close()
                raise
        else:
            host = "0.0.0.0" if self.host is None else self.host
            port = DEFAULT_PORT if self.port is None else self.port
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(128)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        return sock

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        slot = self._slot
        assert listener is not None
        assert slot is not None
        while not self._closing:
            await slot.wait()
            try:
                client, peer = await loop.sock_accept(listener)
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of resources: try again shortly
                    continue
                raise
            if self._closing:
                client.close()
                break
            if client.family == socket.AF_UNIX:
                # Room for whole READ replies: fewer partial sends and wake-ups (TCP tunes its own).
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SEND_BUFFER)
            else:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted += 1
            name = str(peer) if peer else f"client {self._accepted}"
            connection = Connection(self.export, tls=self.tls, on_close=self._connection_closed, peer=name)
            self._connections.add(connection)
            self._served = True
            if self.max_clients and len(self._connections) >= self.max_clients:
                slot.clear()  # the next client waits in the backlog
            log.info("%s: connected (%d clients)", name, len(self._connections))
            try:
                await loop.connect_accepted_socket(_factory(connection), client)
            except OSError as error:
                log.info("%s: could not set up the connection: %s", name, error)
                client.close()
                self._connection_closed(connection)

    def _connection_closed(self, connection: Connection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        log.info("%s: disconnected (%d clients)", connection.peer, len(self._connections))
        if self._slot is not None and (not self.max_clients or len(self._connections) < self.max_clients):
            self._slot.set()
        if not self.persistent and self._served and not self._connections:
            self.stop()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` (or, not persistent, until the last client has left)."""
        if self._done is None:
            await self.start()
        assert self._done is not None
        accepting = self._accepting
        assert accepting is not None
        # The accept loop failing (the listening socket broken) ends serving too.
        waiters: set[asyncio.Future[None]] = {self._done, accepting}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if accepting.done() and not accepting.cancelled() and accepting.exception() is not None:
            raise accepting.exception()  # type: ignore[misc]

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (e.g. from a signal handler); :meth:`close` still follows."""
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def close(self) -> None:
        """Stop accepting, answer the requests in flight, close every connection, remove the socket."""
        if self._closing:
            return
        self._closing = True
        self.stop()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            if self.unix_socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.unix_socket)
        connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        if connections:
            finished = {connection.finished for connection in connections}
            _, late = await asyncio.wait(finished, timeout=SHUTDOWN_TIMEOUT)
            if late:
                # Clients that stopped reading their replies: cut them off (requests in flight
                # on the image still finish).
                for connection in connections:
                    if not connection.finished.done():
                        connection.abort()
                await asyncio.wait(late)

    async def __aenter__(self) -> NbdServer:
        """Start serving."""
        if self._listener is None:
            await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Close the server (not the image)."""
        await self.close()


def _factory(connection: Connection) -> Callable[[], Connection]:
    return lambda: connection


def serve(
    access: FormatAccess,
    *,
    unix_socket: str | os.PathLike[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    export_name: str = "",
    description: str = "",
    read_only: bool = False,
    allocation_depth: bool = False,
    discard: bool = False,
    tls: ssl.SSLContext | None = None,
    max_clients: int = 0,
    persistent: bool = True,
) -> NbdServer:
    """An NBD server of the open image *access* (not started: ``async with`` or ``await start()``).

    Serves on the Unix socket *unix_socket*, or on TCP *host*/*port* (default all addresses,
    port 10809; port 0 picks a free one, see :attr:`NbdServer.address`). The export is named
    *export_name* (default ``""``) with *description*; *read_only* refuses writes (an image
    opened read-only is always served read-only); *allocation_depth* offers the
    ``qemu:allocation-depth`` metadata context; *discard* lets TRIM free space; *tls* (a server
    :class:`ssl.SSLContext`, see :func:`imago_nbd.server.tls.server_context`) makes TLS
    mandatory; *max_clients* caps simultaneous clients (0: no cap; with 1, multi-conn is not
    advertised). The image stays the
    caller's: closing the server never closes it (flush and close it afterwards). Example::

        async with imago_nbd.server.serve(access, unix_socket="/tmp/disk.sock") as server:
            await server.serve_forever()
    """
    export = Export(
        access,
        name=export_name,
        description=description,
        read_only=read_only,
        allocation_depth=allocation_depth,
        discard=discard,
        multi_conn=max_clients != 1,
    )
    return NbdServer(
        export,
        unix_socket=unix_socket,
        host=host,
        port=port,
        tls=tls,
        max_clients=max_clients,
        persistent=persistent,
    )
