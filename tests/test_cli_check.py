"""``imago check`` against ``qemu-img check`` 7.2, byte for byte.

Each qcow2 case builds an image with qemu-img/qemu-io (and pokes a refcount where it wants
damage), runs ``qemu-img check`` and ``imago check`` with the same arguments on identical copies
(in the same directory, so the file name printed is the same) and compares the exit status, the
stdout text and the stderr lines (qemu-img's ``qemu-img:`` prefix read as ``imago:``). The
formatter tests feed qemu-img's own JSON counts to imago's formatters, so they hold whatever the
driver's check finds. ``imago`` runs in-process through :func:`imago.cli.main`; two tests run the
installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import imago
import imago.cli
from imago import Capability, CheckFinding, CheckResult, FindingKind, FormatRegistrar, RepairMode
from imago.cli.check import format_human, format_json
from imago.testing.tools import qemu_io_holding
from imago_raw import Raw

RegisterPlugin = Callable[[str, object], None]

CLUSTER = 65536


# --- running both tools ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One ``check`` run: exit status, stdout, stderr."""

    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """The stderr lines that are findings (not the tool's own error line)."""
        return [line for line in self.err.splitlines() if not line.startswith(("qemu-img: ", "imago: ", "Try "))]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is required (Debian package qemu-utils; `make test` installs it)"
    return path


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def qemu_check(directory: Path, *args: str) -> Run:
    proc = run(tool("qemu-img"), "check", *args, cwd=directory)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def imago_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Run]:
    """``imago_check(*args)``: ``imago check ARGS`` in-process, in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)

    def check(*args: str) -> Run:
        capsys.readouterr()
        status = imago.cli.main(["check", *args])
        out, err = capsys.readouterr()
        return Run(status, out, err)

    return check


def assert_same(imago_run: Run, qemu_run: Run) -> None:
    """Same exit status, same stdout, same stderr (up to the program name in error lines)."""
    assert (imago_run.status, imago_run.lines, imago_run.out) == (qemu_run.status, qemu_run.lines, qemu_run.out)
    assert imago_run.err == qemu_run.err.replace("qemu-img: ", "imago: ")
    assert "Traceback" not in imago_run.err


# --- building images -------------------------------------------------------------------------


def qemu_img(directory: Path, *args: str) -> None:
    proc = run(tool("qemu-img"), *args, cwd=directory)
    assert proc.returncode == 0, proc.stderr


def qemu_io(directory: Path, name: str, *commands: str, expect_kill: bool = False) -> None:
    argv = [tool("qemu-io"), "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    proc = run(*argv, name, cwd=directory)
    assert proc.returncode == (-9 if expect_kill else 0), proc.stderr


def set_refcounts(path: Path, refcounts: dict[int, int]) -> None:
    """Overwrite the stored refcount of host clusters (16-bit refcounts, first refcount block)."""
    with open(path, "r+b") as f:
        header = f.read(104)
        assert struct.unpack(">I", header[20:24])[0] == 16  # 64 KiB clusters
        assert struct.unpack(">I", header[96:100])[0] == 4  # 16-bit refcounts
        (table,) = struct.unpack(">Q", header[48:56])
        f.seek(table)
        (block,) = struct.unpack(">Q", f.read(8))
        for cluster, refcount in refcounts.items():
            assert cluster < CLUSTER // 2
            f.seek(block + 2 * cluster)
            f.write(struct.pack(">H", refcount))


def data_image(directory: Path, name: str, *, lazy: bool = False) -> Path:
    """16 MiB, data clusters written out of order (fragmented) and one compressed cluster."""
    options = "cluster_size=65536,lazy_refcounts=on" if lazy else "cluster_size=65536"
    qemu_img(directory, "create", "-q", "-f", "qcow2", "-o", options, name, "16M")
    qemu_io(
        directory,
        name,
        "write -P 3 1M 64k",
        "write -P 1 0 128k",
        "write -c -P 5 2M 64k",
        "write -P 7 3M 64k",
    )
    return directory / name


def l2_entries(path: Path) -> list[int]:
    """The first L2 table's non-zero entries (to find the host clusters a test damages)."""
    with open(path, "rb") as f:
        header = f.read(48)
        (l1,) = struct.unpack(">Q", header[40:48])
        f.seek(l1)
        (l2,) = struct.unpack(">Q", f.read(8))
        f.seek(l2 & 0x00FF_FFFF_FFFF_FE00)
        table = struct.unpack(f">{CLUSTER // 8}Q", f.read(CLUSTER))
    return [entry for entry in table if entry]


def data_clusters(path: Path) -> list[int]:
    """Host cluster indexes of the uncompressed data clusters, in guest order."""
    return [(e & 0x00FF_FFFF_FFFF_FE00) // CLUSTER for e in l2_entries(path) if not e & (1 << 62)]


def build(case: str, directory: Path) -> Path:
    """The image of one case, named ``<case>.qcow2`` in *directory*."""
    name = f"{case}.qcow2"
    if case == "empty":
        qemu_img(directory, "create", "-q", "-f", "qcow2", name, "16M")
        return directory / name
    if case == "marked-corrupt":
        # A clean image with the corrupt bit set (QEMU sets it when it stops a write on metadata).
        qemu_img(directory, "create", "-q", "-f", "qcow2", name, "16M")
        with open(directory / name, "r+b") as f:
            f.seek(72)
            (features,) = struct.unpack(">Q", f.read(8))
            f.seek(72)
            f.write(struct.pack(">Q", features | 2))
        return directory / name
    if case == "dirty":
        qemu_img(directory, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", name, "16M")
        qemu_io(directory, name, "write -P 1 0 192k", "write -P 2 4M 64k", "sigraise 9", expect_kill=True)
        return directory / name
    path = data_image(directory, name)
    if case == "clean":
        return path
    if case == "leaky":
        # Two clusters at the end of the file, counted in use and referenced by nothing.
        end = os.path.getsize(path) // CLUSTER
        os.truncate(path, (end + 2) * CLUSTER)
        set_refcounts(path, {end: 1, end + 1: 1})
        return path
    if case == "corrupt":
        # One refcount too high (a leak, and OFLAG_COPIED now wrong), one too low (0).
        first, second = data_clusters(path)[:2]
        set_refcounts(path, {first: 2, second: 0})
        return path
    if case == "snapshot":
        # A cluster a snapshot shares with the active image, counted once instead of twice.
        qemu_img(directory, "snapshot", "-c", "before", name)
        qemu_io(directory, name, "write -P 9 1M 4k")  # copy-on-write: the L2 table and one cluster
        set_refcounts(path, {data_clusters(path)[0]: 1})
        return path
    raise AssertionError(case)


CASES = ["empty", "clean", "leaky", "corrupt", "snapshot", "dirty", "marked-corrupt"]
MODES = [
    pytest.param([], id="check"),
    pytest.param(["-r", "leaks"], id="r-leaks"),
    pytest.param(["-r", "all"], id="r-all"),
]
OUTPUTS = ["human", "json"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's image, built once; tests check copies."""
    directory = tmp_path_factory.mktemp("check-images")
    return {case: build(case, directory) for case in CASES}


def copy_to(image: Path, directory: Path, name: str) -> str:
    shutil.copyfile(image, directory / name)
    return name


def qemu_reference(images: dict[str, Path], case: str, mode: list[str], output: str, directory: Path) -> Run:
    name = copy_to(images[case], directory, f"{case}.qcow2")
    result = qemu_check(directory, *mode, f"--output={output}", name)
    os.remove(directory / name)
    return result


# --- the formatters, fed qemu-img's own counts -----------------------------------------------


def result_from_qemu_json(text: str) -> CheckResult:
    fields = json.loads(text)
    return CheckResult(
        filename=fields["filename"],
        format=fields["format"],
        check_errors=fields["check-errors"],
        corruptions=fields.get("corruptions", 0),
        leaks=fields.get("leaks", 0),
        corruptions_fixed=fields.get("corruptions-fixed", 0),
        leaks_fixed=fields.get("leaks-fixed", 0),
        image_end_offset=fields.get("image-end-offset"),
        total_clusters=fields.get("total-clusters"),
        allocated_clusters=fields.get("allocated-clusters"),
        fragmented_clusters=fields.get("fragmented-clusters"),
        compressed_clusters=fields.get("compressed-clusters"),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_formatters_print_what_qemu_img_prints(
    images: dict[str, Path], case: str, mode: list[str], tmp_path: Path
) -> None:
    as_json = qemu_reference(images, case, mode, "json", tmp_path)
    as_human = qemu_reference(images, case, mode, "human", tmp_path)
    if as_json.out == "":  # the check failed (-r leaks on damage only -r all repairs): nothing to format
        assert as_json.status == as_human.status == 1
        assert as_human.out == ""
        return
    result = result_from_qemu_json(as_json.out)
    assert format_json(result) == as_json.out  # key order, omitted zeros, indentation
    assert format_human(result) == as_human.out
    assert result.exit_status == as_json.status == as_human.status


def test_json_strings_are_escaped_as_qemu_escapes_them(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    name = 'ü "x"\\\t\x7f.qcow2'
    os.rename(tmp_path / "a.qcow2", tmp_path / name)
    reference = qemu_check(tmp_path, "--output=json", name)
    assert reference.status == 0
    assert format_json(result_from_qemu_json(reference.out)) == reference.out
    assert "\\u00FC" in reference.out  # upper-case hex, unlike Python's json module


def qdict_bucket(key: str) -> int:
    """The bucket of *key* in QEMU's QDict (``tdb_hash`` modulo 512), whose order qemu-img prints."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, char in enumerate(key.encode()):
        value = (value + (char << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def test_to_json_keeps_qemu_img_order_and_omits_zero_counts() -> None:
    # Every field at once, which no single qemu-img run shows: the order is QEMU's QDict's.
    full = CheckResult(
        filename="f",
        format="qcow2",
        corruptions=1,
        leaks=2,
        check_errors=3,
        corruptions_fixed=4,
        leaks_fixed=5,
        image_end_offset=6,
        total_clusters=7,
        allocated_clusters=8,
        fragmented_clusters=9,
        compressed_clusters=10,
    )
    keys = list(full.to_json())
    assert len(keys) == 12
    assert keys == sorted(keys, key=qdict_bucket)
    assert CheckResult(filename="f", format="qcow2").to_json() == {
        "check-errors": 0,
        "filename": "f",
        "format": "qcow2",
    }


# --- imago check against qemu-img check ------------------------------------------------------


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_qcow2_check_equals_qemu_img(
    images: dict[str, Path],
    case: str,
    mode: list[str],
    output: str,
    tmp_path: Path,
    imago_check: Callable[..., Run],
) -> None:
    reference = qemu_reference(images, case, mode, output, tmp_path)
    name = copy_to(images[case], tmp_path, f"{case}.qcow2")
    result = imago_check(*mode, f"--output={output}", name)
    assert_same(result, reference)
    if mode:
        # imago's repair leaves what qemu-img's leaves: qemu-img check says the same of both.
        shutil.copyfile(images[case], tmp_path / "ref.qcow2")
        qemu_check(tmp_path, *mode, "ref.qcow2")
        after_imago = qemu_check(tmp_path, "--output=json", name)
        after_qemu = qemu_check(tmp_path, "--output=json", "ref.qcow2")
        assert (after_imago.status, after_imago.lines) == (after_qemu.status, after_qemu.lines)
        if after_qemu.out:
            assert {**json.loads(after_imago.out), "filename": None} == {**json.loads(after_qemu.out), "filename": None}


def test_quiet_prints_findings_only(images: dict[str, Path], tmp_path: Path, imago_check: Callable[..., Run]) -> None:
    name = copy_to(images["corrupt"], tmp_path, "corrupt.qcow2")
    reference = qemu_check(tmp_path, "-q", name)
    assert reference.out == ""
    assert reference.lines
    assert_same(imago_check("-q", name), reference)


def test_explicit_format_raw_on_a_qcow2_image_is_not_checked(
    images: dict[str, Path], tmp_path: Path, imago_check: Callable[..., Run]
) -> None:
    name = copy_to(images["clean"], tmp_path, "clean.qcow2")
    reference = qemu_check(tmp_path, "-f", "raw", name)
    assert reference.status == 63
    assert_same(imago_check("-f", "raw", name), reference)


# --- formats without a check, errors ---------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["-f", "raw"], ["--output=json"], ["-f", "raw", "-r", "all"], ["-U"]])
def test_raw_does_not_support_checks(tmp_path: Path, imago_check: Callable[..., Run], args: list[str]) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "raw", "disk.img", "1M")
    reference = qemu_check(tmp_path, *args, "disk.img")
    assert reference.status == 63
    assert reference.err == "qemu-img: This image format does not support checks\n"
    assert_same(imago_check(*args, "disk.img"), reference)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["missing.qcow2"], "missing.qcow2", id="missing-file"),
        pytest.param(["-f", "no-such-format", "disk.img"], "no-such-format", id="unknown-format"),
        pytest.param(["-r", "some", "disk.img"], "-r", id="bad-repair-mode"),
        pytest.param(["--output=xml", "disk.img"], "--output", id="bad-output"),
        pytest.param(["-U", "-r", "leaks", "disk.img"], "disk.img", id="force-share-with-repair"),
        pytest.param([], "FILE", id="no-file"),
        pytest.param(["disk.img", "other.img"], "other.img", id="two-files"),
        pytest.param(["--no-such-option", "disk.img"], "--no-such-option", id="unknown-option"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    tmp_path: Path, imago_check: Callable[..., Run], args: list[str], named: str
) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "disk.img", "1M")
    assert qemu_check(tmp_path, *args).status == 1
    result = imago_check(*args)
    assert result.status == 1
    assert result.out == ""
    assert len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith("imago")
    assert named in result.err


# --- any driver claiming the capability ------------------------------------------------------


class Checked(Raw):
    """A raw image whose check reports what the test sets (a plugin's check, as the CLI sees it)."""

    name = "checked-example"
    capabilities = frozenset({*Raw.capabilities, Capability.CHECK})
    result: ClassVar[CheckResult] = CheckResult(filename=None, format="checked-example")
    modes: ClassVar[list[tuple[RepairMode | None, bool]]] = []

    async def check(self, fix: RepairMode | None = None) -> CheckResult:
        """The preset result; records the mode and whether the image was opened for writing."""
        Checked.modes.append((fix, self.writable))
        return Checked.result


class CheckedPlugin:
    @imago.hookimpl
    def imago_register_format_drivers(self, register: FormatRegistrar) -> None:
        register.register(Checked)


def leak(n: int) -> CheckFinding:
    return CheckFinding(kind=FindingKind.LEAK, message=f"Leaked cluster {n} refcount=1 reference=0", cluster=n)


@pytest.mark.parametrize(
    ("result", "status", "stdout"),
    [
        pytest.param(
            CheckResult(filename="x", format="checked-example", image_end_offset=512),
            0,
            "No errors were found on the image.\nImage end offset: 512\n",
            id="clean",
        ),
        pytest.param(
            CheckResult(filename="x", format="checked-example", leaks=2, findings=(leak(3), leak(4))),
            3,
            "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
            id="leaks",
        ),
        pytest.param(
            CheckResult(filename="x", format="checked-example", check_errors=1, corruptions=1),
            1,
            "\n1 errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may corrupt it.\n"
            "\n1 internal errors have occurred during the check.\n",
            id="check-errors",
        ),
    ],
)
def test_any_driver_claiming_check(
    register_plugin: RegisterPlugin,
    imago_check: Callable[..., Run],
    tmp_path: Path,
    result: CheckResult,
    status: int,
    stdout: str,
) -> None:
    register_plugin("checked", CheckedPlugin())
    imago.create(tmp_path / "disk.img", "raw", 4096)
    Checked.result = result
    Checked.modes = []
    run_ = imago_check("-f", "checked-example", "disk.img")
    assert (run_.status, run_.out) == (status, stdout)
    expected_err = "".join(f"{finding.message}\n" for finding in result.findings)
    if result.check_errors:
        expected_err += "imago: Check failed\n"
    assert run_.err == expected_err
    assert json.loads(imago_check("-f", "checked-example", "--output=json", "disk.img").out)["filename"] == "disk.img"
    assert imago_check("-f", "checked-example", "-r", "leaks", "disk.img").status == status
    assert Checked.modes == [(None, False), (None, False), (RepairMode.LEAKS, True)]


# --- locks and -U ----------------------------------------------------------------------------


def test_force_share_checks_an_image_qemu_io_holds(
    images: dict[str, Path], tmp_path: Path, imago_check: Callable[..., Run]
) -> None:
    name = copy_to(images["clean"], tmp_path, "held.qcow2")
    holder = qemu_io_holding(name, "-f", "qcow2", cwd=tmp_path)
    assert holder.stdin is not None
    try:
        locked = qemu_check(tmp_path, name)
        assert locked.status == 1
        assert "lock" in locked.err
        refused = imago_check(name)
        assert refused.status == 1
        assert refused.out == ""
        assert len(refused.err.splitlines()) == 1
        assert name in refused.err
        assert "lock" in refused.err
        assert_same(imago_check("-U", name), qemu_check(tmp_path, "-U", name))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# --- the installed command -------------------------------------------------------------------


def test_console_script(venv_bin: Path, images: dict[str, Path], tmp_path: Path) -> None:
    name = copy_to(images["leaky"], tmp_path, "leaky.qcow2")
    script = os.fspath(venv_bin / "imago")
    proc = run(script, "check", "--output=json", name, cwd=tmp_path)
    assert_same(Run(proc.returncode, proc.stdout, proc.stderr), qemu_check(tmp_path, "--output=json", name))

    qemu_img(tmp_path, "create", "-q", "-f", "raw", "disk.img", "1M")
    proc = run(script, "check", "disk.img", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (63, "", "imago: This image format does not support checks\n")


def test_cache_mode_and_gate_options(tmp_path: Path, venv_bin: Path) -> None:
    """-T and the gate options, as the other subcommands have them."""
    (tmp_path / "base").mkdir()
    (tmp_path / "top").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base/b.qcow2", "1M"], cwd=tmp_path, check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base/b.qcow2", "-F", "qcow2", "top/t.qcow2"],
        cwd=tmp_path,
        check=True,
    )
    top = str(tmp_path / "top" / "t.qcow2")
    for cache in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        assert imago.cli.main(["check", "-q", "-T", cache, "--allow-any", top]) == 0
    refused = subprocess.run(["qemu-img", "check", "-T", "fast", top], capture_output=True, text=True, check=False)
    ours = subprocess.run(
        [str(venv_bin / "imago"), "check", "-T", "fast", top],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (ours.returncode, ours.stderr.replace("imago:", "qemu-img:")) == (refused.returncode, refused.stderr)
    denied = subprocess.run(
        [str(venv_bin / "imago"), "check", top],
        capture_output=True,
        text=True,
        check=False,
    )
    assert denied.returncode == 1
    assert "b.qcow2" in denied.stderr
    assert "--allow-dir" in denied.stderr
    assert denied.stderr.count("\n") == 1
    assert imago.cli.main(["check", "-q", "--allow-dir", str(tmp_path / "base"), top]) == 0
