"""Writing into VDI images: qemu-img finds them clean and equal to a bytearray model."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imago
from imago import PermissiveImplicitOpenGate, ReadOnlyError, SyncFormatAccess
from imago_vdi import Vdi

from ._vdi import (
    UNALLOCATED,
    MiB,
    assert_qemu_clean_and_equal,
    craft_vdi,
    imago_cli,
    open_vdi,
    qemu_img,
    qemu_io,
    qemu_raw,
    run,
)

SIZE = 4 * MiB + 3584  # (not a multiple of the block)

_operation = st.tuples(
    st.sampled_from(["write", "write_zeroes", "discard_to_zero", "discard_to_any", "write"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 1_500_000),
)


def _entries(image: Path) -> list[int]:
    data = image.read_bytes()
    count = struct.unpack_from("<I", data, 0x180)[0]
    return list(struct.unpack_from(f"<{count}I", data, 512))


@pytest.mark.parametrize("origin", ["qemu-dynamic", "qemu-static", "imago-dynamic"])
def test_shuffled_writes_clean_and_equal(tmp_path: Path, origin: str) -> None:
    image = tmp_path / "disk.vdi"
    if origin.startswith("qemu"):
        static = "on" if origin.endswith("static") else "off"
        qemu_img("create", "-q", "-f", "vdi", "-o", f"static={static}", image, str(SIZE))
        qemu_io(image, "write -P 0x61 1536k 8k")
    else:
        imago.create(image, "vdi", SIZE)
    model = bytearray(qemu_raw(image))
    rng = random.Random(5)
    writes = [(rng.randrange(SIZE - 300_000), rng.randrange(1, 300_000)) for _ in range(12)]
    rng.shuffle(writes)
    with open_vdi(image, write=True) as disk:
        for offset, length in writes:
            data = rng.randbytes(length)
            disk.write(data, offset)
            model[offset : offset + length] = data
        disk.write_zeroes(100_000, 1_200_000)
        model[100_000:1_300_000] = bytes(1_200_000)
    assert_qemu_clean_and_equal(image, bytes(model))
    # Blocks taken in write order, one after another at the end of the file.
    allocated = sorted(e for e in _entries(image) if e != UNALLOCATED)
    assert allocated == list(range(len(allocated)))
    assert image.stat().st_size == 1024 + len(allocated) * MiB


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(_operation, min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_random_workloads_clean_and_equal(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[str, int, int]], seed: int
) -> None:
    image = tmp_path_factory.mktemp("workload") / "disk.vdi"
    imago.create(image, "vdi", SIZE)
    rng = random.Random(seed)
    model = bytearray(SIZE)
    undefined = bytearray(SIZE)  # 1 where discard_to_any left the content undefined
    with open_vdi(image, write=True) as disk:
        for name, offset, length in operations:
            length = min(length, SIZE - offset)
            if name == "write":
                data = rng.randbytes(length)
                disk.write(data, offset)
                model[offset : offset + length] = data
                undefined[offset : offset + length] = bytes(length)
            else:
                getattr(disk, name)(offset, length)
                model[offset : offset + length] = bytes(length)
                undefined[offset : offset + length] = (b"\1" if name == "discard_to_any" else b"\0") * length
    content = qemu_raw(image)
    for index in range(0, SIZE, 4096):
        if not any(undefined[index : index + 4096]):
            assert content[index : index + 4096] == model[index : index + 4096], index
    qemu_img("check", "-f", "vdi", image)


def test_convert_to_vdi_clean_and_equal(tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, str(SIZE))
    rng = random.Random(9)
    commands = [f"write -P {i + 1} {rng.randrange(SIZE - 70_000) // 512 * 512} 65536" for i in range(10)]
    assert run(["qemu-io", "-f", "qcow2", *[arg for c in commands for arg in ("-c", c)], source]).returncode == 0
    model = tmp_path / "model.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", source, model)
    for options in ("static=off", "static=on"):
        target = tmp_path / f"target-{options}.vdi"
        status, _, err = imago_cli("convert", "-f", "qcow2", "-O", "vdi", "-o", options, source, target)
        assert status == 0, err
        assert_qemu_clean_and_equal(target, model.read_bytes())
        status, out, err = imago_cli("compare", "-f", "vdi", "-F", "qcow2", target, source)
        assert (status, out) == (0, "Images are identical.\n"), err


def test_map_updated_only_at_flush_after_the_data(tmp_path: Path) -> None:
    image = tmp_path / "disk.vdi"
    imago.create(image, "vdi", SIZE)
    disk = open_vdi(image, write=True)
    with disk:
        disk.write(b"\x77" * 4096, 2 * MiB + 512)
        # Not yet flushed: the file's map still names no block (a crash now loses only the write).
        assert set(_entries(image)) == {UNALLOCATED}
        disk.flush()
        assert _entries(image)[2] == 0
        assert struct.unpack_from("<I", image.read_bytes(), 0x184)[0] == 1
    qemu_io(image, "read -P 0x77 2097664 4096", "read -P 0 2097152 512", "read -P 0 2101760 1044480")


def test_read_only_and_full_block_count(tmp_path: Path) -> None:
    image = tmp_path / "disk.vdi"
    imago.create(image, "vdi", 2 * MiB)
    with open_vdi(image) as disk, pytest.raises(ReadOnlyError):
        disk.write(b"x", 0)
    with SyncFormatAccess(Vdi.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())) as disk:
        disk.write(b"\1" * (2 * MiB), 0)
    assert_qemu_clean_and_equal(image, b"\1" * (2 * MiB))


def test_gaps_below_the_last_block_are_reused(tmp_path: Path) -> None:
    image = tmp_path / "gaps.vdi"
    # Image block 0 unused, block 1 (the last of 2) in use: a new block must take block 0.
    craft_vdi(image, 2 * MiB, entries=[1, UNALLOCATED], blocks_allocated=1, file_size=1024 + 2 * MiB)
    with open_vdi(image, write=True) as disk:
        disk.write(b"\x12" * 512, MiB + 512)
    assert _entries(image) == [1, 0]
    assert_qemu_clean_and_equal(image, bytes(MiB + 512) + b"\x12" * 512 + bytes(MiB - 1024))
