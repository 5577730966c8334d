"""The reference tools and the ``imago`` command, run from a plugin's tests.

``qemu-img`` and ``qemu-io`` (Debian's qemu-utils) are the reference every format plugin is
compared with; a missing tool fails the test (interoperability tests are never skipped).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["StrPath", "imago_cli", "qemu_img", "qemu_io", "qemu_io_holding", "qemu_json", "qemu_raw", "run", "tool"]

StrPath = str | os.PathLike[str]


def tool(name: str) -> str:
    """The path of the program *name*; an AssertionError naming the package when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is required for the interoperability tests (Debian package qemu-utils)")
    return path


def run(argv: Sequence[StrPath], cwd: StrPath | None = None) -> str:
    """Run a command; its stdout, or an AssertionError with its output when it fails."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def qemu_img(*args: StrPath, cwd: StrPath | None = None) -> str:
    """``qemu-img ARGS`` (checked); its stdout."""
    return run([tool("qemu-img"), *args], cwd=cwd)


def qemu_io(image: StrPath, *commands: str, fmt: str) -> None:
    """``qemu-io -f FMT -c CMD ... IMAGE``; any failed command fails the call."""
    argv: list[StrPath] = [tool("qemu-io"), "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    out = run([*argv, image])
    for line in out.splitlines():
        if "failed" in line or "error" in line.lower():
            raise AssertionError(f"qemu-io on {image}: {line}")


def qemu_io_holding(image: StrPath, *flags: str, cwd: StrPath | None = None) -> subprocess.Popen[str]:
    """``qemu-io FLAGS IMAGE`` holding the image open (and locked, as QEMU locks it).

    Returns once qemu-io has answered a command, that is once the image is open and every lock
    byte taken (polling for locks instead races with QEMU taking them one by one). qemu-io
    quits when the process's stdin is closed; a qemu-io that cannot open the image is an
    AssertionError with its message.
    """
    process = subprocess.Popen(
        [tool("qemu-io"), *flags, os.fspath(image)],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write("length\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 60)
        answer = process.stdout.readline() if ready else ""
    except BrokenPipeError:
        answer = ""
    if not answer or "no file open" in answer:
        process.kill()
        _, err = process.communicate(timeout=30)
        raise AssertionError(f"qemu-io {' '.join(flags)} {image} did not open it: {err.strip()}")
    return process


def qemu_raw(image: Path, fmt: str) -> bytes:
    """The disk's bytes as ``qemu-img convert -f FMT -O raw`` writes them."""
    target = image.with_name(image.name + ".qemu.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", image, target)
    data = target.read_bytes()
    target.unlink()
    return data


def qemu_json(*args: StrPath) -> Any:
    """qemu-img's JSON output of ``ARGS --output=json``."""
    return json.loads(qemu_img(*args, "--output=json"))


def imago_cli(*args: StrPath) -> tuple[int, str, str]:
    """``imago ARGS`` in this process: status, stdout, stderr."""
    from ..cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([os.fspath(a) for a in args])
    return status, out.getvalue(), err.getvalue()
