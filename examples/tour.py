"""A tour of the ``imago`` command: a disk from real content to a committed qcow2 overlay.

Usage: python examples/tour.py [DIRECTORY]

In DIRECTORY (kept) or a temporary directory (removed at the end) the tour makes a small raw
disk with real content (text, random bytes and zeroes), converts it to a compressed qcow2,
reads it back (``imago bench``), puts an overlay on it, writes through the overlay with the
library, takes a snapshot, shows ``info``, ``map`` and ``check``, commits the overlay into its
base and compares the result with what was written. Each step prints the command it runs
(``$ imago ...``) and its output; the commands are run by :func:`imago.cli.main`, exactly as
the ``imago`` console script runs them. When QEMU's ``qemu-img`` is installed, it gives the
last word: ``qemu-img check`` and ``qemu-img compare`` on what imago wrote.

The exit status is 0 when every step succeeded and every verdict is clean, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import imago
import imago.cli

MiB = 1 << 20
DISK_SIZE = 64 * MiB
TEXT_SIZE = 4 * MiB
RANDOM_SIZE = 2 * MiB
#: Where the content lies on the disk: text first, random bytes at 16 MiB, zeroes elsewhere.
TEXT_AT = 0
RANDOM_AT = 16 * MiB
#: What the tour writes through the overlay: (offset, bytes).
OVERLAY_WRITES = (
    (1 * MiB, b"Written through the overlay by the imago library.\n" * 1024),
    (40 * MiB, random.Random(10).randbytes(MiB)),
)


@dataclass
class Step:
    """One command of the tour and how it ended."""

    title: str
    argv: list[str]
    status: int
    #: The status the step must end with (``imago compare``: 0, identical).
    expected: int = 0

    @property
    def ok(self) -> bool:
        return self.status == self.expected


@dataclass
class Tour:
    """The tour in one directory: runs the steps, prints them, remembers how each ended."""

    directory: Path
    out: TextIO = field(default_factory=lambda: sys.stdout)
    steps: list[Step] = field(default_factory=list)
    _bold: bool = False
    _headings: int = 0

    def __post_init__(self) -> None:
        self._bold = self.out.isatty() and os.environ.get("NO_COLOR") is None

    # --- printing ---------------------------------------------------------------------------

    def heading(self, text: str) -> None:
        self._headings += 1
        line = f"{self._headings}. {text}"
        self.out.write(f"\n\033[1m{line}\033[0m\n" if self._bold else f"\n{line}\n{'=' * len(line)}\n")
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(f"{text}\n")
        self.out.flush()

    def show(self, argv: Sequence[str]) -> None:
        line = "$ " + shlex.join(argv)
        self.out.write(f"\033[36m{line}\033[0m\n" if self._bold else f"{line}\n")
        self.out.flush()

    # --- running ------------------------------------------------------------------------------

    def imago(self, title: str, *args: str, expected: int = 0) -> Step:
        """Run ``imago ARGS`` in the tour's directory (in this process) and record it."""
        argv = ["imago", *args]
        self.show(argv)
        with _redirected(self.out), _working_directory(self.directory):
            status = imago.cli.main(list(args))
            sys.stdout.flush()
        return self._record(Step(title, argv, status, expected))

    def qemu_img(self, title: str, qemu: str, *args: str) -> Step:
        """Run ``qemu-img ARGS`` in the tour's directory and record it."""
        argv = ["qemu-img", *args]
        self.show(argv)
        done = subprocess.run([qemu, *args], cwd=self.directory, capture_output=True, text=True, check=False)
        self.out.write(done.stdout + done.stderr)
        return self._record(Step(title, argv, done.returncode))

    def _record(self, step: Step) -> Step:
        self.steps.append(step)
        if not step.ok:
            self.say(f"!! {step.title}: exit status {step.status} (expected {step.expected})")
        return step

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def path(self, name: str) -> str:
        return str(self.directory / name)


@contextlib.contextmanager
def _redirected(out: TextIO) -> Iterator[None]:
    if out is sys.stdout:
        yield
        return
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield


@contextlib.contextmanager
def _working_directory(directory: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def text_content(size: int) -> bytes:
    """*size* bytes of real text: Python's standard library sources, as many files as it takes."""
    chunks: list[bytes] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= size:
            break
    text = b"".join(chunks)
    while len(text) < size:  # a tiny standard library: repeat what there is
        text += text or b"imago\n"
    return text[:size]


def make_disk(tour: Tour) -> bytes:
    """Step 1: a raw disk with text, random bytes and zeroes, written with the library."""
    tour.heading("Make a disk with real content (library: imago.create, imago.open, write)")
    text = text_content(TEXT_SIZE)
    noise = random.Random(1).randbytes(RANDOM_SIZE)
    tour.say(f'>>> imago.create("disk.raw", "raw", {DISK_SIZE})')
    imago.create(tour.path("disk.raw"), "raw", DISK_SIZE)
    with imago.open(tour.path("disk.raw"), format="raw", write=True) as disk:
        tour.say(f">>> disk.write(<{len(text) // MiB} MiB of Python's own sources>, {TEXT_AT})")
        disk.write(text, TEXT_AT)
        tour.say(f">>> disk.write(<{len(noise) // MiB} MiB of random bytes>, {RANDOM_AT})")
        disk.write(noise, RANDOM_AT)
    tour.say(f"disk.raw: {DISK_SIZE // MiB} MiB, {(len(text) + len(noise)) // MiB} MiB of data, the rest zeroes")
    return text


def expected_disk(tour: Tour) -> None:
    """What the disk must read as in the end: disk.raw with the overlay's writes (expected.raw)."""
    shutil.copyfile(tour.path("disk.raw"), tour.path("expected.raw"))
    with imago.open(tour.path("expected.raw"), format="raw", write=True) as disk:
        for offset, data in OVERLAY_WRITES:
            disk.write(data, offset)


def run_tour(directory: Path, out: TextIO | None = None, *, qemu_img: str | None = None) -> Tour:
    """Run every step in *directory* (which must exist); *qemu_img* is the reference tool, if any."""
    tour = Tour(directory, out if out is not None else sys.stdout)
    tour.say(f"imago {imago.__version__} tour in {directory}")

    make_disk(tour)

    tour.heading("Convert it to a compressed qcow2")
    tour.imago("convert", "convert", "-p", "-c", "-f", "raw", "-O", "qcow2", "disk.raw", "disk.qcow2")
    tour.imago("info of the compressed image", "info", "disk.qcow2")
    tour.say("Read the whole disk back, 64 KiB requests, 16 in flight (imago's async API):")
    tour.imago("bench", "bench", "-c", str(DISK_SIZE // (64 << 10)), "-s", "64k", "-d", "16", "disk.qcow2")

    tour.heading("Put an overlay on it: new writes go to the overlay, the base stays as it is")
    tour.imago("create the overlay", "create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", "overlay.qcow2")

    tour.heading("Write through the overlay (library: imago.open, write)")
    tour.say('>>> with imago.open("overlay.qcow2", format="qcow2", write=True) as disk:')
    with imago.open(tour.path("overlay.qcow2"), format="qcow2", write=True) as overlay:
        for offset, data in OVERLAY_WRITES:
            tour.say(f"...     disk.write(<{len(data) // 1024} KiB>, {offset})")
            overlay.write(data, offset)
    expected_disk(tour)

    tour.heading("Take a snapshot of the overlay")
    tour.imago("snapshot -c", "snapshot", "-c", "after-writes", "overlay.qcow2")
    tour.imago("snapshot -l", "snapshot", "-l", "overlay.qcow2")

    tour.heading("Look at the overlay: info, map, check")
    tour.imago("info of the overlay", "info", "overlay.qcow2")
    tour.say(
        "Where the guest's data lives: depth 0 in the overlay, depth 1 in disk.qcow2 (compressed clusters have "
        "no offset: the human table refuses them, as qemu-img's does, so JSON):"
    )
    tour.imago("map of the overlay", "map", "--output=json", "overlay.qcow2")
    tour.imago("check of the overlay", "check", "overlay.qcow2")

    tour.heading("Commit the overlay's writes into its base")
    tour.imago("commit", "commit", "-p", "overlay.qcow2")
    tour.imago("check of the base", "check", "disk.qcow2")
    tour.say("The base now reads as the disk plus the overlay's writes (expected.raw):")
    tour.imago("compare with what was written", "compare", "-f", "raw", "-F", "qcow2", "expected.raw", "disk.qcow2")

    tour.heading("QEMU's verdict")
    if qemu_img is None:
        tour.say("qemu-img is not installed: skipping QEMU's check and compare (Debian: apt-get install qemu-utils).")
    else:
        tour.qemu_img("qemu-img check of the base", qemu_img, "check", "disk.qcow2")
        tour.qemu_img("qemu-img check of the overlay", qemu_img, "check", "overlay.qcow2")
        tour.qemu_img(
            "qemu-img compare of the base with what was written",
            qemu_img,
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "expected.raw",
            "disk.qcow2",
        )

    tour.heading("Summary")
    for step in tour.steps:
        tour.say(f"  {'ok    ' if step.ok else 'FAILED'}  {shlex.join(step.argv)}")
    sizes = {name: os.path.getsize(tour.path(name)) for name in ("disk.raw", "disk.qcow2", "overlay.qcow2")}
    tour.say("  files: " + ", ".join(f"{name} {size / MiB:.1f} MiB" for name, size in sizes.items()))
    tour.say("Every step succeeded." if tour.ok else "Some steps FAILED (see above).")
    return tour


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tour in the directory given (kept) or in a temporary one (removed); 0 if all went well."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(args) > 1:
        print("usage: python examples/tour.py [DIRECTORY]", file=sys.stderr)
        return 2
    qemu_img = shutil.which("qemu-img")
    if args:
        directory = Path(args[0])
        directory.mkdir(parents=True, exist_ok=True)
        return 0 if run_tour(directory.resolve(), qemu_img=qemu_img).ok else 1
    with tempfile.TemporaryDirectory(prefix="imago-tour-") as temporary:
        ok = run_tour(Path(temporary), qemu_img=qemu_img).ok
    print("(The images were in a temporary directory: `make run DIR=tour` keeps them in tour/.)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
