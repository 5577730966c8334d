"""The fuzz targets by name: each takes one input (bytes) and exercises imago with it.

A target returns or raises; :meth:`Target.judge` (in-process replays) and :mod:`fuzz.engine`
(atheris) decide whether what it raised is acceptable, given the OS errors the target allows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..verdict import DEFAULT_TIME_LIMIT, Verdict, judge
from . import cli, qcow2_read, qcow2_write, raw_read, vdi_read, vhdx_read, vmdk_read, vpc_read

__all__ = ["CORPUS_DIR", "KNOWN_FINDINGS", "REGRESSIONS_DIR", "TARGETS", "Target", "known_findings"]

FUZZ_DIR = Path(__file__).resolve().parent.parent
#: The committed seed corpora, one directory per kind of input (``corpus/qcow2``, ...).
CORPUS_DIR = FUZZ_DIR / "corpus"
#: Inputs of findings, one directory per target: the test suite replays them.
REGRESSIONS_DIR = FUZZ_DIR / "regressions"


class Target(NamedTuple):
    """A fuzz target: its name, the function taking an input, its seed directories, its allowed OS errors."""

    name: str
    run: Callable[[bytes], None]
    #: Directories under :data:`CORPUS_DIR` whose files seed it.
    seeds: tuple[str, ...]
    #: ``errno`` values of OS errors that are acceptable outcomes (documented pass-through errors).
    allowed_os_errors: frozenset[int] = frozenset()
    #: The packages whose coverage guides it (imported instrumented by :mod:`fuzz.engine`).
    coverage: tuple[str, ...] = ("imago", "imago_qcow2")

    def judge(self, data: bytes, *, time_limit: float | None = DEFAULT_TIME_LIMIT) -> Verdict:
        """Run the target on *data* in this process and classify the outcome."""
        return judge(self.run, data, allowed_os_errors=self.allowed_os_errors, time_limit=time_limit)

    def seed_dirs(self) -> list[Path]:
        """The seed corpus directories."""
        return [CORPUS_DIR / name for name in self.seeds]

    def regression_dir(self) -> Path:
        """Where this target's finding inputs are kept."""
        return REGRESSIONS_DIR / self.name

    def inputs(self) -> list[Path]:
        """Every committed input for this target: seeds, then regressions (sorted)."""
        directories = [*self.seed_dirs(), self.regression_dir()]
        return [
            path
            for directory in directories
            for path in sorted(directory.glob("*"))
            if path.is_file() and not path.name.startswith(".")
        ]


_CLI_COVERAGE = ("imago", "imago.cli", "imago_file", "imago_qcow2")

#: The findings not fixed yet, one per line: ``TARGET/FILE: what goes wrong`` (``#`` starts a comment).
KNOWN_FINDINGS = REGRESSIONS_DIR / "KNOWN"


def known_findings() -> dict[str, str]:
    """The open findings: ``"TARGET/FILE"`` -> the reason (the replay test expects them to fail)."""
    known = {}
    if KNOWN_FINDINGS.exists():
        for line in KNOWN_FINDINGS.read_text().splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                key, _, reason = entry.partition(":")
                known[key.strip()] = reason.strip()
    return known


#: Every target by name.
TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("qcow2_read", qcow2_read.run, ("qcow2",)),
        Target("qcow2_write", qcow2_write.run, ("qcow2_write", "qcow2"), qcow2_write.ALLOWED_OS_ERRORS),
        Target("raw_read", raw_read.run, ("raw",), coverage=("imago", "imago_raw")),
        Target("vmdk_read", vmdk_read.run, ("vmdk",), coverage=("imago", "imago_vmdk")),
        Target("vdi_read", vdi_read.run, ("vdi",), coverage=("imago", "imago_vdi")),
        Target("vpc_read", vpc_read.run, ("vpc",), coverage=("imago", "imago_vpc")),
        Target("vhdx_read", vhdx_read.run, ("vhdx",), coverage=("imago", "imago_vhdx")),
        # The command line catches OS errors itself; cli.py judges what it caught.
        Target("cli_info", cli.run_info, ("qcow2",), coverage=_CLI_COVERAGE),
        Target("cli_check", cli.run_check, ("qcow2",), coverage=_CLI_COVERAGE),
    )
}
