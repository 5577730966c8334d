"""``imago map`` side by side with ``qemu-img map`` 7.2 on the same images.

Images are made with qemu-img/qemu-io in a fresh directory; both tools run there with the same
arguments and must print the same text (JSON entries and the human table), with the same exit
status. ``imago`` runs in-process.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from . import cli_run

Build = Callable[[Path], None]
CLUSTER = 65536


_ok = cli_run.ok


def qemu_img(directory: Path, *args: str) -> None:
    cli_run.ok(cli_run.qemu_img(*args, cwd=directory))


def qemu_io(directory: Path, image: str, *commands: str, fmt: str = "qcow2") -> None:
    cli_run.ok(cli_run.qemu_io(image, *commands, fmt=fmt, cwd=directory))


def same_as_qemu(directory: Path, *args: str) -> cli_run.Result:
    """Run ``map ARGS`` with both tools in *directory*; they must print the same."""
    return cli_run.same_as_qemu("map", directory, *args)


# --- the images ----------------------------------------------------------------------------------


def shuffled(d: Path) -> None:
    """Clusters written in a random order (host offsets out of guest order), zeroes, a discard."""
    qemu_img(d, "create", "-q", "-f", "qcow2", "image", "16M")
    order = [*range(0, 40, 2), 41, 42, 43, 60, 61]
    random.Random(10).shuffle(order)
    qemu_io(d, "image", *(f"write -P {i % 250 + 1} {i * CLUSTER} 64k" for i in order))
    qemu_io(d, "image", "write -z -u 100 1M", "write -z 3M 256k", "discard 8M 128k", "write -P 9 15M 4k")


def sparse_raw(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "raw", "image", "6M")
    qemu_io(d, "image", "write -P 1 1M 192k", "write -P 2 4M 4k", "write -P 3 5M 1M", fmt="raw")


def chain(d: Path) -> None:
    """raw (with holes) <- qcow2 (data, zeroes, compressed) <- qcow2 larger than its backing."""
    (d / "sub").mkdir()
    qemu_img(d, "create", "-q", "-f", "raw", "sub/base.raw", "4M")
    qemu_io(d, "sub/base.raw", "write -P 1 1M 512k", fmt="raw")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "sub/mid.qcow2")
    qemu_io(d, "sub/mid.qcow2", "write -P 2 0 64k", "write -z 2M 128k", "write -P 3 3M 64k", "write -c -P 4 3200k 64k")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", "image", "8M")
    qemu_io(d, "image", "write -P 5 64k 64k", "write -z 5M 64k", "write -P 6 1152k 64k")


def empty_chain(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "base", "3M")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "image")


def compressed(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "raw", "source", "3M")
    qemu_io(d, "source", "write -P 7 0 1M", "write -P 8 2M 64k", fmt="raw")
    qemu_img(d, "convert", "-c", "-f", "raw", "-O", "qcow2", "source", "image")


def data_file(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "data_file=image.data", "image", "4M")
    qemu_io(d, "image", "write -P 1 1M 128k", "write -P 2 0 64k")


def small_clusters(d: Path) -> None:
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", "image", "3M")
    qemu_io(d, "image", "write -P 1 0 4k", "write -P 2 1M 1536", "write -P 3 2560k 512k")


def host_offset_equals_guest(d: Path) -> None:
    """A partly written cluster whose host offset happens to equal its guest offset (not raw)."""
    qemu_img(d, "create", "-q", "-f", "qcow2", "image", "4M")
    qemu_io(d, "image", "write -P 1 324k 4k")


def unaligned_raw(d: Path) -> None:
    """A raw file whose size is not a multiple of 512: data, a hole, then a partial last sector."""
    with open(d / "image", "wb") as file:
        file.write(b"x" * 1000)
        file.seek(3 << 20)
        file.write(b"y" * 1000)


CASES: dict[str, Build] = {
    "shuffled": shuffled,
    "sparse-raw": sparse_raw,
    "chain": chain,
    "empty-chain": empty_chain,
    "compressed": compressed,
    "data-file": data_file,
    "small-clusters": small_clusters,
    "host-offset-equals-guest": host_offset_equals_guest,
    "unaligned-raw": unaligned_raw,
}


@pytest.mark.parametrize("case", CASES)
def test_same_as_qemu_img(tmp_path: Path, case: str) -> None:
    CASES[case](tmp_path)
    for output in ("json", "human"):
        same_as_qemu(tmp_path, f"--output={output}", "image")
    same_as_qemu(tmp_path, "-U", "--output=json", "--start-offset=100k", "--max-length=1M", "image")


def test_compressed_clusters_stop_the_human_table(tmp_path: Path) -> None:
    compressed(tmp_path)
    ours = same_as_qemu(tmp_path, "image")
    assert ours.status == 1
    assert "compressed" in ours.err


@pytest.mark.parametrize(
    "window",
    [
        ("--start-offset=100k",),
        ("--max-length=1M",),
        ("-s", "65536", "-l", "1"),
        ("-s", "3M", "-l", "100k"),
        ("-s", "0x10000", "-l", "1.5M"),
        (
            "-s",
            "20M",
        ),
        (
            "-s",
            "8M",
        ),
        ("-l", "0"),
        ("-s", "7M", "-l", "1E"),
    ],
)
def test_start_offset_and_max_length(tmp_path: Path, window: tuple[str, ...]) -> None:
    chain(tmp_path)
    same_as_qemu(tmp_path, "--output=json", *window, "image")
    same_as_qemu(tmp_path, "-f", "qcow2", *window, str(tmp_path / "image"))


@pytest.mark.parametrize("extended_l2", ["on", "off"])
def test_zeroes_kept_allocated(tmp_path: Path, extended_l2: str) -> None:
    """Zeroed clusters that keep their allocation, and subclusters: equal, host offsets included.

    qemu-img prints host offsets for zero clusters that stay allocated and for unallocated
    subclusters inside allocated clusters (without a backing file).
    """
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "-o", f"extended_l2={extended_l2}", "image", "4M")
    qemu_io(
        tmp_path,
        "image",
        "write -P 1 4k 8k",
        "write -z 64k 32k",
        "write -P 1 200k 100k",
        "write -P 4 2M 256k",
        "write -z 2M 128k",
    )
    same_as_qemu(tmp_path, "image")
    result = same_as_qemu(tmp_path, "--output=json", "image")
    assert any("offset" in entry and entry["zero"] for entry in json.loads(result.out))


@pytest.mark.parametrize("extended_l2", ["on", "off"])
def test_zeroes_kept_allocated_over_a_backing_file(tmp_path: Path, extended_l2: str) -> None:
    """Over a backing file: allocated zero ranges keep their offset, unallocated subclusters show the backing."""
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "base", "4M")
    qemu_io(tmp_path, "base", "write -P 7 0 4M")
    qemu_img(
        tmp_path,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"extended_l2={extended_l2}",
        "-b",
        "base",
        "-F",
        "qcow2",
        "image",
    )
    qemu_io(tmp_path, "image", "write -P 1 4k 8k", "write -P 2 1M 192k", "write -z 1M 64k", "write -z -u 3M 64k")
    same_as_qemu(tmp_path, "image")
    same_as_qemu(tmp_path, "--output=json", "image")


def test_zeroes_kept_allocated_in_external_data_files(tmp_path: Path) -> None:
    """data_file_raw keeps every cluster allocated: zeroed ones show their offset; one at host 0 does not."""
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=data,data_file_raw=on", "image", "1M")
    qemu_io(tmp_path, "image", "write -P 1 0 192k", "write -z 0 64k", "write -z 128k 64k", "write -z 512k 128k")
    same_as_qemu(tmp_path, "image")
    result = same_as_qemu(tmp_path, "--output=json", "image")
    assert '"zero": true, "data": false, "offset": 131072' in result.out


def test_sandbox_gate_for_the_backing_chain(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    qemu_img(outside, "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qemu_io(outside, "base.qcow2", "write -P 1 0 64k")
    qemu_img(inside, "create", "-q", "-f", "qcow2", "-b", "../outside/base.qcow2", "-F", "qcow2", "image")
    refused = cli_run.imago("map", "image", cwd=inside)
    assert (refused.status, refused.out) == (1, "")
    assert refused.err.count("\n") == 1
    assert "base.qcow2" in refused.err
    assert "--allow-dir" in refused.err
    assert "--allow-any" in refused.err
    reference = _ok(cli_run.qemu_img("map", "--output=json", "image", cwd=inside))
    allowed = cli_run.imago("map", "--output=json", "--allow-dir", str(outside), "image", cwd=inside)
    cli_run.same_text_as_qemu(allowed, reference)
    anything = cli_run.imago("map", "--output=json", "--allow-any", "image", cwd=inside)
    cli_run.same_text_as_qemu(anything, reference)


# --- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("missing.qcow2",),
        ("-f", "qcow2", "image.raw"),
        ("--output=xml", "image.raw"),
        ("-s", "abc", "image.raw"),
        ("-s", "-1", "image.raw"),
        ("-l", "1x", "image.raw"),
        ("--max-length", "1.5", "image.raw"),
        ("-f", "nosuchformat", "image.raw"),
    ],
)
def test_errors_are_one_line_as_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "raw", "image.raw", "1M")
    ours = cli_run.imago("map", *args, cwd=tmp_path)
    theirs = cli_run.qemu_img("map", *args, cwd=tmp_path)
    assert ours.status == theirs.status == 1
    assert ours.out == ""
    assert ours.err.count("\n") == 1
    assert ours.err.startswith("imago: ")
    if "--output=xml" in args:
        cli_run.same_text_as_qemu(ours, theirs)
    elif args[0] in ("-s", "-l", "--max-length"):
        assert args[1] in ours.err
    else:
        assert args[-1] in ours.err
        assert args[1] in ours.err if args[0] == "-f" else "No such file" in ours.err


@pytest.mark.parametrize("args", [(), ("a", "b"), ("--bogus", "a"), ("-s",)])
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    ours = cli_run.imago("map", *args, cwd=tmp_path)
    assert (ours.status, ours.out) == (1, "")
    assert ours.err.count("\n") == 1


@pytest.mark.parametrize("damage", ["truncated", "huge-l1", "l2-unaligned", "data-unaligned"])
def test_damaged_image_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    qemu_img(tmp_path, "create", "-q", "-f", "qcow2", "image", "1M")
    qemu_io(tmp_path, "image", "write -P 1 0 64k")
    path = tmp_path / "image"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:50]
    elif damage == "huge-l1":
        data[36:40] = (0x7FFFFFFF).to_bytes(4, "big")
    else:
        l1_offset = int.from_bytes(data[40:48], "big")
        if damage == "l2-unaligned":
            data[l1_offset : l1_offset + 8] = ((1 << 63) | 0x40200).to_bytes(8, "big")
        else:
            l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & ((1 << 56) - 1)
            data[l2_offset : l2_offset + 8] = ((1 << 63) | 0x10200).to_bytes(8, "big")
    path.write_bytes(data)
    theirs = cli_run.qemu_img("map", "-f", "qcow2", "--output=json", "image", cwd=tmp_path)
    assert theirs.status == 1, theirs
    ours = cli_run.imago("map", "-f", "qcow2", "--output=json", "image", cwd=tmp_path)
    assert ours.status == 1
    assert ours.err.count("\n") == 1
    assert "image" in ours.err
    assert "Traceback" not in ours.err
    if damage == "data-unaligned":  # found while mapping, as qemu-img finds it
        assert ours.out == theirs.out == "["
        assert "Could not read file metadata" in ours.err
        assert "Could not read file metadata" in theirs.err
