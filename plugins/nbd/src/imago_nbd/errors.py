"""The error a peer's protocol violation raises."""

from __future__ import annotations

from imago import ImagoError

__all__ = ["ProtocolError"]


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
