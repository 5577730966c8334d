"""``imago convert`` side by side with ``qemu-img convert`` 7.2.

Each case builds its sources with qemu-img/qemu-io, converts them with both tools and the same
options into two targets, then checks what imago wrote: the same guest content (``qemu-img
compare``), the same allocation (``qemu-img map --output=json``; host offsets compared for raw
targets only) and a clean ``qemu-img check``. Misuse cases compare the one-line error with
qemu-img's, or check that imago's names the file or option.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import cli_run

MIB = 1 << 20


def _map(path: Path, fmt: str, *, offsets: bool) -> list[dict[str, object]]:
    """``qemu-img map --output=json``; without offsets, neighbours that only differed there merge."""
    done = cli_run.qemu_img("map", "--output=json", "-f", fmt, path, cwd=path.parent)
    assert done.status == 0, done.err
    merged: list[dict[str, object]] = []
    for entry in json.loads(done.out):
        if not offsets:
            entry.pop("offset", None)
        if merged and "offset" not in entry:
            last = merged[-1]
            if all(last[key] == entry[key] for key in entry if key not in ("start", "length")):
                last["length"] = int(str(last["length"])) + int(entry["length"])
                continue
        merged.append(entry)
    return merged


def _same_as_qemu(tmp_path: Path, args: list[str], fmt: str, *, compare_map: bool = True) -> tuple[Path, Path]:
    """Convert with both tools (``args`` end with the sources); check content, map and metadata."""
    mine, theirs = tmp_path / f"imago.{fmt}", tmp_path / f"qemu.{fmt}"
    ours = cli_run.imago("convert", "-O", fmt, *args, mine.name, cwd=tmp_path)
    assert ours.status == 0, ours.err
    reference = cli_run.qemu_img("convert", "-O", fmt, *args, theirs.name, cwd=tmp_path)
    assert reference.status == 0, reference.err
    compared = cli_run.qemu_img("compare", "-f", fmt, "-F", fmt, mine.name, theirs.name, cwd=tmp_path)
    assert compared.status == 0, compared.out + compared.err
    if compare_map:
        assert _map(mine, fmt, offsets=fmt == "raw") == _map(theirs, fmt, offsets=fmt == "raw")
    if fmt == "qcow2":
        checked = cli_run.qemu_img("check", "-f", "qcow2", mine.name, cwd=tmp_path)
        assert checked.status == 0, checked.out + checked.err
    return mine, theirs


def _qcow2(tmp_path: Path, name: str, size: str, *writes: str, options: str = "") -> Path:
    path = tmp_path / name
    args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else []) + [name, size]
    assert cli_run.qemu_img(*args, cwd=tmp_path).status == 0
    if writes:
        done = cli_run.qemu_io(name, *writes, cwd=tmp_path)
        assert done.status == 0, done.err
    return path


#: Data, a short zero run inside data, a zero cluster, a sub-4k write, an unaligned zero tail.
_PATTERN = (
    "write -P 1 0 64k",
    "write -z 16k 2k",
    "write -P 2 1M 3k",
    "write -z 2M 64k",
    "write -P 3 3M 512",
    "write -P 4 3200k 100k",
    "write -z 3264k 8k",
    "write -P 5 5M 1M",
    "write -z 5632k 4k",
)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return _qcow2(tmp_path, "src.qcow2", "8M", *_PATTERN)


# --- content, allocation, metadata ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sparse", [None, "0", "64k", "512"])
def test_qcow2_source_sparse_rules(tmp_path: Path, source: Path, fmt: str, sparse: str | None) -> None:
    args = ["-f", "qcow2"] + (["-S", sparse] if sparse is not None else []) + [source.name]
    _same_as_qemu(tmp_path, args, fmt)


def test_raw_source_to_qcow2_with_options(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = bytearray(3 * MIB + 1000)  # not a whole number of sectors: the target is rounded up
    data[0:4096] = os.urandom(4096)
    data[MIB + 512 : MIB + 1024] = b"x" * 512
    data[2 * MIB : 3 * MIB] = os.urandom(MIB)
    data[-10:] = b"end of it!"
    raw.write_bytes(bytes(data))
    _same_as_qemu(tmp_path, ["-f", "raw", "-o", "cluster_size=4k,lazy_refcounts=on", raw.name], "qcow2")
    info = json.loads(cli_run.qemu_img("info", "--output=json", tmp_path / "imago.qcow2").out)
    assert info["cluster-size"] == 4096
    assert info["virtual-size"] == 3 * MIB + 1024
    assert info["format-specific"]["data"]["lazy-refcounts"] is True


@pytest.mark.parametrize("sparse", [None, "12k"])  # 12k: a zero run of 8k opening a buffer stays a hole
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_large_requests_scan_as_qemu_buffers(tmp_path: Path, fmt: str, sparse: str | None) -> None:
    """Data that one extent holds is copied in requests of several 2 MiB buffers; zero runs across,
    at the start of, and just inside buffer edges still leave qemu-img's allocation (its scan is per buffer)."""
    data = bytearray(os.urandom(19 * MIB + 3000))
    for start, length in ((2 * MIB - 6144, 12288), (4 * MIB, 8192), (6 * MIB - 1536, 3072), (14 * MIB, 2 * MIB + 4096)):
        data[start : start + length] = bytes(length)
    data[16 * MIB - 65536 : 16 * MIB + 65536] = bytes(131072)  # across the end of the first large request
    (tmp_path / "full.raw").write_bytes(bytes(data))
    _same_as_qemu(tmp_path, ["-f", "raw", *([] if sparse is None else ["-S", sparse]), "full.raw"], fmt)


@pytest.mark.parametrize("sparse", [None, "0"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_sparse_raw_source_keeps_its_holes(tmp_path: Path, fmt: str, sparse: str | None) -> None:
    """Holes of a raw file are zero areas, as qemu-img learns from the file (and -S 0 writes them)."""
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(8 * MIB)
        f.write(os.urandom(MIB))
        f.seek(40 * MIB)
        f.write(b"\0" * MIB + os.urandom(4096))  # written zeroes are data to the file: -S decides
    extra = [] if sparse is None else ["-S", sparse]
    _same_as_qemu(tmp_path, ["-f", "raw", *extra, raw.name], fmt)


def test_backing_chain_source(tmp_path: Path) -> None:
    _qcow2(tmp_path, "base.qcow2", "4M", "write -P 7 0 2M")
    top = tmp_path / "top.qcow2"
    assert (
        cli_run.qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.name, cwd=tmp_path
        ).status
        == 0
    )
    cli_run.qemu_io(top.name, "write -P 8 1M 64k", "write -z 1536k 64k", cwd=tmp_path)
    _same_as_qemu(tmp_path, ["-f", "qcow2", top.name], "qcow2")
    _same_as_qemu(tmp_path, ["-f", "qcow2", top.name], "raw")


def test_compressed_source_and_compressed_target(tmp_path: Path, source: Path) -> None:
    packed = tmp_path / "packed.qcow2"
    assert cli_run.qemu_img("convert", "-c", "-O", "qcow2", source.name, packed.name, cwd=tmp_path).status == 0
    _same_as_qemu(tmp_path, ["-f", "qcow2", packed.name], "raw")
    mine, _ = _same_as_qemu(tmp_path, ["-c", "-f", "qcow2", source.name], "qcow2")
    compressed = [e for e in json.loads(cli_run.qemu_img("map", "--output=json", mine).out) if e["data"]]
    assert compressed
    assert all("offset" not in e for e in compressed)


def test_compressed_zstd_target(tmp_path: Path, source: Path) -> None:
    args = ["-c", "-o", "compression_type=zstd,cluster_size=16k", "-f", "qcow2", source.name]
    mine, _ = _same_as_qemu(tmp_path, args, "qcow2")
    info = json.loads(cli_run.qemu_img("info", "--output=json", mine).out)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"


@pytest.mark.parametrize("requests", ["1", "8"])
def test_parallel_requests_out_of_order(tmp_path: Path, source: Path, requests: str) -> None:
    _same_as_qemu(tmp_path, ["-m", requests, "-W", "-f", "qcow2", source.name], "qcow2")
    _same_as_qemu(tmp_path, ["-m", requests, "-f", "qcow2", source.name], "raw")


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("raw", ["-t", "none", "-T", "none"]),
        ("qcow2", ["-t", "writeback", "-T", "directsync"]),
        ("raw", ["-o", "preallocation=falloc"]),
        ("qcow2", ["-o", "preallocation=metadata,cluster_size=128k"]),
    ],
)
def test_cache_modes_and_preallocation(tmp_path: Path, source: Path, fmt: str, options: list[str]) -> None:
    _same_as_qemu(tmp_path, [*options, "-f", "qcow2", source.name], fmt)


def test_force_share_reads_through_buffers(tmp_path: Path, source: Path) -> None:
    # -U reads into buffers (a memory map of a file another writer may shrink could fault).
    _same_as_qemu(tmp_path, ["-U", "-f", "qcow2", source.name], "raw")


def test_file_storage_maps_ranges_for_reading(tmp_path: Path) -> None:
    import imago

    data = os.urandom(3 * 65536 + 100)
    path = tmp_path / "d.raw"
    path.write_bytes(data)
    with imago.open(path, "raw") as disk:
        storage = disk.driver.storage
        view = storage.map_read(70_000, 100_000)
        assert view is not None
        assert bytes(view) == data[70_000:170_000]
        assert storage.map_read(len(data) - 10, 11) is None  # past the end: read instead
        assert storage.map_read(0, 0) is None
    with imago.open(path, "raw", direct=True) as disk:
        assert disk.driver.storage.map_read(0, 4096) is None  # O_DIRECT bypasses the page cache


def test_several_sources_concatenated(tmp_path: Path, source: Path) -> None:
    second = _qcow2(tmp_path, "second.qcow2", "3M", "write -P 9 512k 1M")
    raw = tmp_path / "third.raw"
    raw.write_bytes(b"r" * 4096 + bytes(60_000))
    _same_as_qemu(tmp_path, [source.name, second.name, raw.name], "qcow2")
    _same_as_qemu(tmp_path, [source.name, second.name, raw.name], "raw")


def test_new_backing_file(tmp_path: Path) -> None:
    _qcow2(tmp_path, "base.qcow2", "4M", "write -P 7 0 2M")
    top = tmp_path / "top.qcow2"
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.name, cwd=tmp_path)
    cli_run.qemu_io(top.name, "write -P 8 1M 64k", "write -z 1536k 64k", cwd=tmp_path)
    mine, _ = _same_as_qemu(tmp_path, ["-B", "base.qcow2", "-F", "qcow2", top.name], "qcow2")
    info = json.loads(cli_run.qemu_img("info", "--output=json", mine).out)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"


def test_no_create_existing_target(tmp_path: Path, source: Path) -> None:
    for tool in ("imago", "qemu"):
        target = tmp_path / f"{tool}.qcow2"
        cli_run.qemu_img("create", "-q", "-f", "qcow2", target.name, "8M", cwd=tmp_path)
        cli_run.qemu_io(target.name, "write -P 66 0 8M", cwd=tmp_path)
    assert cli_run.imago("convert", "-n", "-O", "qcow2", source, tmp_path / "imago.qcow2").status == 0
    assert cli_run.qemu_img("convert", "-n", "-O", "qcow2", source, tmp_path / "qemu.qcow2").status == 0
    assert cli_run.qemu_img("compare", tmp_path / "imago.qcow2", source).status == 0
    assert cli_run.qemu_img("check", tmp_path / "imago.qcow2").status == 0
    # --target-is-zero on a fresh (zero) target: nothing is written for zero areas.
    for tool in ("imago", "qemu"):
        cli_run.qemu_img("create", "-q", "-f", "qcow2", f"{tool}z.qcow2", "8M", cwd=tmp_path)
    assert (
        cli_run.imago("convert", "-n", "--target-is-zero", "-O", "qcow2", source, tmp_path / "imagoz.qcow2").status == 0
    )
    cli_run.qemu_img("convert", "-n", "--target-is-zero", "-O", "qcow2", source, tmp_path / "qemuz.qcow2")
    assert _map(tmp_path / "imagoz.qcow2", "qcow2", offsets=False) == _map(
        tmp_path / "qemuz.qcow2", "qcow2", offsets=False
    )
    assert cli_run.qemu_img("compare", tmp_path / "imagoz.qcow2", source).status == 0


def test_internal_snapshot(tmp_path: Path, source: Path) -> None:
    assert cli_run.qemu_img("snapshot", "-c", "snap1", source.name, cwd=tmp_path).status == 0
    cli_run.qemu_io(source.name, "write -P 42 0 1M", cwd=tmp_path)
    _same_as_qemu(tmp_path, ["-l", "snap1", source.name], "qcow2")
    _same_as_qemu(tmp_path, ["-l", "snapshot.name=snap1", source.name], "raw")
    (tmp_path / "imago.raw").unlink()
    (tmp_path / "qemu.raw").unlink()
    _same_as_qemu(tmp_path, ["-l", "snapshot.id=1", source.name], "raw")


def test_existing_target_is_overwritten(tmp_path: Path, source: Path) -> None:
    target = tmp_path / "imago.raw"
    target.write_bytes(b"old" * 10_000_000)
    _same_as_qemu(tmp_path, [source.name], "raw")
    assert target.stat().st_size == 8 * MIB


def test_progress_and_quiet(tmp_path: Path, source: Path) -> None:
    done = cli_run.imago("convert", "--progress=json", source, tmp_path / "p.raw")
    assert done.status == 0
    last = json.loads(done.err.splitlines()[-1])
    assert last["done"] == last["total"] == 8 * MIB
    done = cli_run.imago("convert", "-q", "-p", source, tmp_path / "q.raw")
    assert done.status == 0
    assert done.err == ""


# --- misuse --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["src.qcow2"],
        ["-S", "x", "src.qcow2", "t"],
        ["-S", "100", "src.qcow2", "t"],
        ["-S", "32M", "src.qcow2", "t"],
        ["-m", "0", "src.qcow2", "t"],
        ["-m", "17", "src.qcow2", "t"],
        ["-m", "x", "src.qcow2", "t"],
        ["--target-is-zero", "src.qcow2", "t"],
        ["-O", "nosuchfmt", "src.qcow2", "t"],
        ["-f", "nosuchfmt", "src.qcow2", "t"],
        ["-c", "-O", "raw", "src.qcow2", "t"],
        ["-n", "-o", "cluster_size=4k", "src.qcow2", "t"],
        ["-t", "bogus", "src.qcow2", "t"],
        ["-O", "qcow2", "-B", "src.qcow2", "src.qcow2", "t"],
        ["-O", "qcow2", "-B", "src.qcow2", "-F", "qcow2", "src.qcow2", "src.qcow2", "t"],
        ["-l", "nosnap", "src.qcow2", "t"],
        ["-l", "snap", "src.qcow2", "src.qcow2", "t"],
        ["-B", "src.qcow2", "-F", "qcow2", "src.qcow2", "t"],
    ],
)
def test_usage_errors_as_qemu(tmp_path: Path, source: Path, args: list[str]) -> None:
    ours = cli_run.imago("convert", *args, cwd=tmp_path)
    assert not (tmp_path / "t").exists()  # checked before anything was created
    theirs = cli_run.qemu_img("convert", *args, cwd=tmp_path)
    assert ours.status == theirs.status == 1
    # qemu-img wraps one message over two lines; imago's errors are one line.
    assert ours.err.replace("imago:", "qemu-img:") == theirs.err.replace(" for\nqemu-img: ", " for ")


def test_unknown_option_names_valid_ones(tmp_path: Path, source: Path) -> None:
    done = cli_run.imago("convert", "-O", "qcow2", "-o", "foo=1", source, tmp_path / "t")
    assert done.status == 1
    assert "Invalid parameter 'foo'" in done.err
    assert "cluster_size" in done.err
    assert len(done.err.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_bad_option_value(tmp_path: Path, source: Path) -> None:
    done = cli_run.imago("convert", "-O", "qcow2", "-o", "compression_type=foo", source, tmp_path / "t")
    assert done.status == 1
    assert "compression" in done.err
    assert len(done.err.splitlines()) == 1


def test_missing_source_and_wrong_format(tmp_path: Path, source: Path) -> None:
    done = cli_run.imago("convert", tmp_path / "missing", tmp_path / "t")
    assert done.status == 1
    assert "missing" in done.err
    assert len(done.err.splitlines()) == 1
    done = cli_run.imago("convert", "-f", "nosuchfmt", source, tmp_path / "t")
    assert done.status == 1
    assert "nosuchfmt" in done.err
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(4096))
    done = cli_run.imago("convert", "-f", "qcow2", raw, tmp_path / "t")
    assert done.status == 1
    assert "plain.raw" in done.err
    assert len(done.err.splitlines()) == 1


def test_target_too_small_with_no_create(tmp_path: Path, source: Path) -> None:
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(65536))
    ours = cli_run.imago("convert", "-n", source, small)
    assert ours.status == 1
    assert ours.err == "imago: output file is smaller than input file\n"


def test_target_is_zero_with_backing(tmp_path: Path, source: Path) -> None:
    target = _qcow2(tmp_path, "t.qcow2", "8M")
    done = cli_run.imago(
        "convert",
        "-n",
        "--target-is-zero",
        "-B",
        "src.qcow2",
        "-F",
        "qcow2",
        "-O",
        "qcow2",
        source.name,
        target.name,
        cwd=tmp_path,
    )
    # qemu-img prints this and still exits 0; imago fails, having written nothing.
    assert done.status == 1
    assert "Cannot use --target-is-zero when the destination image has a backing file" in done.err


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make *path* read-only even for root: immutable (``chattr +i``) where the file system can, else mode bits."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", path], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
        return
    mode = path.stat().st_mode
    path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        yield
    finally:
        path.chmod(mode)


def test_read_only_target_directory(tmp_path: Path, source: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    with _read_only(locked):
        done = cli_run.imago("convert", source, locked / "t.raw")
    assert done.status == 1
    assert "t.raw" in done.err
    assert len(done.err.splitlines()) == 1
    assert not (locked / "t.raw").exists()


def test_read_only_target_file(tmp_path: Path, source: Path) -> None:
    target = tmp_path / "t.raw"
    target.write_bytes(b"keep" * 4 * MIB)
    with _read_only(target):
        done = cli_run.imago("convert", "-n", source, target)
        again = cli_run.imago("convert", source, target)  # replacing it fails too
    for result in (done, again):
        assert result.status == 1
        assert "t.raw" in result.err
        assert len(result.err.splitlines()) == 1
    assert target.read_bytes() == b"keep" * 4 * MIB


def test_target_in_a_file_instead_of_a_directory(tmp_path: Path, source: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    done = cli_run.imago("convert", source, tmp_path / "plain" / "t.raw")
    assert done.status == 1
    assert "t.raw" in done.err
    assert len(done.err.splitlines()) == 1


def test_truncated_source(tmp_path: Path, source: Path) -> None:
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(source.read_bytes()[:300_000])
    done = cli_run.imago("convert", "-f", "qcow2", broken, tmp_path / "t.raw")
    assert done.status == 1
    assert "broken.qcow2" in done.err
    assert len(done.err.splitlines()) == 1
    assert "Traceback" not in done.err


def test_backing_outside_sandbox(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    _qcow2(outside, "base.qcow2", "1M", "write -P 1 0 64k")
    top = inside / "top.qcow2"
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", str(outside / "base.qcow2"), "-F", "qcow2", top)
    done = cli_run.imago("convert", top, inside / "t.raw")
    assert done.status == 1
    assert "base.qcow2" in done.err
    assert "--allow-dir" in done.err
    done = cli_run.imago("convert", "--allow-dir", outside, top, inside / "t.raw")
    assert done.status == 0, done.err


def test_a_source_may_not_open_what_lies_next_to_the_target(tmp_path: Path) -> None:
    # An uploaded image naming a file of the store it is converted into must not read it.
    uploads, store = tmp_path / "uploads", tmp_path / "store"
    uploads.mkdir()
    store.mkdir()
    _qcow2(store, "secret.qcow2", "1M", "write -P 7 0 64k")
    evil = uploads / "evil.qcow2"
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", str(store / "secret.qcow2"), "-F", "qcow2", evil)
    done = cli_run.imago("convert", "-O", "raw", evil, store / "out.raw")
    assert done.status == 1
    assert "secret.qcow2" in done.err
    assert "outside the allowed directories" in done.err
    assert "--allow-dir" in done.err
    assert not (store / "out.raw").exists() or 7 not in (store / "out.raw").read_bytes()
    # The target's own backing file (-B) lies next to the target: allowed there.
    out = store / "out.qcow2"
    done = cli_run.imago("convert", "-O", "qcow2", "-B", "secret.qcow2", "-F", "qcow2", store / "secret.qcow2", out)
    assert done.status == 0, done.err
    assert cli_run.qemu_img("compare", "-q", store / "secret.qcow2", out).status == 0


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_interrupt_leaves_target_consistent(tmp_path: Path) -> None:
    source = tmp_path / "big.raw"
    with source.open("wb") as out:
        for index in range(96):
            out.seek(index * 2 * MIB)
            out.write(os.urandom(MIB))
    target = tmp_path / "t.qcow2"
    imago_bin = Path(sys.executable).parent / "imago"
    process = subprocess.Popen(
        [imago_bin, "convert", "-m", "1", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", source, target],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not target.exists() or target.stat().st_size < 4 * MIB):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.fail("the conversion finished before Ctrl-C; make the source larger")
    assert process.returncode == 130
    assert err.strip().splitlines() == ["imago: interrupted: the images were closed consistently"]
    checked = cli_run.qemu_img("check", "-f", "qcow2", target)
    assert checked.status in (0, 3), checked.out + checked.err  # leaks allowed, no corruption


# --- the -S rule against a sector-by-sector transcription of qemu-img's ----------------------------


def _reference_same(buf: bytes, n: int, sector: int, alignment: int) -> tuple[bool, int]:
    zero = [not any(buf[i * 512 : (i + 1) * 512]) for i in range(n)]
    i = 1
    while i < n and zero[i] == zero[0]:
        i += 1
    is_zero = zero[0]
    if i == n:
        return not is_zero, i
    tail = (sector + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not is_zero, i


def _reference_plan(buf: bytes, n: int, min_sparse: int, sector: int, alignment: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    done = 0
    while done < n:
        rest = n - done
        minimum = min(min_sparse, rest)
        data, run = _reference_same(buf[done * 512 :], rest, sector + done, alignment)
        if data:
            used = checked = run
            while checked < rest:
                more, step = _reference_same(
                    buf[(done + checked) * 512 :], rest - checked, sector + done + checked, alignment
                )
                checked += step
                if more:
                    used = checked
                elif step >= minimum:
                    break
            run = used
        if out and out[-1][2] == data:
            out[-1] = (out[-1][0], out[-1][1] + run, data)
        else:
            out.append((done, run, data))
        done += run
    return out


@pytest.mark.parametrize("seed", range(40))
def test_sparse_plan_is_qemu_rule(seed: int) -> None:
    from imago.cli.convert_sparse import sparse_plan

    rng = random.Random(seed)
    sectors = rng.choice([1, 3, 16, 64, 200])
    buf = bytearray()
    while len(buf) < sectors * 512:
        length = rng.choice([1, 7, 500, 512, 513, 1024, 4096, 9000])
        buf += bytes(length) if rng.random() < 0.5 else rng.randbytes(length).replace(b"\0", b"\1")
        if rng.random() < 0.3:  # a sector that is zero but for its last byte, or its first word
            buf += bytes(511) + b"\1" if rng.random() < 0.5 else bytes(8) + b"\1" * 504
    del buf[sectors * 512 :]
    min_sparse = rng.choice([1, 2, 8, 128])
    alignment = rng.choice([1, 8, 16])
    sector = rng.randrange(0, 64)
    assert sparse_plan(memoryview(buf), sectors, min_sparse, sector, alignment) == _reference_plan(
        bytes(buf), sectors, min_sparse, sector, alignment
    )
