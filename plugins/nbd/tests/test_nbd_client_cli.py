"""``imago info/map/convert/compare`` with NBD URIs, against qemu-img on the same server."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imago.cli import main as imago_main

from ._peers import Peer, start_qemu_nbd, tool

SIZE = 4 << 20


def _imago(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = imago_main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Peer, Path]]:
    """A sparse raw image served by qemu-nbd (shared: the tools connect one after another)."""
    path = tmp_path / "disk.raw"
    rng = random.Random(21)
    with open(path, "wb") as file:
        file.truncate(SIZE)
        file.write(rng.randbytes(1 << 20))
        file.seek(3 << 20)
        file.write(rng.randbytes(256 << 10))
    peer = start_qemu_nbd(path, "-e", "4")
    yield peer, path
    peer.stop()


def test_info(served: tuple[Peer, Path]) -> None:
    peer, _ = served
    status, out, err = _imago("info", "--output=json", peer.uri)
    assert status == 0, err
    info = json.loads(out)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"
    status, out, err = _imago("info", peer.uri)
    assert status == 0, err
    assert "virtual size: 4 MiB (4194304 bytes)" in out


def test_map_matches_qemu_img(served: tuple[Peer, Path]) -> None:
    peer, _ = served
    status, out, err = _imago("map", "--output=json", peer.uri)
    assert status == 0, err
    reference = subprocess.run(
        [tool("qemu-img"), "map", "--output=json", peer.uri], capture_output=True, text=True, check=True, timeout=30
    )
    ours = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)]
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(reference.stdout)]
    assert ours == theirs
    assert (1 << 20, 2 << 20, False, True) in ours  # the hole is skipped, not read


def test_convert_and_compare(served: tuple[Peer, Path], tmp_path: Path) -> None:
    peer, path = served
    target = tmp_path / "copy.raw"
    status, _, err = _imago("convert", "-O", "raw", peer.uri, str(target))
    assert status == 0, err
    assert target.read_bytes() == path.read_bytes()
    copy = tmp_path / "local.raw"
    shutil.copy(path, copy)
    status, out, err = _imago("compare", peer.uri, str(copy))
    assert (status, out.strip()) == (0, "Images are identical."), err
    with open(copy, "r+b") as file:
        file.seek(3 << 20)
        file.write(b"different")
    status, out, _ = _imago("compare", peer.uri, str(copy))
    assert status == 1
    assert "Content mismatch at offset 3145728!" in out


def test_qcow2_on_nbd_through_the_cli(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    subprocess.run(
        [tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0x33 1M 64k", str(qcow2)], check=True, capture_output=True
    )
    reference = tmp_path / "reference.raw"
    subprocess.run([tool("qemu-img"), "convert", "-O", "raw", str(qcow2), str(reference)], check=True)
    peer = start_qemu_nbd(qcow2, "-e", "4")
    try:
        status, out, err = _imago("info", "-f", "qcow2", "--output=json", peer.uri)
        assert status == 0, err
        assert json.loads(out)["format"] == "qcow2"
        target = tmp_path / "out.raw"
        status, _, err = _imago("convert", "-f", "qcow2", "-O", "raw", peer.uri, str(target))
        assert status == 0, err
        assert target.read_bytes() == reference.read_bytes()
    finally:
        peer.stop()


def test_cli_errors_name_the_uri(tmp_path: Path) -> None:
    missing = f"nbd+unix:///?socket={tmp_path}/none"
    status, _, err = _imago("info", missing)
    assert status == 1
    assert missing in err
    assert "Traceback" not in err
    status, _, err = _imago("info", "nbd+unix:///nosocket")
    assert status == 1
    assert "socket=PATH" in err
