"""Reading VMDK images made by qemu-img/qemu-io (and by hand): bytes, maps and info as QEMU reports them.

The matrix: every subformat qemu-img 7.2 creates (empty, shuffled writes with zeroes on a disk
whose size is not a multiple of the grain, full, zeroed-grain entries), a > 2 GiB sparse disk in
every hosted subformat (sparse on disk), a three-image backing chain, and the subformats only
VMware makes (vmfs, vmfsSparse, stream-optimized with a footer), built by hand and checked
against what qemu-img reads from them.

Maps and info are compared whole: a flat extent's file holes show as zero data
(``FormatDriver.holes_read_as_data``), and ``actual-size`` counts every extent file
(``FormatDriver.allocated_size``), as QEMU reports them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from imago import (
    FormatDriver,
    MissingStorageError,
    PermissiveImplicitOpenGate,
    ShallowZero,
    StorageOpenOptions,
    SyncFormatAccess,
    probe_sync,
    runtime,
    storage_driver,
)
from imago_vmdk import Vmdk

from ._vmdk import (
    MiB,
    craft_cowd,
    craft_sparse,
    craft_stream,
    descriptor_text,
    imago_cli,
    open_vmdk,
    qemu_img,
    qemu_io,
    qemu_json,
    qemu_raw,
    read_all,
)

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized")
FLAT = ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs")
GRAIN = 64 * 1024


def _shuffled_commands(size: int, seed: int) -> list[str]:
    """qemu-io writes in random order: patterns at unaligned offsets, zeroes, overwrites."""
    rng = random.Random(seed)
    commands = []
    for _ in range(24):
        length = rng.choice((512, 4096, 65536, 70000 // 512 * 512, 3 * GRAIN))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if rng.random() < 0.2:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    commands.append(f"write -P 0x77 {size - 512} 512")  # the last sector of a partial grain
    return commands


def _make(directory: Path, name: str, subformat: str, size: int, commands: list[str], **options: str) -> Path:
    image = directory / f"{name}.vmdk"
    opts = ",".join([f"subformat={subformat}", *(f"{k}={v}" for k, v in options.items())])
    qemu_img("create", "-q", "-f", "vmdk", "-o", opts, image, str(size))
    if commands:
        qemu_io(image, *commands)
    return image


def _stream_from_raw(directory: Path, name: str, data: bytes) -> Path:
    source = directory / f"{name}.src.raw"
    source.write_bytes(data)
    image = directory / f"{name}.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, image)
    source.unlink()
    return image


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (image, subformat) for every image of the matrix."""
    directory = tmp_path_factory.mktemp("vmdk-matrix")
    images: dict[str, tuple[Path, str]] = {}
    odd_size = 5 * MiB + 1536
    for subformat in SUBFORMATS:
        images[f"{subformat}-empty"] = (_make(directory, f"{subformat}-empty", subformat, 3 * MiB, []), subformat)
        if subformat == "streamOptimized":
            rng = random.Random(5)
            data = bytearray(odd_size)
            for _ in range(12):
                start = rng.randrange(odd_size - 100000)
                data[start : start + rng.randrange(1, 100000)] = rng.randbytes(1) * 100000
            data[-512:] = b"\x77" * 512
            images[f"{subformat}-shuffled"] = (
                _stream_from_raw(directory, f"{subformat}-shuffled", bytes(data)),
                subformat,
            )
            full = random.Random(6).randbytes(MiB)
            images[f"{subformat}-full"] = (_stream_from_raw(directory, f"{subformat}-full", full), subformat)
            continue
        name = f"{subformat}-shuffled"
        images[name] = (_make(directory, name, subformat, odd_size, _shuffled_commands(odd_size, 7)), subformat)
        name = f"{subformat}-full"
        images[name] = (_make(directory, name, subformat, MiB, ["write -P 0x5a 0 1M"]), subformat)
    zeroed = ["write -P 0x33 0 256k", "write -z 64k 128k", "write -z 1M 64k"]
    name = "zeroed-grain"
    images[name] = (_make(directory, name, "monolithicSparse", 2 * MiB, zeroed, zeroed_grain="on"), "monolithicSparse")
    return images


def _check_reads(image: Path) -> None:
    assert read_all(image) == qemu_raw(image)


def _runs(entries: list[dict[str, Any]], *, flat: bool) -> list[tuple[Any, ...]]:
    """qemu-img map's entries as runs; for flat extents the file's holes are not told apart (see above)."""
    runs: list[list[Any]] = []
    for e in entries:
        zero = False if flat and e["data"] else e["zero"]
        run = [e["start"], e["length"], e["depth"], e["present"], zero, e["data"], e.get("offset")]
        if runs:
            last = runs[-1]
            contiguous = last[6] is None or (run[6] is not None and last[6] + last[1] == run[6])
            if last[2:6] == run[2:6] and (last[6] is None) == (run[6] is None) and contiguous:
                last[1] += run[1]
                continue
        runs.append(run)
    return [tuple(r) for r in runs]


def _check_map(image: Path, subformat: str) -> None:
    expected = qemu_json("map", "-f", "vmdk", image)
    status, out, err = imago_cli("map", "-f", "vmdk", "--output=json", image)
    assert status == 0, err
    got = json.loads(out)
    assert got == expected


def _check_info(image: Path, multi_file: bool) -> None:
    expected = qemu_json("info", "-f", "vmdk", image)
    status, out, err = imago_cli("info", "-f", "vmdk", "--output=json", image)
    assert status == 0, err
    got = json.loads(out)
    assert got == expected


def test_matrix_reads_maps_info(matrix: dict[str, tuple[Path, str]]) -> None:
    for name, (image, subformat) in matrix.items():
        try:
            _check_reads(image)
            _check_map(image, subformat)
            _check_info(image, multi_file=subformat not in ("monolithicSparse", "streamOptimized"))
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_matrix_covers_what_it_claims(matrix: dict[str, tuple[Path, str]]) -> None:
    """The matrix holds zeroed grains, compressed grains, several extents and partial grains."""
    zeroed = qemu_json("map", "-f", "vmdk", matrix["zeroed-grain"][0])
    assert any(e["present"] and e["zero"] and not e["data"] for e in zeroed)
    stream = open_vmdk(matrix["streamOptimized-shuffled"][0])
    assert stream.driver.info()["format-specific"]["data"]["extents"][0]["compressed"] is True
    assert stream.size % GRAIN != 0
    stream.close()


def test_big_sparse_images(tmp_path: Path) -> None:
    """> 2 GiB (two extents for twoGbMaxExtent*), sparse on disk; data around the 2 GiB boundaries."""
    size = 5 * 1024 * MiB // 2
    commands = [
        "write -P 0x41 0 64k",
        "write -P 0x42 2047M 2M",
        "write -P 0x43 2500M 512",
        f"write -P 0x44 {size - 4096} 4k",
    ]
    for subformat in ("monolithicSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        image = _make(tmp_path, f"big-{subformat}", subformat, size, commands)
        _check_map(image, subformat)
        _check_info(image, multi_file=subformat != "monolithicSparse")
        raw = tmp_path / f"big-{subformat}.raw"
        qemu_img("convert", "-f", "vmdk", "-O", "raw", image, raw)
        access = open_vmdk(image)
        assert access.size == size
        if subformat.startswith("twoGb"):
            assert len(access.driver.extents) == 2
        with raw.open("rb") as f:
            for offset, length in (
                (0, 70000),
                (2047 * MiB - 100, 2 * MiB + 200),
                (2500 * MiB - 7, 600),
                (size - 8192, 8192),
            ):
                f.seek(offset)
                buf = bytearray(length)
                access.read(buf, offset)
                assert bytes(buf) == f.read(length), (subformat, offset)
        access.close()
        raw.unlink()


def test_backing_chain(tmp_path: Path) -> None:
    """base <- mid <- top (delta links), zeroed grains in the top hiding the base."""
    _make(tmp_path, "base", "monolithicSparse", 3 * MiB, ["write -P 0x11 0 3M"])
    mid = tmp_path / "mid.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", mid, cwd=tmp_path)
    qemu_io(mid, "write -P 0x22 64k 128k", "write -P 0x23 1000k 10k")
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", "mid.vmdk", "-F", "vmdk", top, cwd=tmp_path)
    qemu_io(top, "write -P 0x33 128k 64k", "write -z 2M 128k", "write -P 0x34 3145216 512")
    _check_reads(top)
    _check_map(top, "monolithicSparse")
    _check_info(top, multi_file=False)
    access = open_vmdk(top)
    assert access.driver.backing is not None
    assert access.driver.backing.driver.backing is not None
    access.close()
    # The chain through the CLI: every layer as qemu-img shows it.
    expected = qemu_json("info", "--backing-chain", top)
    status, out, _ = imago_cli("info", "--backing-chain", "--output=json", top)
    assert status == 0
    assert json.loads(out) == expected


def test_vmware_only_subformats(tmp_path: Path) -> None:
    """vmfs, vmfsSparse (COWD), stream-optimized with a footer or not: read as qemu-img reads them."""
    rng = random.Random(9)
    craft_stream(
        tmp_path / "footer.vmdk", 3 * MiB + 8192, {0: rng.randbytes(GRAIN), 3: b"a" * GRAIN, 48: rng.randbytes(GRAIN)}
    )
    craft_stream(tmp_path / "nofooter.vmdk", 3 * MiB, {1: b"b" * GRAIN, 2: rng.randbytes(GRAIN)}, footer=False)
    craft_cowd(tmp_path / "c-delta.vmdk", 2 * MiB, {0: b"c" * 8192, 100: rng.randbytes(8192), 4097 % 256: b"e"})
    (tmp_path / "c.vmdk").write_text(descriptor_text(['RW 4096 VMFSSPARSE "c-delta.vmdk"'], create_type="vmfsSparse"))
    (tmp_path / "v-flat.vmdk").write_bytes(rng.randbytes(MiB))
    (tmp_path / "v.vmdk").write_text(descriptor_text(['RW 2048 VMFS "v-flat.vmdk"'], create_type="vmfs"))
    grains: dict[int, bytes | None] = {0: rng.randbytes(8192), 5: None, 700: b"x" * 8192, 1000: b"y" * 4096}
    v3_descriptor = descriptor_text(['RW 16008 SPARSE "v3.vmdk"'], create_type="monolithicSparse")
    v3_size = 1000 * 8192 + 4096
    craft_sparse(
        tmp_path / "v3.vmdk", v3_size, grains, version=3, zero_grain=True, redundant=False, descriptor=v3_descriptor
    )
    for name, subformat in (
        ("footer", "streamOptimized"),
        ("nofooter", "streamOptimized"),
        ("c", "vmfsSparse"),
        ("v", "vmfs"),
        ("v3", "monolithicSparse"),
    ):
        image = tmp_path / f"{name}.vmdk"
        try:
            _check_reads(image)
            _check_map(image, subformat)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error
    info = open_vmdk(tmp_path / "c.vmdk").driver.info()
    assert info["format-specific"]["data"]["create-type"] == "vmfsSparse"
    assert info["format-specific"]["data"]["extents"][0]["format"] == "VMFSSPARSE"


def test_zero_rdonly_and_noaccess_extents(tmp_path: Path) -> None:
    """ZERO extents read as zeroes; RDONLY extents are read; NOACCESS ones read as unallocated.

    (qemu-img skips every extent line but RW ones, which shortens the disk: no QEMU reference.)
    """
    data = random.Random(3).randbytes(MiB)
    (tmp_path / "d-flat.vmdk").write_bytes(data)
    extents = [
        'RW 100 FLAT "d-flat.vmdk" 0',
        "RW 50 ZERO",
        'RDONLY 200 FLAT "d-flat.vmdk" 1000',
        'NOACCESS 10 FLAT "gone.vmdk" 0',
    ]
    (tmp_path / "d.vmdk").write_text(descriptor_text(extents, create_type="monolithicFlat"))
    expected = data[: 100 * 512] + bytes(50 * 512) + data[1000 * 512 : 1200 * 512] + bytes(10 * 512)
    assert read_all(tmp_path / "d.vmdk") == expected
    access = open_vmdk(tmp_path / "d.vmdk")
    assert runtime.run_sync(access.driver.get_mapping(100 * 512, MiB)) == (ShallowZero(True), 50 * 512)
    assert runtime.run_sync(access.driver.get_mapping(350 * 512, MiB)) == (ShallowZero(False), 10 * 512)
    assert [e["format"] for e in access.driver.info()["format-specific"]["data"]["extents"]] == ["FLAT", "FLAT"]
    access.close()


def _probe(path: Path) -> type[FormatDriver]:
    storage = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=str(path))))
    try:
        return probe_sync(storage)
    finally:
        runtime.run_sync(storage.close())


def test_probe(tmp_path: Path) -> None:
    rng = random.Random(4)
    craft_stream(tmp_path / "s.vmdk", MiB, {0: rng.randbytes(GRAIN)})
    craft_cowd(tmp_path / "c.vmdk", MiB, {})
    (tmp_path / "d.vmdk").write_text(descriptor_text(['RW 8 FLAT "x" 0'], create_type="monolithicFlat"))
    (tmp_path / "other").write_bytes(b"# a comment\nversion=4\n")
    for name in ("s.vmdk", "c.vmdk", "d.vmdk"):
        assert _probe(tmp_path / name) is Vmdk, name
    assert _probe(tmp_path / "other") is not Vmdk


def test_metadata_only_leaves_flat_extents_closed(tmp_path: Path) -> None:
    """As ``qemu-img info`` opens images: flat extent files (guest data only) are neither opened nor gated."""
    (tmp_path / "d.vmdk").write_text(
        descriptor_text(['RW 2048 FLAT "missing-flat.vmdk" 0'], create_type="monolithicFlat")
    )
    driver = Vmdk.builder_path(tmp_path / "d.vmdk").metadata_only(True).open_sync(PermissiveImplicitOpenGate())
    access = SyncFormatAccess(driver)
    extents = driver.info()["format-specific"]["data"]["extents"]
    assert extents == [
        {"filename": str(tmp_path / "missing-flat.vmdk"), "format": "FLAT", "virtual-size": MiB},
    ]
    with pytest.raises(MissingStorageError, match="opened for its metadata only"):
        access.read(bytearray(512), 0)
    access.close()
    with pytest.raises(FileNotFoundError):
        open_vmdk(tmp_path / "d.vmdk")


def test_descriptor_in_a_sparse_file_without_capacity(tmp_path: Path) -> None:
    """A KDMV file of capacity 0 whose descriptor area holds a descriptor file (QEMU opens these too)."""
    data = random.Random(8).randbytes(MiB)
    (tmp_path / "e-flat.vmdk").write_bytes(data)
    text = descriptor_text(['RW 2048 FLAT "e-flat.vmdk" 0'], create_type="monolithicFlat")
    craft_sparse(tmp_path / "e.vmdk", 0, {}, descriptor=text)
    assert read_all(tmp_path / "e.vmdk") == qemu_raw(tmp_path / "e.vmdk") == data
