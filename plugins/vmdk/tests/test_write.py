"""Writing into VMDK images: sparse and flat subformats against a bytearray model and QEMU."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imago
from imago import FormatDriver, PermissiveImplicitOpenGate, UnsupportedFeatureError
from imago.testing import FormatConformance
from imago_vmdk import Vmdk

from ._vmdk import (
    WRITABLE_SUBFORMATS,
    MiB,
    assert_qemu_clean_and_equal,
    craft_cowd,
    craft_stream,
    descriptor_text,
    open_writable,
    qemu_img,
    qemu_io,
    qemu_json,
    read_all,
)

SIZE = 2 * MiB + 3584  # (not a multiple of the grain)

_operation = st.tuples(
    st.sampled_from(["write", "write_zeroes", "discard_to_zero", "discard_to_any", "write"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 200_000),
)


def _workload(image: Path, operations: list[tuple[str, int, int]], seed: int) -> bytes:
    """Apply *operations*; the model of what the disk must read (``None`` where anything goes)."""
    rng = random.Random(seed)
    model = bytearray(SIZE)
    free = bytearray(SIZE)  # 1 where discard_to_any left the content undefined
    with open_writable(image) as disk:
        for name, offset, length in operations:
            length = min(length, SIZE - offset)
            if name == "write":
                data = rng.randbytes(length)
                disk.write(data, offset)
                model[offset : offset + length] = data
                free[offset : offset + length] = bytes(length)
            else:
                getattr(disk, name)(offset, length)
                model[offset : offset + length] = bytes(length)
                free[offset : offset + length] = (b"\1" if name == "discard_to_any" else b"\0") * length
        content = bytearray(SIZE)
        disk.read(content, 0)
    for index in range(SIZE):
        if free[index]:
            model[index] = content[index]
    assert bytes(content) == bytes(model)
    return bytes(model)


@pytest.mark.parametrize("subformat", WRITABLE_SUBFORMATS)
def test_random_workload_matches_model_and_qemu(tmp_path_factory: pytest.TempPathFactory, subformat: str) -> None:
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(operations=st.lists(_operation, min_size=1, max_size=12), seed=st.integers(0, 1 << 16))
    def run(operations: list[tuple[str, int, int]], seed: int) -> None:
        directory = tmp_path_factory.mktemp("w")
        image = directory / "disk.vmdk"
        zeroed = subformat == "monolithicSparse"
        options: dict[str, Any] = {"zeroed_grain": True} if zeroed else {}
        imago.create(image, "vmdk", SIZE, subformat=subformat, **options)
        model = _workload(image, operations, seed)
        assert_qemu_clean_and_equal(image, model)

    run()


def test_copy_on_write_into_a_delta_matches_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    imago.create(base, "vmdk", SIZE)
    with open_writable(base) as disk:
        disk.write(bytes(range(256)) * (SIZE // 256), 0)
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    for top in (ours, theirs):
        qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top, cwd=tmp_path)
    with open_writable(ours) as disk:
        disk.write(b"\x44" * 1000, 70_000)  # a partial grain: the rest comes from the parent
        disk.write(b"\x45" * 100_000, 1_000_000)
        disk.write_zeroes(300_000, 200_000)
        disk.discard_to_backing(1_048_576, 65_536)
    # (qemu-io cannot give a grain back: the 0x45 bytes stop where ours were discarded.)
    qemu_io(theirs, "write -P 0x44 70000 1000", "write -P 0x45 1000000 48576", "write -z 300000 200000")
    qemu_img("compare", ours, theirs)
    qemu_img("check", "-q", ours)
    # discard_to_backing gave the grain back to the parent: it reads the parent's bytes there.
    with imago.open(ours, "vmdk", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(65_536)
        disk.read(buf, 1_048_576)
        assert bytes(buf) == (bytes(range(256)) * 256)[: len(buf)]


def test_first_write_records_a_new_cid(tmp_path: Path) -> None:
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", MiB, subformat="monolithicFlat")
    before = qemu_json("info", image)["format-specific"]["data"]["cid"]
    with open_writable(image) as disk:
        disk.write(b"x", 0)
        assert disk.driver.info()["format-specific"]["data"]["cid"] != before
    after = qemu_json("info", image)["format-specific"]["data"]["cid"]
    assert after != before
    assert_qemu_clean_and_equal(image, b"x" + bytes(MiB - 1))


def test_grain_table_reaches_the_disk_after_the_data(tmp_path: Path) -> None:
    """Until a flush, the file's grain tables do not name the new grain; after it both copies do."""
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", MiB)
    header = image.read_bytes()[:512]
    rgd, gd = struct.unpack_from("<QQ", header, 48)

    def entries() -> tuple[int, int]:
        data = image.read_bytes()
        tables = [struct.unpack_from("<I", data, d * 512)[0] for d in (rgd, gd)]
        first, second = (struct.unpack_from("<I", data, t * 512 + 4)[0] for t in tables)
        return first, second

    with open_writable(image) as disk:
        disk.write(b"\x99" * 65536, 65536)  # grain 1
        assert entries() == (0, 0)
        assert b"\x99" * 65536 in image.read_bytes()  # the data is there already
        disk.flush()
        first, second = entries()
        assert first == second != 0
        assert image.read_bytes()[first * 512 : first * 512 + 65536] == b"\x99" * 65536


def test_zeroed_grains_need_no_data(tmp_path: Path) -> None:
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", 4 * MiB, zeroed_grain=True)
    with open_writable(image) as disk:
        disk.write(b"\x12" * (4 * MiB), 0)
    size = image.stat().st_size
    with open_writable(image) as disk:
        disk.write_zeroes(0, 4 * MiB)
    assert image.stat().st_size == size
    assert all(not m["data"] for m in qemu_json("map", image))
    assert_qemu_clean_and_equal(image, bytes(4 * MiB))


@pytest.mark.parametrize("kind", ["stream", "cowd"])
def test_read_only_extent_kinds_refuse_writing(tmp_path: Path, kind: str) -> None:
    if kind == "stream":
        image = tmp_path / "s.vmdk"
        craft_stream(image, MiB, {0: b"\1" * 65536})
    else:
        craft_cowd(tmp_path / "c-delta.vmdk", MiB, {})
        image = tmp_path / "c.vmdk"
        image.write_text(descriptor_text(['RW 2048 VMFSSPARSE "c-delta.vmdk"'], create_type="vmfsSparse"))
    with pytest.raises(UnsupportedFeatureError, match="writing"):
        Vmdk.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('RDONLY 200 FLAT "b.raw" 0', "RDONLY FLAT"),
        ('NOACCESS 200 FLAT "b.raw" 0', "NOACCESS FLAT"),
        ("RW 200 ZERO", "RW ZERO"),
    ],
)
def test_extents_the_descriptor_keeps_from_writes_refuse_a_writable_open(tmp_path: Path, line: str, words: str) -> None:
    """An RDONLY, NOACCESS or ZERO extent: no writable open, the error names the line; no file changes."""
    data = random.Random(9).randbytes(200 * 512)
    for name in ("a.raw", "b.raw"):
        (tmp_path / name).write_bytes(data)
    image = tmp_path / "d.vmdk"
    text = descriptor_text(['RW 200 FLAT "a.raw" 0', line], create_type="monolithicFlat")
    image.write_text(text)
    with pytest.raises(UnsupportedFeatureError, match=f"with {words} extents: line 9 of the descriptor .*d.vmdk"):
        open_writable(image)
    assert image.read_text() == text
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes() == data
    tail = data if words.startswith("RDONLY") else bytes(len(data))  # (NOACCESS and ZERO read as zeroes)
    assert read_all(image) == data + tail  # (read-only opens still work)


def test_hostile_grain_table_refused_for_writing(tmp_path: Path) -> None:
    """A grain table placed on the descriptor would overwrite it: the image does not open writable."""
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", MiB)
    data = bytearray(image.read_bytes())
    gd = struct.unpack_from("<Q", data, 56)[0]
    struct.pack_into("<I", data, gd * 512, 1)  # table 0 on the embedded descriptor
    image.write_bytes(bytes(data))
    with pytest.raises(imago.CorruptImageError, match="grain table 0"):
        Vmdk.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())


# --- the conformance suite on the writable subformats ---------------------------------------------


class _Created(FormatConformance):
    subformat = "monolithicSparse"
    options: ClassVar[dict[str, Any]] = {}

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        image = directory / "disk.vmdk"
        imago.create(image, "vmdk", size, subformat=self.subformat, **self.options)
        return Vmdk.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        imago.SyncFormatAccess(image).close()
        assert path is not None
        return Vmdk.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


class TestMonolithicSparseZeroedGrain(_Created):
    options: ClassVar[dict[str, Any]] = {"zeroed_grain": True}


class TestMonolithicFlat(_Created):
    subformat = "monolithicFlat"


class TestTwoGbMaxExtentSparse(_Created):
    subformat = "twoGbMaxExtentSparse"


def test_partial_grain_of_a_delta_needs_its_parent(tmp_path: Path) -> None:
    imago.create(tmp_path / "base.vmdk", "vmdk", MiB)
    top = tmp_path / "top.vmdk"
    imago.create(top, "vmdk", backing_file="base.vmdk", backing_fmt="vmdk")
    driver = Vmdk.builder_path(top).write().open_backing(False).open_sync(PermissiveImplicitOpenGate())
    with imago.SyncFormatAccess(driver) as disk:
        disk.write(b"\1" * 65536, 65536)  # a whole grain needs nothing of the parent
        with pytest.raises(UnsupportedFeatureError, match="without its parent"):
            disk.write(b"\2" * 100, 200_000)
