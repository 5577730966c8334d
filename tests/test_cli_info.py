"""``imago info`` side by side with ``qemu-img info`` 7.2 on the same images.

Each case builds its images with qemu-img/qemu-io in a fresh directory, then runs both tools
there with the same arguments (relative names, so the names printed are the same) and compares
exit status, stdout and stderr text: the JSON byte for byte (field names, values, key order)
and the human lines (snapshot dates too: both run in the same time zone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

import imago
from imago import CheckResult, FormatRegistrar
from imago.cli.info import qdict_order
from imago_raw import Raw

from . import cli_run

Build = Callable[[Path], None]


_ok = cli_run.ok


def qemu_img(directory: Path, *args: str) -> None:
    cli_run.ok(cli_run.qemu_img(*args, cwd=directory))


def qemu_io(directory: Path, image: str, *commands: str, fmt: str = "qcow2") -> None:
    cli_run.ok(cli_run.qemu_io(image, *commands, fmt=fmt, cwd=directory))


def same_as_qemu(directory: Path, *args: str) -> cli_run.Result:
    """Run ``info ARGS`` with both tools in *directory*; they must print the same."""
    return cli_run.same_as_qemu("info", directory, *args)


# --- the images ---------------------------------------------------------------------------------


def raw(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "raw", "image", "3M")
    qemu_io(d, "image", "write -P 1 1M 64k", fmt="raw")


def qcow2_v2(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "image", "5M")
    qemu_io(d, "image", "write -P 1 0 128k")


def qcow2_v3(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=4", "image", "1G")
    qemu_io(d, "image", "write -P 1 4k 8k", "write -z 1M 64k")


def chain(d: Path) -> None:
    """raw <- qcow2 <- qcow2, the middle one with a relative name in a subdirectory."""
    (d / "sub").mkdir()
    qemu_img(d, "create", "-q", "-f", "raw", "sub/base.raw", "2M")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "sub/mid.qcow2")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", "image", "4M")
    qemu_io(d, "image", "write -P 2 0 64k")


def chain_unnamed_format(d: Path) -> None:
    """A backing file without a recorded format (probed when the chain is opened)."""
    qemu_img(d, "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qemu_img(d, "create", "-q", "-f", "qcow2", "image", "1M")
    # qemu-img 7.2 insists on a backing format: write the name into the header by hand.
    with open(d / "image", "r+b") as file:
        file.seek(8)
        file.write((1024).to_bytes(8, "big") + len(b"base.qcow2").to_bytes(4, "big"))
        file.seek(1024)
        file.write(b"base.qcow2")


def snapshots(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "image", "2M")
    qemu_io(d, "image", "write -P 1 0 1M")
    qemu_img(d, "snapshot", "-c", "first", "image")
    qemu_io(d, "image", "write -P 2 512k 1M")
    qemu_img(d, "snapshot", "-c", "a-rather-long-snapshot-name", "image")


def lazy_dirty(d: Path) -> None:
    """Lazy refcounts, left dirty by a writer killed before it closed the image."""
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "image", "1M")
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", "-c", "sigraise 9", "image"],
        cwd=d,
        capture_output=True,
        check=False,
    )
    assert done.returncode == -9, done


def extended_l2_zstd(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", "image", "3M")
    qemu_io(d, "image", "write -P 4 0 8k", "write -c -P 5 1M 64k")


def data_file(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "data_file=image.data,data_file_raw=on", "image", "1M")
    qemu_io(d, "image", "write -P 6 0 64k")


def compressed(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "raw", "source", "2M")
    qemu_io(d, "source", "write -P 7 0 1M", fmt="raw")
    qemu_img(d, "convert", "-c", "-f", "raw", "-O", "qcow2", "source", "image")


CASES: dict[str, Build] = {
    "raw": raw,
    "qcow2-v2": qcow2_v2,
    "qcow2-v3": qcow2_v3,
    "chain": chain,
    "chain-unnamed-format": chain_unnamed_format,
    "snapshots": snapshots,
    "lazy-dirty": lazy_dirty,
    "extended-l2-zstd": extended_l2_zstd,
    "data-file": data_file,
    "compressed": compressed,
}


@pytest.mark.parametrize("case", CASES)
def test_same_as_qemu_img(tmp_path: Path, case: str) -> None:
    CASES[case](tmp_path)
    for output in ("json", "human"):
        same_as_qemu(tmp_path, f"--output={output}", "image")
        same_as_qemu(tmp_path, f"--output={output}", "--backing-chain", "image")
    same_as_qemu(tmp_path, "-U", "image")


def test_named_format_and_absolute_name(tmp_path: Path) -> None:
    chain(tmp_path)
    same_as_qemu(tmp_path, "-f", "qcow2", "--output=json", "--backing-chain", str(tmp_path / "image"))
    same_as_qemu(tmp_path, "--backing-chain", str(tmp_path / "image"))


@pytest.mark.parametrize(
    "size", [0, 1, 999, 1000, 1023, 1024, 1025, 1023 * 1024 + 512, 1000 << 20, 1536 << 30, 3 << 40, (1 << 43) + 1]
)
def test_sizes_are_printed_as_qemu_prints_them(tmp_path: Path, size: int) -> None:
    with open(tmp_path / "image", "wb") as file:
        file.truncate(size)
    same_as_qemu(tmp_path, "-f", "raw", "image")


def test_missing_backing_file_is_reported_not_opened(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "image", "1M")
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-b", "/outside/of/it.raw", "-F", "raw", "far", "1M")
    for output in ("json", "human"):
        same_as_qemu(tmp_path, f"--output={output}", "image")
        same_as_qemu(tmp_path, f"--output={output}", "far")
    # With the chain asked for, the missing file is an error naming it, as in qemu-img.
    missing = cli_run.imago("info", "--backing-chain", "image", cwd=tmp_path)
    assert missing.status == 1
    assert missing.out == ""
    assert "gone.qcow2" in missing.err
    assert "No such file or directory" in missing.err


def test_backing_chain_through_the_sandbox_gate(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    qemu_img(outside, "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qemu_img(inside, "create", "-q", "-f", "qcow2", "-b", "../outside/base.qcow2", "-F", "qcow2", "image")
    # Without the chain nothing is opened: allowed.
    same_as_qemu(inside, "image")
    refused = cli_run.imago("info", "--backing-chain", "image", cwd=inside)
    assert refused.status == 1
    assert refused.out == ""
    assert refused.err.count("\n") == 1
    assert "base.qcow2" in refused.err
    assert "--allow-dir" in refused.err
    assert "--allow-any" in refused.err
    reference = cli_run.qemu_img("info", "--backing-chain", "image", cwd=inside)
    allowed = cli_run.imago("info", "--backing-chain", "--allow-dir", str(outside), "image", cwd=inside)
    cli_run.same_text_as_qemu(allowed, reference)
    anything = cli_run.imago("info", "--backing-chain", "--allow-any", "image", cwd=inside)
    cli_run.same_text_as_qemu(anything, reference)


def data_file_image(tmp_path: Path) -> Path:
    """A qcow2 image in ``in/`` whose external data file lies in ``out/`` (outside its sandbox)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    data, image = tmp_path / "out" / "data.raw", tmp_path / "in" / "img.qcow2"
    cli_run.qemu_img("create", "-q", "-f", "raw", data, "1M")
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", image, "1M")
    assert cli_run.qemu_io(image, "write -P 5 0 64k").status == 0
    return image


@pytest.mark.parametrize("chain", [False, True])
def test_info_does_not_open_the_data_file(tmp_path: Path, chain: bool) -> None:
    # As qemu-img info since CVE-2024-4467: the data file's name is reported, the file never opened.
    image = data_file_image(tmp_path)
    extra = ["--backing-chain"] if chain else []
    ours = cli_run.imago("info", "--output=json", *extra, image)
    assert ours.status == 0, ours.err
    theirs = cli_run.qemu_img("info", "--output=json", *extra, image)
    mine, reference = json.loads(ours.out), json.loads(theirs.out)
    for info in (mine[0], reference[0]) if chain else (mine, reference):
        info.pop("actual-size")
    assert mine == reference
    assert cli_run.imago("map", image).status == 1  # reading the data does open it: refused here


def test_an_image_opened_for_its_metadata_only_reads_no_data(tmp_path: Path) -> None:
    image = data_file_image(tmp_path)
    with imago.open(image, "qcow2", metadata_only=True) as disk:
        assert disk.driver.info()["format-specific"]["data"]["data-file"] == str(tmp_path / "out" / "data.raw")
        with pytest.raises(imago.MissingStorageError, match="metadata only"):
            disk.read(bytearray(512), 0)
    with pytest.raises(imago.ImplicitOpenDeniedError):
        imago.open(image, "qcow2").close()
    with imago.open(image, "qcow2", gate=imago.PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(512)
        disk.read(buf, 0)
        assert buf == b"\x05" * 512
    with pytest.raises(imago.InvalidOptionError, match="metadata_only"):
        imago.format_driver("qcow2").builder_path(image).metadata_only("yes")  # type: ignore[arg-type]


def test_backing_chain_loop_is_an_error(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "a", "1M")
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-b", "a", "-F", "qcow2", "b", "1M")
    qemu_img(tmp_path, "rebase", "-u", "-f", "qcow2", "-b", "b", "-F", "qcow2", "a")
    looped = cli_run.imago("info", "--backing-chain", "a", cwd=tmp_path)
    assert looped.status == 1
    assert looped.out == ""
    assert "loop" in looped.err
    assert looped.err.count("\n") == 1


# --- misuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("missing.qcow2",),
        ("-f", "qcow2", "image.raw"),
        ("--output=xml", "image.raw"),
        ("--output", "", "image.raw"),
    ],
)
def test_errors_as_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "raw", "image.raw", "1M")
    ours = cli_run.imago("info", *args, cwd=tmp_path)
    theirs = cli_run.qemu_img("info", *args, cwd=tmp_path)
    assert (ours.status, ours.out) == (theirs.status, theirs.out) == (1, "")
    assert ours.err.count("\n") == 1
    assert ours.err.startswith("imago: ")
    if args[-1] == "missing.qcow2":
        assert "missing.qcow2" in ours.err
        assert "No such file or directory" in ours.err
    elif args[0] == "-f":
        assert "image.raw" in ours.err
    else:
        cli_run.same_text_as_qemu(ours, theirs)


@pytest.mark.parametrize("args", [(), ("a", "b"), ("--bogus", "a"), ("-f",)])
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    ours = cli_run.imago("info", *args, cwd=tmp_path)
    assert ours.status == 1
    assert ours.out == ""
    assert ours.err.count("\n") == 1


def test_unknown_format(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "raw", "image.raw", "1M")
    ours = cli_run.imago("info", "-f", "nosuchformat", "image.raw", cwd=tmp_path)
    assert (ours.status, ours.out) == (1, "")
    assert "nosuchformat" in ours.err
    assert ours.err.count("\n") == 1


@pytest.mark.parametrize("damage", ["truncated", "huge-l1", "backing-name-past-end"])
def test_damaged_image_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "image", "1M")
    path = tmp_path / "image"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:50]
    elif damage == "huge-l1":
        data[36:40] = (0x7FFFFFFF).to_bytes(4, "big")  # l1_size
    else:
        data[8:16] = (1 << 40).to_bytes(8, "big")  # backing_file_offset
        data[16:20] = (100).to_bytes(4, "big")
    path.write_bytes(data)
    theirs = cli_run.qemu_img("info", "-f", "qcow2", "image", cwd=tmp_path)
    assert theirs.status == 1, theirs
    ours = cli_run.imago("info", "-f", "qcow2", "image", cwd=tmp_path)
    assert (ours.status, ours.out) == (1, "")
    assert ours.err.count("\n") == 1
    assert "image" in ours.err
    assert "Traceback" not in ours.err


def test_force_share_reads_an_image_held_for_writing(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "image", "1M")
    command = [os.path.join(os.path.dirname(sys.executable), "imago"), "info", "--output=json"]
    with imago.open(tmp_path / "image", "qcow2", write=True):
        locked = subprocess.run([*command, "image"], cwd=tmp_path, capture_output=True, text=True, check=False)
        qemu_locked = cli_run.qemu_img("info", "image", cwd=tmp_path)
        shared = subprocess.run([*command, "-U", "image"], cwd=tmp_path, capture_output=True, text=True, check=False)
        qemu_shared = cli_run.qemu_img("info", "--output=json", "-U", "image", cwd=tmp_path)
    assert locked.returncode == qemu_locked.status == 1
    assert locked.stdout == ""
    assert "image" in locked.stderr
    assert "lock" in locked.stderr
    assert "-U" in locked.stderr
    assert shared.returncode == qemu_shared.status == 0
    assert shared.stdout == qemu_shared.out


def test_driver_facts_beyond_qemu_img_are_not_printed(tmp_path: Path) -> None:
    """qcow2's ``info()`` has imago's own facts (``header``); ``imago info`` prints qemu-img's only."""
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "image", "1M")
    with imago.open(tmp_path / "image", "qcow2") as disk:
        assert "header" in disk.driver.info()
    ours = _ok(cli_run.imago("info", "--output=json", "image", cwd=tmp_path))
    assert "header" not in ours.out


# --- any format plugin ----------------------------------------------------------------------------


class Facts(Raw):
    """A raw image whose driver reports what the test sets (a plugin's ``info()``, as the CLI sees it)."""

    name = "facts-example"
    facts: ClassVar[dict[str, Any]] = {}

    def info(self) -> dict[str, Any]:
        return dict(self.facts)


class FactsPlugin:
    @imago.hookimpl
    def imago_register_format_drivers(self, register: FormatRegistrar) -> None:
        register.register(Facts)


def test_any_driver_info_is_printed_in_qemu_img_layout(
    register_plugin: Callable[[str, object], None], tmp_path: Path
) -> None:
    register_plugin("facts", FactsPlugin())
    imago.create(tmp_path / "disk", "raw", 1 << 20)
    Facts.facts = {}
    bare = _ok(cli_run.imago("info", "-f", "facts-example", "disk", cwd=tmp_path))
    reference = _ok(cli_run.qemu_img("info", "-f", "raw", "disk", cwd=tmp_path))
    assert bare.out == reference.out.replace("file format: raw", "file format: facts-example")
    Facts.facts = {
        "cluster-size": 4096,
        "dirty-flag": True,
        "backing-filename": "base.img",
        "private-detail": 1,
        "format-specific": {
            "type": "facts-example",
            "data": {"the-answer": 42, "nested-part": {"on-off": False, "name": "x"}, "items": [7, {"a-b": "c"}]},
        },
    }
    human = _ok(cli_run.imago("info", "-f", "facts-example", "disk", cwd=tmp_path)).out.splitlines()
    assert human[4:] == [
        "cluster_size: 4096",
        "cleanly shut down: no",
        "backing file: base.img",
        "Format specific information:",
        # QEMU's hash order of these keys (the order of a QDict), dashes shown as spaces.
        "    items:",
        "        [0]: 7",
        "        [1]:",
        "            a b: c",
        "    the answer: 42",
        "    nested part:",
        "        on off: false",
        "        name: x",
    ]
    data = json.loads(_ok(cli_run.imago("info", "--output=json", "-f", "facts-example", "disk", cwd=tmp_path)).out)
    assert "private-detail" not in data
    assert data["full-backing-filename"] == "base.img"
    assert data["dirty-flag"] is True


def test_qdict_order_is_qemu_img_check_order() -> None:
    """The hash order reproduces the key order qemu-img check prints (see CheckResult.to_json)."""
    result = CheckResult(
        filename="f",
        format="qcow2",
        check_errors=1,
        image_end_offset=2,
        corruptions=3,
        leaks=4,
        corruptions_fixed=5,
        leaks_fixed=6,
        total_clusters=7,
        allocated_clusters=8,
        fragmented_clusters=9,
        compressed_clusters=10,
    )
    schema = [
        "filename",
        "format",
        "check-errors",
        "image-end-offset",
        "corruptions",
        "leaks",
        "corruptions-fixed",
        "leaks-fixed",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
    ]
    assert list(qdict_order(dict.fromkeys(schema))) == list(result.to_json())
