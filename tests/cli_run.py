"""Running ``imago`` and QEMU's tools side by side in the command-line tests.

``imago(...)`` runs the command in this process (fast; the working directory changed for the
call), ``qemu_img(...)`` / ``qemu_io(...)`` run QEMU's tools; each returns a :class:`Result` with
the exit status and the text of stdout and stderr, so a test compares them field by field.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs

from imago.cli import main as imago_main

StrPath = str | os.PathLike[str]

__all__ = ["Result", "imago", "qemu_img", "qemu_io"]


@attrs.frozen
class Result:
    """What a command did: exit status, stdout, stderr."""

    status: int
    out: str
    err: str


def imago(*args: StrPath, cwd: StrPath | None = None) -> Result:
    """``imago ARGS`` in this process, in *cwd* if given."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = imago_main([os.fspath(a) for a in args])
    finally:
        os.chdir(previous)
    return Result(status, out.getvalue(), err.getvalue())


def _run(argv: Sequence[StrPath], cwd: StrPath | None) -> Result:
    done = subprocess.run([os.fspath(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def qemu_img(*args: StrPath, cwd: StrPath | None = None) -> Result:
    """``qemu-img ARGS`` (never raises on a non-zero status: compare it)."""
    return _run(["qemu-img", *args], cwd)


def qemu_io(image: StrPath, *commands: str, fmt: str = "qcow2", cwd: StrPath | None = None) -> Result:
    """``qemu-io -f FMT -c CMD ... IMAGE``."""
    argv: list[StrPath] = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return _run([*argv, image], cwd)


def same_text_as_qemu(result: Result, reference: Result) -> None:
    """Assert equal statuses and equal output, ``qemu-img:`` and ``imago:`` prefixes aside."""
    assert result.status == reference.status, (result, reference)
    assert result.out == reference.out
    assert result.err.replace("imago:", "qemu-img:") == reference.err


def write_file(path: Path, data: bytes) -> Path:
    """Write *data* to *path*; returns *path*."""
    path.write_bytes(data)
    return path


def ok(result: Result) -> Result:
    """*result*, asserting the command succeeded."""
    assert result.status == 0, result
    return result


def same_as_qemu(command: str, directory: StrPath, *args: str) -> Result:
    """Run ``COMMAND ARGS`` with imago and qemu-img in *directory*; they must print the same."""
    ours = imago(command, *args, cwd=directory)
    same_text_as_qemu(ours, qemu_img(command, *args, cwd=directory))
    return ours


def make_image(
    directory: StrPath, name: str, size: int | None, *writes: str, backing: str = "", fmt: str = "qcow2"
) -> None:
    """``qemu-img create`` *name* (over *backing*, raw or qcow2 by its suffix), then the qemu-io *writes*."""
    argv = ["create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", "raw" if backing.endswith(".raw") else "qcow2"]
    ok(qemu_img(*argv, name, *([str(size)] if size else []), cwd=directory))
    if writes:
        done = ok(qemu_io(name, *writes, fmt=fmt, cwd=directory))
        assert "error" not in done.out.lower(), done
