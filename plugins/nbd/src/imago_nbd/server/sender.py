"""``SocketSender``: replies written with ``sendmsg`` straight from their buffers, never copied.

asyncio's socket transport copies whatever the socket does not take at once into its own
buffer; a READ reply is megabytes, a socket takes a few hundred KiB. The sender keeps the
reply's buffers (views, no copy) queued instead and writes them as the socket drains, header and
data in one ``sendmsg``. Each reply may carry a callback run once it is wholly sent (its
buffer can then be reused). The transport still reads; only writing goes around it.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["SocketSender"]

_IOV_MAX = 1024


class SocketSender:
    """Writes to *sock* (non-blocking) in order; *on_error* is called once if the socket fails.

    *high* is the queued size above which :meth:`wait_writable` makes senders wait.
    """

    def __init__(
        self, sock: socket.socket, *, on_error: Callable[[OSError], None], high: int = 8 * 1024 * 1024
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._on_error = on_error
        self._high = high
        self._queue: deque[memoryview] = deque()
        self._queued = 0  # bytes accepted, in total
        self._sent = 0  # bytes sent, in total
        self._callbacks: deque[tuple[int, Callable[[], None]]] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._drained: list[asyncio.Future[None]] = []
        self._watching = False
        self.broken = False

    @property
    def pending(self) -> int:
        """Bytes accepted and not yet sent."""
        return self._queued - self._sent

    def send(self, parts: Sequence[bytes | bytearray | memoryview], done: Callable[[], None] | None = None) -> None:
        """Send *parts* after what is queued; call *done* once they are all sent (or dropped)."""
        if self.broken:
            if done is not None:
                done()
            return
        size = 0
        for part in parts:
            size += len(part)
        self._queued += size
        if not self._queue:
            sent = self._sendmsg(parts)
            if sent < 0:
                if done is not None:
                    done()
                return
            self._sent += sent
            if sent == size:
                if done is not None:
                    done()
                return
            for part in parts:
                length = len(part)
                if sent >= length:
                    sent -= length
                    continue
                self._queue.append(memoryview(part)[sent:])
                sent = 0
        else:
            self._queue.extend(memoryview(part) for part in parts)
        if done is not None:
            self._callbacks.append((self._queued, done))
        if not self._watching:
            self._watching = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _sendmsg(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        try:
            return self._sock.sendmsg(parts[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as error:
            self._fail(error)
            return -1

    def _write_ready(self) -> None:
        queue = self._queue
        while queue:
            parts = list(itertools.islice(queue, _IOV_MAX))
            sent = self._sendmsg(parts)
            if sent < 0:
                return
            if not sent:
                break
            self._sent += sent
            while sent:
                head = queue[0]
                if sent >= len(head):
                    sent -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[sent:]
                    sent = 0
        callbacks = self._callbacks
        while callbacks and callbacks[0][0] <= self._sent:
            callbacks.popleft()[1]()
        if not queue:
            self._stop_watching()
            self._wake(self._drained)
        if self.pending <= self._high:
            self._wake(self._waiters)

    def _stop_watching(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_writer(self._fd)

    def _fail(self, error: OSError) -> None:
        self.broken = True
        self.close()
        self._on_error(error)

    @staticmethod
    def _wake(futures: list[asyncio.Future[None]]) -> None:
        for future in futures:
            if not future.done():
                future.set_result(None)
        futures.clear()

    async def wait_writable(self) -> None:
        """Wait while more than *high* bytes are queued."""
        if self.pending > self._high and not self.broken:
            future = self._loop.create_future()
            self._waiters.append(future)
            await future

    async def drained(self) -> None:
        """Wait until everything queued is sent (or the socket failed)."""
        if self._queue and not self.broken:
            future = self._loop.create_future()
            self._drained.append(future)
            await future

    def close(self) -> None:
        """Stop writing: drop what is queued (running its callbacks), wake every waiter, close the socket."""
        self._stop_watching()
        self._queue.clear()
        while self._callbacks:
            self._callbacks.popleft()[1]()
        self._wake(self._waiters)
        self._wake(self._drained)
        self.broken = True
        self._sock.close()
