"""``imago resize`` against ``qemu-img resize`` 7.2 on copies of the same images.

Each case builds an image with qemu-img/qemu-io, copies it, resizes one copy with qemu-img and
the other with imago (same arguments, same directory and file name length, so messages match),
and compares: exit status, stdout, stderr, then the images: virtual size (``qemu-img info``),
content (``qemu-img compare``, the new area reading as zero), allocation (``qemu-img map``) and
``qemu-img check``. Misuse cases check that the image is left unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import imago
import imago.cli
from imago import Capability, FormatRegistrar
from imago_raw import Raw

from . import cli_run
from .cli_run import Result

MiB = 1 << 20
SIZE = 4 * MiB


def build(directory: Path, fmt: str) -> Path:
    """A 4 MiB image with data at the start and at the end (so shrinking drops some)."""
    image = directory / f"base.{fmt}"
    assert cli_run.qemu_img("create", "-q", "-f", fmt, image, str(SIZE)).status == 0
    done = cli_run.qemu_io(image, "write -P 0x11 0 64k", "write -P 0x22 3M 1M", fmt=fmt)
    assert done.status == 0, done.err
    return image


def pair(directory: Path, image: Path) -> tuple[Path, Path]:
    """Two copies of *image*, ``q.<fmt>`` for qemu-img and ``i.<fmt>`` for imago."""
    suffix = image.suffix
    qemu, mine = directory / f"q{suffix}", directory / f"i{suffix}"
    shutil.copyfile(image, qemu)
    shutil.copyfile(image, mine)
    return qemu, mine


def both(directory: Path, args: list[str], qemu: Path, mine: Path) -> tuple[Result, Result]:
    """``resize ARGS`` with FILE in place of the image name: qemu-img on *qemu*, imago on *mine*."""
    reference = cli_run.qemu_img("resize", *[qemu.name if a == "FILE" else a for a in args], cwd=directory)
    result = cli_run.imago("resize", *[mine.name if a == "FILE" else a for a in args], cwd=directory)
    return result, reference


def info(image: Path, fmt: str) -> dict[str, object]:
    done = cli_run.qemu_img("info", "-f", fmt, "--output=json", image)
    assert done.status == 0, done.err
    return json.loads(done.out)  # type: ignore[no-any-return]


def allocation(image: Path, fmt: str) -> list[dict[str, int | bool]]:
    """``qemu-img map --output=json`` without host offsets (where the data lies may differ).

    qemu-img splits entries where host offsets are not contiguous; without the offsets, equal
    neighbours are merged again.
    """
    done = cli_run.qemu_img("map", "-f", fmt, "--output=json", image)
    assert done.status == 0, done.err
    merged: list[dict[str, int | bool]] = []
    for entry in json.loads(done.out):
        entry.pop("offset", None)
        last = merged[-1] if merged else None
        if last is not None and {k: v for k, v in last.items() if k not in ("start", "length")} == {
            k: v for k, v in entry.items() if k not in ("start", "length")
        }:
            last["length"] += entry["length"]
        else:
            merged.append(entry)
    return merged


def assert_clean(image: Path, fmt: str) -> None:
    if fmt == "qcow2":
        done = cli_run.qemu_img("check", "-f", fmt, image)
        assert done.status == 0, done.out + done.err


def assert_same_images(qemu: Path, mine: Path, fmt: str) -> None:
    assert info(mine, fmt)["virtual-size"] == info(qemu, fmt)["virtual-size"]
    done = cli_run.qemu_img("compare", "-f", fmt, "-F", fmt, qemu, mine)
    assert done.status == 0, done.out + done.err
    assert_clean(mine, fmt)


# --- successful resizes -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["FILE", "+1M"], id="grow-relative"),
        pytest.param(["FILE", "6M"], id="grow-absolute"),
        pytest.param(["FILE", "0x600000"], id="grow-hex"),
        pytest.param(["-q", "FILE", "+1.5M"], id="grow-fraction-quiet"),
        pytest.param(["FILE", "+0"], id="same-size"),
        pytest.param(["--shrink", "FILE", "-1M"], id="shrink-relative"),
        pytest.param(["FILE", "--shrink", "3M"], id="shrink-option-after-file"),
        pytest.param(["FILE", "--", "+64k"], id="double-dash"),
    ],
)
def test_resize_like_qemu_img(tmp_path: Path, fmt: str, args: list[str]) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path, fmt))
    result, reference = both(tmp_path, ["-f", fmt, *args], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert result.status == 0
    assert_same_images(qemu, mine, fmt)
    assert allocation(mine, fmt) == allocation(qemu, fmt)
    new_size = info(mine, fmt)["virtual-size"]
    assert isinstance(new_size, int)
    if new_size > SIZE:  # the new area reads as zero
        done = cli_run.qemu_io(mine, f"read -P 0 {SIZE} {new_size - SIZE}", fmt=fmt)
        assert done.status == 0, done.err
        assert "Pattern verification failed" not in done.out, done.out


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("qcow2", "off"),
        ("qcow2", "metadata"),
        ("qcow2", "falloc"),
        ("qcow2", "full"),
        ("raw", "falloc"),
        ("raw", "full"),
    ],
)
def test_preallocation_like_qemu_img(tmp_path: Path, fmt: str, mode: str) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path, fmt))
    result, reference = both(tmp_path, ["-f", fmt, f"--preallocation={mode}", "FILE", "+2M"], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert_same_images(qemu, mine, fmt)
    assert allocation(mine, fmt) == allocation(qemu, fmt)
    if mode in ("falloc", "full"):
        # The space is really reserved: the file holds at least the new area.
        assert mine.stat().st_blocks * 512 >= 2 * MiB


def test_probes_the_format(tmp_path: Path) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path, "qcow2"))
    result, reference = both(tmp_path, ["FILE", "+1M"], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert_same_images(qemu, mine, "qcow2")


def test_overlay_keeps_backing_data(tmp_path: Path) -> None:
    """Growing an overlay: the old area still reads from the backing file, the new one as zero."""
    base = build(tmp_path, "qcow2")
    for name in ("q.qcow2", "i.qcow2"):
        created = cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", name, cwd=tmp_path)
        assert created.status == 0, created.err
    result, reference = both(tmp_path, ["FILE", "+1M"], tmp_path / "q.qcow2", tmp_path / "i.qcow2")
    cli_run.same_text_as_qemu(result, reference)
    assert_same_images(tmp_path / "q.qcow2", tmp_path / "i.qcow2", "qcow2")
    done = cli_run.qemu_io(tmp_path / "i.qcow2", "read -P 0x22 3M 1M", "read -P 0 4M 1M")
    assert "Pattern verification failed" not in done.out, done.out


def test_backing_file_outside_the_sandbox(tmp_path: Path) -> None:
    """The backing file lies in another directory: refused, naming the options that allow it."""
    (tmp_path / "base").mkdir()
    (tmp_path / "top").mkdir()
    base = build(tmp_path / "base", "qcow2")
    overlay = tmp_path / "top" / "overlay.qcow2"
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay).status == 0
    before = overlay.read_bytes()
    refused = cli_run.imago("resize", overlay, "+1M")
    assert refused.status == 1
    assert refused.err.startswith(f"imago: Could not open '{overlay}': ")
    assert "--allow-dir" in refused.err
    assert overlay.read_bytes() == before
    allowed = cli_run.imago("resize", "--allow-dir", base.parent, overlay, "+1M")
    assert allowed == Result(0, "Image resized.\n", "")
    assert info(overlay, "qcow2")["virtual-size"] == SIZE + MiB


# --- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "same_text"),
    [
        pytest.param(["-f", "qcow2", "FILE", "1M"], True, id="shrink-without-shrink"),
        pytest.param(["-f", "qcow2", "FILE", "-1M"], True, id="relative-shrink-without-shrink"),
        pytest.param(["-f", "qcow2", "FILE", "0"], True, id="zero"),
        pytest.param(["-f", "qcow2", "--shrink", "FILE", "-8M"], True, id="negative"),
        pytest.param(["-f", "qcow2", "--preallocation=full", "FILE", "-1M"], True, id="preallocated-shrink"),
        pytest.param(["-f", "qcow2", "--preallocation=full", "FILE", "+0"], True, id="preallocated-same-size"),
        pytest.param(["-f", "qcow2", "--preallocation=bogus", "FILE", "+1M"], True, id="bad-preallocation"),
        pytest.param(["-f", "qcow2", "--preallocation=zero", "FILE", "+1M"], True, id="not-a-qemu-mode"),
        pytest.param(["-f", "qcow2", "FILE", "12x"], False, id="bad-suffix"),
        pytest.param(["-f", "qcow2", "FILE", "1.5"], False, id="fraction-without-suffix"),
        pytest.param(["-f", "qcow2", "FILE", "+"], False, id="sign-alone"),
        pytest.param(["-f", "qcow2", "FILE", "100000E"], False, id="too-large-to-parse"),
        pytest.param(["-f", "qcow2", "FILE", "+1000"], False, id="not-a-multiple-of-512"),
        pytest.param(["-f", "qcow2", "FILE", "1E"], False, id="too-large-for-the-format"),
        pytest.param(["-f", "vmdk", "FILE", "+1M"], False, id="other-format"),
        pytest.param(["-f", "no-such-format", "FILE", "+1M"], False, id="unknown-format"),
        pytest.param(["-f", "qcow2", "-U", "FILE", "+1M"], False, id="force-share"),
        pytest.param(["-f", "qcow2", "FILE"], False, id="no-size"),
        pytest.param(["FILE", "+1M", "extra"], False, id="extra-argument"),
        pytest.param(["-f", "qcow2", "FILE", "1M", "+1M"], False, id="two-sizes"),
    ],
)
def test_misuse_like_qemu_img(tmp_path: Path, args: list[str], same_text: bool) -> None:
    image = build(tmp_path, "qcow2")
    qemu, mine = pair(tmp_path, image)
    result, reference = both(tmp_path, args, qemu, mine)
    if same_text:
        cli_run.same_text_as_qemu(result, reference)
    assert (result.status, result.out) == (reference.status, "") == (1, "")
    assert result.err.startswith("imago")
    assert "Traceback" not in result.err
    assert "\n" not in result.err.rstrip("\n") or "--shrink" in result.err  # one line (and the warning)
    assert mine.read_bytes() == image.read_bytes()  # nothing changed


def test_missing_file(tmp_path: Path) -> None:
    result = cli_run.imago("resize", "missing.qcow2", "+1M", cwd=tmp_path)
    reference = cli_run.qemu_img("resize", "missing.qcow2", "+1M", cwd=tmp_path)
    assert result.status == reference.status == 1
    assert result.err.startswith("imago: Could not open 'missing.qcow2': ")
    assert "No such file or directory" in result.err
    assert not (tmp_path / "missing.qcow2").exists()


def test_image_in_use_by_another_writer(tmp_path: Path) -> None:
    image = build(tmp_path, "qcow2")
    before = image.read_bytes()
    with imago.open(image, format="qcow2", write=True):
        result = cli_run.imago("resize", image, "+1M")
        reference = cli_run.qemu_img("resize", image, "+1M")
    assert result.status == reference.status == 1
    assert result.err.startswith(f"imago: Could not open '{image}': ")
    assert 'Failed to get "write" lock' in reference.err
    assert image.read_bytes() == before


class Fixed(Raw):
    """A raw image whose driver does not claim resizing (a plugin format, as the CLI sees it)."""

    name = "fixed-example"
    capabilities = frozenset(Raw.capabilities - {Capability.RESIZE})


class FixedPlugin:
    @imago.hookimpl
    def imago_register_format_drivers(self, register: FormatRegistrar) -> None:
        register.register(Fixed)


def test_format_without_resize(register_plugin: Callable[[str, object], None], tmp_path: Path) -> None:
    register_plugin("fixed", FixedPlugin())
    imago.create(tmp_path / "disk.img", "raw", SIZE)
    result = cli_run.imago("resize", "-f", "fixed-example", "disk.img", "+1M", cwd=tmp_path)
    assert result == Result(1, "", "imago: Image format driver does not support resize\n")
    assert (tmp_path / "disk.img").stat().st_size == SIZE


def test_raw_file_named_qcow2(tmp_path: Path) -> None:
    image = build(tmp_path, "raw")
    qemu, mine = pair(tmp_path, image)
    result, reference = both(tmp_path, ["-f", "qcow2", "FILE", "+1M"], qemu, mine)
    assert result.status == reference.status == 1
    assert result.err.startswith(f"imago: Could not open '{mine.name}': ")
    assert mine.read_bytes() == image.read_bytes()


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        imago.cli.main(["resize", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("-f FMT", "--shrink", "--preallocation", "-q", "FILE", "[+|-]SIZE", "--allow-dir"):
        assert option in out
