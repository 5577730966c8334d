"""The NBD errors: a peer's protocol violation, a server's error reply, a broken connection."""

from __future__ import annotations

import os

from imago import ImagoError

__all__ = ["NbdConnectionError", "NbdServerError", "ProtocolError"]


class ProtocolError(ImagoError, ValueError):
    """The peer sent something the NBD protocol does not allow; the connection cannot go on.

    ``problem`` says what was wrong, ``offset`` is the position in the received byte stream
    (counted from the decoder's first byte) of the message that was wrong, ``sender`` is
    ``"server"`` or ``"client"``: who sent it.
    """

    def __init__(self, problem: str, *, offset: int | None = None, sender: str | None = None) -> None:
        self.problem = problem
        self.offset = offset
        self.sender = sender
        where = ""
        if sender is not None:
            where = f" from the {sender}"
        if offset is not None:
            where += f" at stream offset {offset}"
        super().__init__(f"NBD protocol violation{where}: {problem}")


class NbdServerError(ImagoError, OSError):
    """The server answered a request with an error.

    ``uri`` names the export, ``errno`` is the host error number for the server's wire error
    value (``EIO``, ``ENOSPC``, ...), ``message`` the server's own text (may be empty),
    ``command`` the request's command name, ``offset`` and ``length`` its range (``offset`` is the
    server's ERROR_OFFSET when it gave one).
    """

    def __init__(self, uri: str, error: int, message: str, *, command: str, offset: int, length: int) -> None:
        self.uri = uri
        self.message = message
        self.command = command
        self.offset = offset
        self.length = length
        reason = os.strerror(error)
        text = f"{uri}: {command} at offset {offset} length {length} failed: {reason}"
        if message:
            text += f" ({message})"
        ImagoError.__init__(self, text)
        self.errno = error
        self.strerror = text

    def __str__(self) -> str:
        return str(self.args[0])


class NbdConnectionError(ImagoError, ConnectionError):
    """The connection to the server failed, broke or was refused: ``uri`` names the export, ``reason`` says why."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        ImagoError.__init__(self, f"{uri}: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])
