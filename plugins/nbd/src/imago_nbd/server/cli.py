"""``imago serve``: qemu-nbd's everyday options, serving one image over NBD.

Defaults are qemu-nbd's: TCP on 0.0.0.0 port 10809 (``-k`` for a Unix socket), export name
``""``, one client at a time (``-e``), exit after the last client leaves unless ``-t``,
``--discard=ignore``, ``--cache=writeback``. ``--fork`` returns once the server listens.
TLS: ``--object tls-creds-x509,id=ID,dir=DIR,endpoint=server`` with ``--tls-creds ID`` as
qemu-nbd, or simply ``--tls-creds DIR``. SIGTERM, SIGINT and SIGHUP stop the server cleanly:
no new clients, requests in flight answered, the image flushed and closed, the socket removed,
exit status 0.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from imago import ImagoError

if TYPE_CHECKING:
    import ssl

    from imago import FormatAccess, ImplicitOpenGate

# The server's modules (asyncio, ssl, sockets) are imported when ``imago serve`` runs, not
# when the plugin registers the command.

__all__ = ["HELP", "ServeError", "configure", "run"]

HELP = "serve a disk image over NBD (as qemu-nbd does)"

_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_DISCARD = {"ignore": False, "off": False, "unmap": True, "on": True}


class ServeError(ImagoError):
    """``imago serve`` cannot start: a bad option (named in the message) or an image that cannot be served."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``imago serve``'s arguments (qemu-nbd's names)."""

    def usage_error(message: str) -> NoReturn:
        raise ServeError(f"serve: {message}")

    parse_known_args = parser.parse_known_args

    def parse_all(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = parse_known_args(args, namespace)
        if extras:
            usage_error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    # Usage errors the imago way: one line naming the option, exit status 1.
    parser.error = usage_error  # type: ignore[method-assign]
    parser.parse_known_args = parse_all  # type: ignore[method-assign,assignment]
    parser.add_argument("-f", "--format", metavar="FMT", help="the image's format (default: probed)")
    parser.add_argument("-r", "--read-only", action="store_true", help="export the disk read-only")
    parser.add_argument("-x", "--export-name", default="", metavar="NAME", help='the export\'s name (default "")')
    parser.add_argument("-D", "--description", default="", metavar="DESC", help="the export's description")
    parser.add_argument("-k", "--socket", metavar="PATH", help="listen on the Unix socket PATH")
    parser.add_argument("-b", "--bind", metavar="ADDR", help="the address to listen on (default 0.0.0.0)")
    parser.add_argument("-p", "--port", metavar="PORT", help="the TCP port (default 10809)")
    parser.add_argument(
        "-e", "--shared", default="1", metavar="NUM", help="clients served at once (default 1; 0: no limit)"
    )
    parser.add_argument(
        "-t", "--persistent", action="store_true", help="keep serving after the last client disconnects"
    )
    parser.add_argument("--fork", action="store_true", help="return once the server listens; serve in background")
    parser.add_argument("--pid-file", metavar="PATH", help="write the server's process id to PATH")
    parser.add_argument(
        "-A", "--allocation-depth", action="store_true", help="offer the qemu:allocation-depth metadata context"
    )
    parser.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="SPEC",
        help="tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off] (repeatable)",
    )
    parser.add_argument(
        "--tls-creds", metavar="ID|DIR", help="require TLS with the --object named ID, or with the certificates in DIR"
    )
    parser.add_argument("--cache", choices=_CACHE_MODES, help="cache mode (default writeback)")
    parser.add_argument("-n", "--nocache", action="store_true", help="same as --cache=none")
    parser.add_argument(
        "--discard", choices=sorted(_DISCARD), default="ignore", help="whether TRIM frees space (default ignore)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")
    group = parser.add_argument_group("implicit opens")
    group.add_argument(
        "--allow-dir",
        dest="allow_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="also let the image open files in DIR (default: only its own directory)",
    )
    group.add_argument("--allow-any", action="store_true", help="let the image open any file it names (trusted only)")
    parser.add_argument("image", metavar="IMAGE", help="the image file")


class _Settings(NamedTuple):  # not attrs: loading the plugin must stay cheap
    image: str
    format: str | None
    read_only: bool
    export_name: str
    description: str
    unix_socket: str | None
    host: str | None
    port: int | None
    shared: int
    persistent: bool
    fork: bool
    pid_file: str | None
    allocation_depth: bool
    tls: ssl.SSLContext | None
    direct: bool
    no_flush: bool
    writethrough: bool
    discard: bool
    verbose: bool
    gate: ImplicitOpenGate


def _number(text: str, option: str, low: int, high: int) -> int:
    from imago import InvalidOptionError

    try:
        value = int(text, 10)
    except ValueError:
        raise InvalidOptionError(option, f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise InvalidOptionError(option, f"{value} is not between {low} and {high}")
    return value


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    from imago import InvalidOptionError

    from .tls import TlsCredentials, parse_object, server_context

    objects: dict[str, TlsCredentials] = {}
    for spec in args.object:
        credentials = parse_object(spec)
        if credentials.id in objects:
            raise InvalidOptionError("--object", f"id {credentials.id!r} is defined twice")
        objects[credentials.id] = credentials
    name = args.tls_creds
    if name is None:
        return None
    if name in objects:
        credentials = objects[name]
    elif os.path.isdir(name):
        credentials = TlsCredentials(id=name, directory=name)
    else:
        raise InvalidOptionError("--tls-creds", f"{name!r} is neither an --object id nor a directory")
    if credentials.endpoint != "server":
        raise InvalidOptionError("--tls-creds", f"object {credentials.id!r} has endpoint=client; a server needs server")
    return server_context(credentials.directory, verify_peer=credentials.verify_peer)


def _settings(args: argparse.Namespace) -> _Settings:
    from imago import InvalidOptionError, PermissiveImplicitOpenGate, SandboxImplicitOpenGate

    if args.socket is not None and (args.bind is not None or args.port is not None):
        raise InvalidOptionError("--socket", "cannot be combined with --bind or --port")
    port = None if args.port is None else _number(args.port, "--port", 0, 65535)
    shared = _number(args.shared, "--shared", 0, 1 << 20)
    if len(args.export_name.encode("utf-8", "surrogateescape")) > 4096:
        raise InvalidOptionError("--export-name", "longer than 4096 bytes")
    if len(args.description.encode("utf-8", "surrogateescape")) > 4096:
        raise InvalidOptionError("--description", "longer than 4096 bytes")
    cache = "none" if args.nocache else args.cache or "writeback"
    if args.nocache and args.cache not in (None, "none"):
        raise InvalidOptionError("--nocache", f"contradicts --cache={args.cache}")
    image = args.image
    if args.allow_any:
        gate: ImplicitOpenGate = PermissiveImplicitOpenGate()
    else:
        directories = {os.path.dirname(os.path.realpath(image)) or "."}
        directories.update(os.path.realpath(directory) for directory in args.allow_dirs)
        gate = SandboxImplicitOpenGate(sorted(directories))
    return _Settings(
        image=image,
        format=args.format,
        read_only=args.read_only,
        export_name=args.export_name,
        description=args.description,
        unix_socket=args.socket,
        host=args.bind,
        port=port,
        shared=shared,
        persistent=args.persistent,
        fork=args.fork,
        pid_file=args.pid_file,
        allocation_depth=args.allocation_depth,
        tls=_tls(args),
        direct=cache in ("none", "directsync"),
        no_flush=cache == "unsafe",
        writethrough=cache in ("writethrough", "directsync"),
        discard=_DISCARD[args.discard],
        verbose=args.verbose,
        gate=gate,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``imago serve``; 0 after a clean shutdown."""
    import asyncio
    import logging
    import sys

    settings = _settings(args)
    if settings.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("imago serve: %(message)s"))
        logger = logging.getLogger("imago_nbd.server")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if settings.fork:
        return _fork(settings)
    return asyncio.run(_serve(settings, None))


async def _open(settings: _Settings) -> FormatAccess:
    from imago import ImplicitOpenDeniedError, open_async

    try:
        return await open_async(
            settings.image,
            settings.format,
            write=not settings.read_only,
            gate=settings.gate,
            direct=settings.direct,
            no_flush=settings.no_flush,
        )
    except ImplicitOpenDeniedError as error:
        raise ServeError(
            f"Could not open '{settings.image}': {error} (allow it with --allow-dir DIR or --allow-any)"
        ) from None
    except OSError as error:
        if isinstance(error, ImagoError) or not error.strerror:
            raise ServeError(f"Could not open '{settings.image}': {error}") from None
        raise ServeError(f"Could not open '{settings.image}': {error.strerror}") from None
    except ImagoError as error:
        raise ServeError(f"Could not open '{settings.image}': {error}") from None


async def _serve(settings: _Settings, ready: Callable[[], None] | None) -> int:
    import asyncio
    import contextlib
    import signal

    from .export import Export
    from .listener import DEFAULT_PORT, NbdServer

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    access = await _open(settings)
    try:
        export = Export(
            access,
            name=settings.export_name,
            description=settings.description,
            read_only=settings.read_only,
            allocation_depth=settings.allocation_depth,
            discard=settings.discard,
            writethrough=settings.writethrough,
            multi_conn=settings.shared != 1,
        )
        server = NbdServer(
            export,
            unix_socket=settings.unix_socket,
            host=settings.host,
            port=settings.port,
            tls=settings.tls,
            max_clients=settings.shared,
            persistent=settings.persistent,
        )
        try:
            await server.start()
        except OSError as error:
            where = settings.unix_socket or f"{settings.host or '0.0.0.0'}:{settings.port or DEFAULT_PORT}"
            raise ServeError(f"cannot listen on {where}: {error.strerror or error}") from None
        loop = asyncio.get_running_loop()
        for number in signals:
            loop.add_signal_handler(number, server.stop)
        try:
            if settings.pid_file is not None:
                # Whole or not at all: a reader never sees an empty file.
                partial = f"{settings.pid_file}.{os.getpid()}.tmp"
                with open(partial, "w", encoding="ascii") as file:
                    file.write(f"{os.getpid()}\n")
                os.replace(partial, settings.pid_file)
            if ready is not None:
                ready()
            await server.serve_forever()
        finally:
            await server.close()
            for number in signals:
                loop.remove_signal_handler(number)
            if settings.pid_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(settings.pid_file)
    finally:
        await access.close()
    return 0


def _fork(settings: _Settings) -> int:
    """qemu-nbd's ``--fork``: the parent returns once the child listens (or reports its error)."""
    import asyncio

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        message = b"".join(chunks).decode("utf-8", "replace")
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        raise ServeError(message or "the server process failed to start")
    os.close(read_end)
    os.setsid()

    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)
        # Leave the caller's terminal and pipes: whoever waits for their end must not wait for us.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if settings.verbose else (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    started = False

    def ready_once() -> None:
        nonlocal started
        started = True
        ready()

    try:
        status = asyncio.run(_serve(settings, ready_once))
    except (ImagoError, OSError) as error:
        if not started:
            os.write(write_end, str(error).encode("utf-8", "replace") or b"error")
            os.close(write_end)
        os._exit(1)
    os._exit(status)
