"""Names a gate is asked to open that no local file can have: refused as ImplicitOpenDeniedError, never an OSError.

Images choose these names (a backing file, an external data file), so every failure they cause
must be an :class:`imago.ImagoError` naming the name: a component over NAME_MAX, a path over
PATH_MAX, a NUL byte, text that cannot be encoded, a name the file system itself refuses, a
symbolic link loop. A missing file stays the OS's FileNotFoundError (as for an explicit open).
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from imago import (
    DenyImplicitOpenGate,
    ImagoError,
    ImplicitOpenDeniedError,
    ImplicitOpenGate,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    StorageOpenOptions,
    runtime,
)
from imago.format.gates import NAME_MAX, PATH_MAX, check_name_limits

GateFactory = Callable[[pathlib.Path], ImplicitOpenGate]
GATES: list[GateFactory] = [
    lambda directory: PermissiveImplicitOpenGate(),
    lambda directory: SandboxImplicitOpenGate([directory]),
    lambda directory: DenyImplicitOpenGate(),
]
GATE_IDS = ["permissive", "sandbox", "deny"]


def _open(gate: ImplicitOpenGate, name: str) -> None:
    storage = runtime.run_sync(gate.open_storage(StorageOpenOptions(filename=name)))
    runtime.run_sync(storage.close())  # (only reached when a test is wrong)


def _bad_names(directory: pathlib.Path) -> dict[str, str]:
    """Names no gate may pass to the system, by what is wrong with them."""
    deep = str(directory) + "/" + "d" * 200 + "/"
    return {
        "component-over-name-max": str(directory / ("a" * (NAME_MAX + 1))),
        "component-of-300-bytes": str(directory / ("b" * 300 + ".qcow2")),
        "multibyte-component-over-name-max": str(directory / ("é" * 128)),  # 256 bytes in UTF-8
        "path-over-path-max": deep + "/".join(["c" * 100] * (PATH_MAX // 100)),
        "nul-byte": str(directory / "a\0b"),
        "lone-surrogate": str(directory / "a\ud800b"),
    }


@pytest.mark.parametrize("make_gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize(
    "kind",
    [
        "component-over-name-max",
        "component-of-300-bytes",
        "multibyte-component-over-name-max",
        "path-over-path-max",
        "nul-byte",
        "lone-surrogate",
    ],
)
def test_every_gate_refuses_impossible_names(tmp_path: pathlib.Path, make_gate: GateFactory, kind: str) -> None:
    name = _bad_names(tmp_path)[kind]
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(make_gate(tmp_path), name)
    assert isinstance(info.value, ImagoError)
    assert info.value.filename  # it names the name


@pytest.mark.parametrize("kind", ["component-over-name-max", "path-over-path-max", "lone-surrogate"])
def test_check_name_limits_names_the_limit(tmp_path: pathlib.Path, kind: str) -> None:
    with pytest.raises(ImplicitOpenDeniedError) as info:
        check_name_limits(_bad_names(tmp_path)[kind])
    words = {"component-over-name-max": "NAME_MAX", "path-over-path-max": "PATH_MAX", "lone-surrogate": "encoded"}
    assert words[kind] in str(info.value)


def test_names_at_the_limits_pass(tmp_path: pathlib.Path) -> None:
    # A component of exactly NAME_MAX bytes is a valid name: it is opened.
    path = tmp_path / ("a" * NAME_MAX)
    path.write_bytes(b"x" * 512)
    check_name_limits(str(path))
    _open(PermissiveImplicitOpenGate(), str(path))
    _open(SandboxImplicitOpenGate([tmp_path]), str(path))
    # Non-UTF-8 bytes (surrogate-escaped, as Python spells them) are a valid Linux name.
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe.img")
    pathlib.Path(odd).write_bytes(b"y" * 512)
    _open(PermissiveImplicitOpenGate(), odd)


@pytest.mark.parametrize("make_gate", GATES[:2], ids=GATE_IDS[:2])
def test_missing_file_stays_file_not_found(tmp_path: pathlib.Path, make_gate: GateFactory) -> None:
    with pytest.raises(FileNotFoundError):
        _open(make_gate(tmp_path), str(tmp_path / "missing.img"))


@pytest.mark.parametrize("make_gate", GATES[:2], ids=GATE_IDS[:2])
def test_symlink_loop_is_refused(tmp_path: pathlib.Path, make_gate: GateFactory) -> None:
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(make_gate(tmp_path), str(tmp_path / "loop-a"))
    assert os.strerror(errno.ELOOP) in str(info.value) or "outside" in str(info.value)


def test_sandbox_refuses_a_link_whose_target_is_too_long(tmp_path: pathlib.Path) -> None:
    # The name is short; what it resolves to is not: the limit is checked after resolving.
    target = "/".join(["e" * 203] * 20)  # (4079 bytes: a link's target must itself fit in PATH_MAX)
    assert len(os.fsencode(str(tmp_path / target))) >= PATH_MAX
    os.symlink(target, tmp_path / "long-link")
    with pytest.raises(ImplicitOpenDeniedError):
        _open(SandboxImplicitOpenGate([tmp_path]), str(tmp_path / "long-link"))


# --- through an image: a qcow2 backing file name, and the command line --------------------------


def _qcow2_with_backing_name(directory: pathlib.Path, name: str) -> pathlib.Path:
    path = directory / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", str(path), "1M"],
        check=True,
        timeout=60,
    )
    return path


@pytest.fixture
def qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is required (Debian package qemu-utils)")
    pytest.importorskip("imago_qcow2")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("length", [256, 300, 1000])
@pytest.mark.parametrize("make_gate", GATES[:2], ids=GATE_IDS[:2])
def test_backing_file_name_too_long_for_the_file_system(
    tmp_path: pathlib.Path, make_gate: GateFactory, length: int
) -> None:
    import imago

    path = _qcow2_with_backing_name(tmp_path, "n" * length)
    with pytest.raises(ImplicitOpenDeniedError) as info:
        imago.open(path, "qcow2", gate=make_gate(tmp_path))
    assert "n" * length in str(info.value)
    assert f"backing file of {path}" in str(info.value)  # the image naming it


@pytest.mark.usefixtures("qemu_img")
def test_a_refusal_down_the_chain_names_the_image_that_names_the_file(tmp_path: pathlib.Path) -> None:
    import imago

    middle = _qcow2_with_backing_name(tmp_path, "n" * 300)
    top = tmp_path / "upper.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", middle.name, "-F", "qcow2", str(top), "1M"],
        check=True,
        timeout=60,
    )
    with pytest.raises(ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2", gate=PermissiveImplicitOpenGate())
    message = str(info.value)
    assert f"backing file of {middle}" in message
    assert str(top) not in message


@pytest.mark.usefixtures("qemu_img")
def test_backing_path_over_path_max(tmp_path: pathlib.Path) -> None:
    import imago

    # 1000 bytes of short components, from a directory whose own path is long: together over PATH_MAX.
    directory = tmp_path
    while len(os.fsencode(str(directory))) < PATH_MAX - 900:
        directory = directory / ("p" * 200)
    directory.mkdir(parents=True)
    path = _qcow2_with_backing_name(directory, "/".join(["q" * 99] * 10))
    with pytest.raises(ImplicitOpenDeniedError, match="PATH_MAX"):
        imago.open(path, "qcow2", gate=PermissiveImplicitOpenGate())


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("backing_chain", [False, True], ids=["plain", "backing-chain"])
def test_imago_info_reports_a_long_backing_name_in_one_line(tmp_path: pathlib.Path, backing_chain: bool) -> None:
    path = _qcow2_with_backing_name(tmp_path, "m" * 300 + ".qcow2")
    script = "import sys, imago.cli; sys.exit(imago.cli.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "info", *(["--backing-chain"] if backing_chain else []), str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if not backing_chain:
        # Without the chain the backing file is only named, not opened.
        assert proc.returncode == 0, proc.stderr
        assert "m" * 300 in proc.stdout
        return
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "NAME_MAX" in proc.stderr
