"""cli_info and cli_check: ``imago info`` and ``imago check`` on the input written to a tmpfs file.

The command line opens files by name, so the input goes to a per-process directory under
``/dev/shm`` holding nothing else: the sandbox gate the commands use (the image's directory)
finds no file a crafted backing name could open but the image itself (a loop, refused).
The commands run in this process with ``--debug``, whose traceback printing is intercepted to
learn which exception a failing command caught: an :class:`imago.ImagoError`, or an OS error
about a file the image names (:data:`ALLOWED_OS_ERRORS`) is fine; anything else is a finding,
as is any exception escaping ``main``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from typing import Any

from imago.cli import main as imago_main

from ..verdict import acceptable

__all__ = [
    "ALLOWED_OS_ERRORS",
    "TMP_BASE",
    "CliFinding",
    "image_path",
    "process_directories",
    "remove_process_directories",
    "run_check",
    "run_info",
]

#: OS errors about a file the image names (a backing file missing from the sandbox directory, a
#: name too long for the file system): the gate documents them as passing through; and tmpfs
#: filling up. A file growing past the fuzz process's size cap (``EFBIG``) is not among them.
ALLOWED_OS_ERRORS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.ENOSPC}
)

_directory: str | None = None
#: Where the per-process directories go (tmpfs when there is one).
TMP_BASE = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def process_directories(pid: int) -> list[str]:
    """The image directories process *pid* made (libFuzzer ends processes without Python's atexit)."""
    prefix = f"imago-fuzz-{pid}-"
    return [os.path.join(TMP_BASE, name) for name in os.listdir(TMP_BASE) if name.startswith(prefix)]


def remove_process_directories(pid: int) -> None:
    """Remove what :func:`process_directories` lists."""
    for directory in process_directories(pid):
        shutil.rmtree(directory, ignore_errors=True)


class CliFinding(AssertionError):  # noqa: N818 -- reads like the finding it is
    """A command caught an exception that is not an acceptable outcome (the original is chained)."""


def image_path(data: bytes) -> str:
    """Write *data* to this process's tmpfs image file; returns its path."""
    global _directory  # one directory per process, made on first use
    if _directory is None:
        _directory = tempfile.mkdtemp(prefix=f"imago-fuzz-{os.getpid()}-", dir=TMP_BASE)
        atexit.register(shutil.rmtree, _directory, True)
    path = os.path.join(_directory, "disk.img")
    with open(path, "wb") as file:
        file.write(data)
    return path


@contextlib.contextmanager
def _caught_errors() -> Iterator[list[BaseException]]:
    """Record the exception ``main --debug`` prints a traceback for, instead of printing it."""
    caught: list[BaseException] = []
    original = traceback.print_exc

    def record(*_args: Any, **_kwargs: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            caught.append(error)

    traceback.print_exc = record
    try:
        yield caught
    finally:
        traceback.print_exc = original


def _imago(*args: str) -> int:
    """Run ``imago --debug ARGS`` in this process, output discarded; raise CliFinding for a bad caught error."""
    out, err = io.StringIO(), io.StringIO()
    with _caught_errors() as caught, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = imago_main(["--debug", *args])
    for error in caught:
        if not acceptable(error, ALLOWED_OS_ERRORS):
            raise CliFinding(f"imago {' '.join(args)}: {type(error).__name__}: {error}") from error
    if "Traceback (most recent call last)" in err.getvalue():
        raise CliFinding(f"imago {' '.join(args)} printed a traceback:\n{err.getvalue()}")
    return status


def run_info(data: bytes) -> None:
    """``imago info`` (human, then JSON with the backing chain) on *data* as qcow2."""
    path = image_path(data)
    _imago("info", "-f", "qcow2", path)
    _imago("info", "-f", "qcow2", "--output=json", "--backing-chain", path)


def run_check(data: bytes) -> None:
    """``imago check`` on *data* as qcow2; when it finds damage, ``check -r all`` and a check again."""
    path = image_path(data)
    status = _imago("check", "-f", "qcow2", "--output=json", path)
    if status in (2, 3):  # corruptions or leaks found
        _imago("check", "-f", "qcow2", "-r", "all", path)
        _imago("check", "-f", "qcow2", path)
