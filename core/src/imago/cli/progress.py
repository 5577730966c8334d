"""Progress reports of long subcommands: ``-p`` (a bar on a terminal) and ``--progress=json``.

A subcommand asks :func:`progress_for` for a :class:`Progress` and calls :meth:`Progress.update`
with the bytes done; what the user sees depends on the options:

- ``-p`` on a terminal: a tqdm bar on stderr (tqdm is imported only then);
- ``-p`` elsewhere: qemu-img's ``    (12.34/100%)`` lines;
- ``--progress=json``: one JSON object per line on stderr, ``{"phase": ..., "done": N,
  "total": N}``, at most ten a second plus the first and last of each phase, for programs
  driving the tool;
- neither: nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress", "add_progress", "progress_for"]


def add_progress(parser: argparse.ArgumentParser) -> None:
    """``-p`` and ``--progress=bar|json``."""
    parser.add_argument(
        "-p",
        dest="progress",
        action="store_const",
        const="bar",
        help="show progress (a bar on a terminal)",
    )
    parser.add_argument(
        "--progress",
        dest="progress",
        choices=("bar", "json"),
        help="show progress: bar (as -p) or json (one object per line on stderr: phase, done, total)",
    )


class Progress:
    """Reports of one operation: phases, each with a total in bytes; no output by default."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase = phase
        self.total = total
        self.done = 0

    def update(self, done: int) -> None:
        """*done* bytes of the current phase are finished."""
        self.done = done
        self._show(final=False)

    def advance(self, length: int) -> None:
        """*length* more bytes are finished."""
        self.update(self.done + length)

    def start(self, phase: str, total: int) -> None:
        """A new phase begins (the previous one ends)."""
        self._show(final=True)
        self.phase, self.total, self.done = phase, total, 0
        self._begin()

    def _begin(self) -> None:
        pass

    def _show(self, *, final: bool) -> None:
        pass

    def close(self) -> None:
        """The operation ended (successfully or not)."""
        self._show(final=True)

    def __enter__(self) -> Progress:
        self._begin()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


class _JsonProgress(Progress):
    def __init__(self, phase: str, total: int, stream: TextIO) -> None:
        super().__init__(phase, total)
        self._stream = stream
        self._last = 0.0
        self._shown: tuple[str, int] | None = None

    def _begin(self) -> None:
        self._emit()

    def _show(self, *, final: bool) -> None:
        now = time.monotonic()
        if final or now - self._last >= 0.1:
            self._emit()

    def _emit(self) -> None:
        if self._shown == (self.phase, self.done):
            return
        self._shown = (self.phase, self.done)
        self._last = time.monotonic()
        import json  # here: only --progress=json needs it

        record = {"phase": self.phase, "done": self.done, "total": self.total}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()


class _QemuProgress(Progress):
    """qemu-img's text progress, ``    (12.34/100%)`` followed by a carriage return."""

    def __init__(self, phase: str, total: int, stream: TextIO) -> None:
        super().__init__(phase, total)
        self._stream = stream
        self._shown = -1.0

    def _begin(self) -> None:
        self._show(final=False)

    def _show(self, *, final: bool) -> None:
        percent = 100.0 if self.total == 0 else min(100.0, self.done * 100.0 / self.total)
        if percent - self._shown >= 1.0 or (final and percent != self._shown):
            self._shown = percent
            self._stream.write(f"    ({percent:.2f}/100%)\r")
            self._stream.flush()

    def close(self) -> None:
        super().close()
        self._stream.write("\n")
        self._stream.flush()


class _BarProgress(Progress):
    def __init__(self, phase: str, total: int) -> None:
        super().__init__(phase, total)
        self._bar: Any = None

    def _begin(self) -> None:
        from tqdm import tqdm  # only when a bar is shown: tqdm is not on the start-up path

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(
            total=self.total, desc=self.phase, unit="B", unit_scale=True, unit_divisor=1024, leave=True, file=sys.stderr
        )

    def _show(self, *, final: bool) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            if final:
                self._bar.refresh()

    def close(self) -> None:
        super().close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_for(args: argparse.Namespace, phase: str, total: int) -> Progress:
    """The progress report the options ask for (use it as a context manager)."""
    mode = getattr(args, "progress", None)
    if mode == "json":
        return _JsonProgress(phase, total, sys.stderr)
    if mode == "bar":
        if sys.stderr.isatty():
            return _BarProgress(phase, total)
        return _QemuProgress(phase, total, sys.stdout)
    return Progress(phase, total)
