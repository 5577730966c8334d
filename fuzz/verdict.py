"""What counts as a finding: the acceptable outcomes of a fuzz input, and the per-input guards.

An input is fine when the target returns or raises an :class:`imago.ImagoError` (errors caused
by image content must be those), or an OS error of a kind the target documents (a full storage).
Anything else, an input running past the time guard, a file growing past the file size cap, or a
``MemoryError`` (the address-space cap :func:`limit_memory` sets) is a finding.
"""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from imago import ImagoError

__all__ = [
    "DEFAULT_FILE_SIZE_LIMIT",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_TIME_LIMIT",
    "DataMismatch",
    "FileTooLarge",
    "InputTimeout",
    "Verdict",
    "acceptable",
    "file_size_cap",
    "judge",
    "limit_memory",
    "time_guard",
]

#: Seconds one input may run before it is a finding ("a hang over a few seconds").
DEFAULT_TIME_LIMIT = 10
#: Address space of a fuzz process (``RLIMIT_AS``): the interpreter, imago, atheris and a fuzzed
#: image's allocations. A header that makes imago allocate past it raises ``MemoryError``: a finding.
DEFAULT_MEMORY_LIMIT = 3 << 30
#: Largest file a fuzz process may write (``RLIMIT_FSIZE``): the command line targets' tmpfs images.
#: A small input that makes imago grow a file past it is a finding, as memory past the cap is.
DEFAULT_FILE_SIZE_LIMIT = 1 << 30


class InputTimeout(BaseException):  # a BaseException: no `except Exception` swallows it
    """The input ran longer than the time guard allows."""


class FileTooLarge(BaseException):  # a BaseException, like InputTimeout
    """A file grew past the fuzz process's file size cap."""


class DataMismatch(AssertionError):  # noqa: N818 -- reads like the finding it is
    """The disk read back differs from what the operation sequence wrote (a data-corruption finding)."""


Target = Callable[[bytes], None]


def acceptable(error: BaseException, allowed_os_errors: frozenset[int] = frozenset()) -> bool:
    """Whether *error* is an acceptable outcome: an ImagoError, or an OS error whose errno is allowed."""
    if isinstance(error, ImagoError):
        return True
    return isinstance(error, OSError) and error.errno in allowed_os_errors


class Verdict:
    """The outcome of one input: ``finding`` is the unacceptable exception, ``None`` when fine."""

    __slots__ = ("finding", "outcome")

    def __init__(self, outcome: BaseException | None, finding: BaseException | None) -> None:
        self.outcome = outcome
        self.finding = finding

    @property
    def ok(self) -> bool:
        """Whether the input ended acceptably."""
        return self.finding is None

    def __repr__(self) -> str:
        return f"Verdict(outcome={self.outcome!r}, finding={self.finding!r})"


@contextlib.contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`InputTimeout` in the main thread if the block runs longer than *seconds*.

    For in-process replays; under atheris libFuzzer's ``-timeout`` does this job.
    """

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise InputTimeout(f"the input ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def judge(
    target: Target,
    data: bytes,
    *,
    allowed_os_errors: frozenset[int] = frozenset(),
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> Verdict:
    """Run *target* on *data* and classify what happened (a guarded in-process run for replays).

    *time_limit* (seconds, ``None``: none) needs the main thread (it uses ``SIGALRM``).
    """
    guard = time_guard(time_limit) if time_limit is not None else contextlib.nullcontext()
    try:
        with guard, file_size_cap(DEFAULT_FILE_SIZE_LIMIT):
            target(data)
    except (Exception, InputTimeout, FileTooLarge) as error:  # every outcome is classified, none escapes
        if acceptable(error, allowed_os_errors):
            return Verdict(error, None)
        return Verdict(error, error)
    return Verdict(None, None)


@contextlib.contextmanager
def file_size_cap(limit: int) -> Iterator[None]:
    """Lower this process's file size limit (``RLIMIT_FSIZE``, soft) for the block, then restore it.

    A write or truncation past it raises :class:`FileTooLarge` (from the ``SIGXFSZ`` it causes,
    so that code catching the ``OSError(EFBIG)`` of the write does not hide it), as libFuzzer
    reports "file size exceeded" under the engine. Main thread only.
    """

    def exceeded(_signum: int, _frame: FrameType | None) -> None:
        raise FileTooLarge(f"a file grew past {limit} bytes")

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    previous = signal.signal(signal.SIGXFSZ, exceeded)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def limit_memory(limit: int = DEFAULT_MEMORY_LIMIT, file_size: int = DEFAULT_FILE_SIZE_LIMIT) -> None:
    """Cap this process's address space (``RLIMIT_AS``) and the files it writes (``RLIMIT_FSIZE``).

    Allocations past the first raise ``MemoryError``; writes or truncations past the second fail
    with ``OSError(EFBIG)`` (Python ignores ``SIGXFSZ``). Neither is an acceptable outcome.
    """
    for kind, value in ((resource.RLIMIT_AS, limit), (resource.RLIMIT_FSIZE, file_size)):
        _soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, hard))
