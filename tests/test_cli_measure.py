"""``imago measure`` side by side with ``qemu-img measure``: same numbers, same output, misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import imago

from . import cli_run

# Source images: name -> the commands making it in its directory, ("qemu-img", ARGS...) or
# ("qemu-io", IMAGE, COMMANDS...). Written with QEMU's tools so the allocation (data, zero
# clusters, compressed clusters, subclusters, snapshots, backing files) is QEMU's own.
_SOURCES: dict[str, tuple[tuple[str, ...], ...]] = {
    "sparse.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "sparse.qcow2", "20M"),
        ("qemu-io", "sparse.qcow2", "write 0 100k", "write 5M 1k", "write -z 6M 64k", "write 19M 4k"),
    ),
    "small_clusters.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "small_clusters.qcow2", "3M"),
        ("qemu-io", "small_clusters.qcow2", "write 3k 2k", "write 1M 600k"),
    ),
    "compressed.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "compressed.qcow2", "4M"),
        ("qemu-io", "compressed.qcow2", "write -c 0 64k", "write -c 1M 128k"),
    ),
    "subclusters.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "subclusters.qcow2", "4M"),
        ("qemu-io", "subclusters.qcow2", "write 2k 1k", "write 200k 3k"),
    ),
    "snapshots.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "snapshots.qcow2", "4M"),
        ("qemu-io", "snapshots.qcow2", "write 0 512k"),
        ("qemu-img", "snapshot", "-c", "snap", "snapshots.qcow2"),
        ("qemu-io", "snapshots.qcow2", "write -z 0 256k", "write 2M 64k"),
    ),
    "overlay.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"),
        ("qemu-io", "base.qcow2", "write 0 1M"),
        ("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "overlay.qcow2"),
        ("qemu-io", "overlay.qcow2", "write 3M 4k", "write -z 0 64k"),
    ),
    "v2.qcow2": (
        ("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "2M"),
        ("qemu-io", "v2.qcow2", "write 64k 64k"),
    ),
    "full.raw": (
        ("qemu-img", "create", "-q", "-f", "raw", "full.raw", "1000"),
        ("qemu-io", "full.raw", "write -P 1 0 1000"),
    ),
}


def _make(directory: Path, name: str) -> Path:
    for tool, *args in _SOURCES[name]:
        if tool == "qemu-io":
            image, *commands = args
            result = cli_run.qemu_io(image, *commands, fmt="raw" if image.endswith(".raw") else "qcow2", cwd=directory)
        else:
            result = cli_run.qemu_img(*args, cwd=directory)
        assert result.status == 0, result
    return directory / name


_TARGETS = [
    ("-O", "qcow2"),
    ("--output=json", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"),
    ("-O", "qcow2", "-o", "compat=0.10"),
    ("-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k,refcount_bits=64"),
    ("-O", "qcow2", "-o", "cluster_size=2M,preallocation=metadata"),
    ("--output=json", "-O", "qcow2", "-o", "preallocation=falloc"),
    ("-O", "qcow2", "-o", "backing_file=elsewhere.qcow2"),
    ("-O", "raw"),
    ("--output=json",),
]


@pytest.mark.parametrize("source", sorted(_SOURCES))
def test_source_images_same_as_qemu_img(tmp_path: Path, source: str) -> None:
    image = _make(tmp_path, source)
    fmt = "raw" if source.endswith(".raw") else "qcow2"
    for target in _TARGETS:
        args = ("measure", *target, "-f", fmt, image.name)
        cli_run.same_text_as_qemu(cli_run.imago(*args, cwd=tmp_path), cli_run.qemu_img(*args, cwd=tmp_path))


@pytest.mark.parametrize("size", ["0", "1000", "1M", "3G", "1.5T", "0x12345678"])
def test_size_same_as_qemu_img(size: str) -> None:
    for target in _TARGETS:
        args = ("measure", *target, "--size", size)
        cli_run.same_text_as_qemu(cli_run.imago(*args), cli_run.qemu_img(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("-O", "qcow2"),
        ("-O", "qcow2", "--size", "1M", "x.qcow2"),
        ("-O", "qcow2", "--size", "1Q"),
        ("-O", "qcow2", "--size", "1.5"),
        ("-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1M"),
        ("-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "--size", "1M"),
        ("-O", "qcow2", "-o", "cluster_size=512", "--size", "8E"),
        ("-O", "qcow2", "--output=xml", "--size", "1M"),
        ("-O", "qcow2", "missing.qcow2"),
        ("-O", "qcow2", "-l", "snap", "--size", "1M"),
        ("-O", "qcow2", "-f", "qcow2", "--size", "1M"),
    ],
)
def test_misuse_fails_like_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = cli_run.imago("measure", *args, cwd=tmp_path)
    reference = cli_run.qemu_img("measure", *args, cwd=tmp_path)
    assert result.status == reference.status == 1, (result, reference)
    assert result.out == ""
    assert len(result.err.splitlines()) == 1


def test_internal_snapshot_same_as_qemu_img(tmp_path: Path) -> None:
    image = _make(tmp_path, "snapshots.qcow2")
    assert cli_run.qemu_io(image.name, "write 3M 1M", cwd=tmp_path).status == 0
    for snapshot in ("snap", "snapshot.name=snap"):
        args = ("measure", "-O", "qcow2", "-l", snapshot, image.name)
        cli_run.same_text_as_qemu(cli_run.imago(*args, cwd=tmp_path), cli_run.qemu_img(*args, cwd=tmp_path))
    missing = ("measure", "-O", "qcow2", "-l", "nothing", image.name)
    cli_run.same_text_as_qemu(cli_run.imago(*missing, cwd=tmp_path), cli_run.qemu_img(*missing, cwd=tmp_path))


def test_unknown_option_lists_the_valid_ones() -> None:
    result = cli_run.imago("measure", "-O", "qcow2", "-o", "foo=1", "--size", "1M")
    assert result.status == 1
    assert "Invalid parameter 'foo'" in result.err
    assert "cluster_size, compat," in result.err


def test_unknown_format_and_option_help() -> None:
    bad = cli_run.imago("measure", "-O", "nonsense", "--size", "1M")
    assert bad.status == 1
    assert "Unknown file format 'nonsense'" in bad.err
    listing = cli_run.imago("measure", "-O", "qcow2", "-o", "help")
    assert listing.status == 0
    assert listing.out.startswith("Supported qcow2 options:\n")
    assert "  refcount_bits=<num>    - " in listing.out


def test_source_outside_sandbox_backing_refused(tmp_path: Path) -> None:
    base_dir, top_dir = tmp_path / "base", tmp_path / "top"
    base_dir.mkdir()
    top_dir.mkdir()
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", base_dir / "base.qcow2", "1M").status == 0
    top = top_dir / "top.qcow2"
    assert (
        cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", base_dir / "base.qcow2", "-F", "qcow2", top).status == 0
    )
    refused = cli_run.imago("measure", "-O", "qcow2", top)
    assert refused.status == 1
    assert "--allow-dir" in refused.err
    allowed = cli_run.imago("measure", "--allow-dir", base_dir, "-O", "qcow2", top)
    cli_run.same_text_as_qemu(allowed, cli_run.qemu_img("measure", "-O", "qcow2", top))


def test_the_library_function_measures_as_qemu_img(tmp_path: Path) -> None:
    reference = json.loads(
        cli_run.qemu_img("measure", "--output=json", "--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k").out
    )
    measured = imago.measure("qcow2", 1 << 30, cluster_size=4096)
    assert (measured.required, measured.fully_allocated) == (reference["required"], reference["fully-allocated"])
    with_data = imago.measure("qcow2", 1 << 30, [(0, 1 << 20)])
    assert with_data.required > imago.measure("qcow2", 1 << 30).required
    with pytest.raises(imago.InvalidOptionError, match="cluster_sise"):
        imago.measure("qcow2", 1 << 30, cluster_sise=4096)
    with pytest.raises(imago.DriverNotFoundError):
        imago.measure("nonesuch", 1 << 30)


@pytest.mark.parametrize("target", ["qcow2", "raw"])
def test_a_sparse_raw_sources_holes_are_not_counted(tmp_path: Path, target: str) -> None:
    with open(tmp_path / "sparse.raw", "wb") as f:
        f.truncate(10 << 20)
        f.seek(3 << 20)
        f.write(b"data" * 1024)
    for output in ("human", "json"):
        args = ["measure", f"--output={output}", "-f", "raw", "-O", target, "sparse.raw"]
        ours, reference = cli_run.imago(*args, cwd=tmp_path), cli_run.qemu_img(*args, cwd=tmp_path)
        assert (ours.status, ours.out) == (reference.status, reference.out)
