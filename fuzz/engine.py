"""Run one fuzz target under atheris (libFuzzer): ``python -m fuzz.engine TARGET [libFuzzer arguments]``.

imago's modules (core, the drivers, the command line) are imported eagerly under
``atheris.instrument_imports`` so that coverage guides the search through all of them. The
process's address space is capped (:func:`fuzz.verdict.limit_memory`); libFuzzer's
``-timeout`` and ``-rss_limit_mb`` bound each input's time and memory. An input whose outcome is
not acceptable (see :mod:`fuzz.verdict`) leaves its exception uncaught: libFuzzer then saves the
input under ``-artifact_prefix`` and exits non-zero. Use ``python -m fuzz`` for campaigns.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence

import atheris  # type: ignore[import-untyped]  # no type information published

__all__ = ["INFLIGHT_PREFIX", "INSTRUMENTED_PACKAGES", "WATCHDOG_ENV", "Watchdog", "import_all", "main"]

#: Name prefix of the in-flight input file a process keeps in its findings directory (see :class:`Watchdog`).
INFLIGHT_PREFIX = "inflight-"
#: The environment variable setting the watchdog's limit in seconds (default: ``-timeout`` + 5).
WATCHDOG_ENV = "IMAGO_FUZZ_WATCHDOG"

#: The packages coverage may be collected for (a target walks the ones it names: ``Target.coverage``).
#: Every package a target names must be here: the table is imported under the instrumentation, so
#: it cannot be read first (a test checks that none is missing).
INSTRUMENTED_PACKAGES = (
    "imago",
    "imago_file",
    "imago_null",
    "imago_raw",
    "imago_qcow2",
    "imago_vmdk",
    "imago_vdi",
    "imago_vpc",
    "imago_vhdx",
)
# Walked only when a target names them: test helpers never, the command line for the CLI targets.
_SKIPPED = ("imago.testing", "imago.cli")


def import_all(packages: Sequence[str]) -> int:
    """Import every module of *packages* (instrumented when called under ``instrument_imports``)."""
    count = 0
    skipped = tuple(prefix for prefix in _SKIPPED if prefix not in packages)
    pending = list(packages)
    while pending:
        name = pending.pop()
        module = importlib.import_module(name)
        count += 1
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            full = f"{name}.{info.name}"
            # Skipped packages are not even imported (walk_packages would import them to recurse).
            if not full.startswith(skipped) and info.name != "__main__":
                pending.append(full)
    return count


class Watchdog:
    """A hang guard that works even when Python cannot run.

    Each input is written to a file first, and ``faulthandler`` (a C thread, no GIL needed)
    dumps every thread's stack and exits if the input runs past the limit (exit status 1). The
    runner (:func:`fuzz.run.collect`) keeps the file of a process that ended so as a ``hang-*``
    finding and removes the others.

    libFuzzer's own ``-timeout`` is not enough under atheris: it is delivered as a Python signal,
    which a long C call never sees, and which code catching ``KeyboardInterrupt`` (the command
    line does, to close images cleanly) swallows.
    """

    def __init__(self, directory: str, seconds: float) -> None:
        self.path = os.path.join(directory, f"{INFLIGHT_PREFIX}{os.getpid()}")
        self.seconds = seconds

    def guard(self, run: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """*run*, guarded."""
        path = self.path
        seconds = self.seconds

        def guarded(data: bytes) -> None:
            with open(path, "wb") as file:
                file.write(data)
            faulthandler.dump_traceback_later(seconds, exit=True)
            try:
                run(data)
            finally:
                faulthandler.cancel_dump_traceback_later()

        return guarded


def _option(arguments: Sequence[str], name: str, default: str) -> str:
    prefix = f"-{name}="
    return next((a[len(prefix) :] for a in reversed(arguments) if a.startswith(prefix)), default)


def main(argv: Sequence[str] | None = None) -> None:
    """Fuzz the target named by the first argument; the rest goes to libFuzzer."""
    arguments = list(sys.argv if argv is None else argv)
    if len(arguments) < 2:
        raise SystemExit("usage: python -m fuzz.engine TARGET [libFuzzer arguments]")
    name = arguments.pop(1)
    # imago is imported here first, so that what the target uses is instrumented.
    with atheris.instrument_imports(include=list(INSTRUMENTED_PACKAGES)):
        from .targets import TARGETS

        target = TARGETS.get(name)
        if target is None:
            raise SystemExit(f"unknown target {name!r} (targets: {', '.join(TARGETS)})")
        import_all(target.coverage)
    from imago import ImagoError

    from .verdict import limit_memory

    limit_memory()
    allowed = target.allowed_os_errors
    # A few seconds past libFuzzer's -timeout, so that libFuzzer reports what it can catch itself;
    # IMAGO_FUZZ_WATCHDOG (seconds) overrides it.
    findings = os.path.dirname(_option(arguments, "artifact_prefix", "./")) or "."
    limit = os.environ.get(WATCHDOG_ENV) or float(_option(arguments, "timeout", "10")) + 5
    watchdog = Watchdog(findings, float(limit))
    run = watchdog.guard(target.run)

    def test_one_input(data: bytes) -> None:
        try:
            run(data)
        except ImagoError:
            return
        except OSError as error:
            if error.errno not in allowed:
                raise

    atheris.Setup(arguments, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
