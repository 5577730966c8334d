"""Writing and zeroing dynamic VHDX images through the log; QEMU checks and reads the results.

A random workload is compared with a bytearray model, then ``qemu-img check`` must find the
image clean and ``qemu-img compare`` equal to the model. A power loss at any storage call of a
workload (on the ``faults`` storage: pending changes dropped, a random subset kept, torn at 512
bytes) must leave an image that imago opens (the log replayed in memory) and QEMU repairs by
replaying the log (``qemu-img check -r all``), reading each sector as before or after the
workload.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import imago
from imago import (
    PermissiveImplicitOpenGate,
    StorageOpenOptions,
    SyncFormatAccess,
    UnsupportedFeatureError,
    runtime,
    storage_driver,
)
from imago_faults import Call, FaultPlan, FaultyStorage
from imago_vhdx import Vhdx

from ._vhdx import FULL, MiB, craft_vhdx, header_guid, open_vhdx, qemu_img, qemu_raw, read_all

SIZE = 6 * MiB + 1536


def _pending_log(data: bytes) -> bool:
    """Whether the current header (the higher sequence number) names a log to replay."""
    at = max((64 * 1024, 128 * 1024), key=lambda a: struct.unpack_from("<Q", data, a + 8)[0])
    return any(data[at + 48 : at + 64])


@pytest.mark.parametrize("options", [{}, {"block_state_zero": False}, {"subformat": "fixed"}])
def test_random_workload_matches_model_and_qemu(tmp_path: Path, options: dict[str, object]) -> None:
    image = tmp_path / "disk.vhdx"
    imago.create(image, "vhdx", size=SIZE, block_size=MiB, **options)
    model = bytearray(SIZE)
    rng = random.Random(9)
    with open_vhdx(image, writable=True) as disk:
        for step in range(40):
            length = rng.choice((512, 4096, 70_000, MiB, 2 * MiB + 512))
            offset = rng.randrange(0, (SIZE - length) // 512 + 1) * 512
            if step % 5 == 4:
                disk.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                disk.write(data, offset)
                model[offset : offset + length] = data
        whole = bytearray(SIZE)
        disk.read(whole, 0)
        assert whole == model
    qemu_img("check", "-f", "vhdx", image)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", image, raw)
    assert read_all(image) == model


def test_whole_blocks_zeroed_through_metadata(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    imago.create(image, "vhdx", size=4 * MiB, block_size=MiB)
    with open_vhdx(image, writable=True) as disk:
        disk.write(b"\x61" * (4 * MiB), 0)
        size = image.stat().st_size
        disk.write_zeroes(MiB, 2 * MiB)
        assert image.stat().st_size == size  # (no data written for whole blocks)
    expected = b"\x61" * MiB + bytes(2 * MiB) + b"\x61" * MiB
    assert qemu_raw(image) == expected
    qemu_img("check", "-f", "vhdx", image)


def test_power_loss_at_any_call_replays_cleanly(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    imago.create(image, "vhdx", size=4 * MiB, block_size=MiB)
    with open_vhdx(image, writable=True) as disk:
        disk.write(b"\x11" * MiB, MiB)
    before = qemu_raw(image)
    rng = random.Random(3)
    losses: list[bytes] = []
    plan = FaultPlan(write_cache=True)

    def observe(call: Call) -> None:
        if call.op in ("write", "write_zeroes", "discard", "resize", "flush", "sync"):
            for seed in range(2):
                losses.append(storage.power_loss_image(rng.randrange(1 << 30), keep=0.5, sector=512 if seed else None))

    inner = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=str(image), writable=True)))
    storage = FaultyStorage(inner, plan)
    plan.observer = observe
    after = bytearray(before)
    with SyncFormatAccess(Vhdx.builder(storage).write().open_sync(PermissiveImplicitOpenGate())) as disk:
        for offset, length, byte in ((4096, 8192, 0x22), (3 * MiB + 512, 70_000, 0x33), (MiB + 100 * 512, 5000, 0x44)):
            disk.write(bytes([byte]) * length, offset)
            after[offset : offset + length] = bytes([byte]) * length
        disk.write_zeroes(2 * MiB, MiB)
        disk.flush()
    assert qemu_raw(image) == after
    assert len(losses) > 10
    assert sum(map(_pending_log, losses)) > 5
    lost = tmp_path / "lost.vhdx"
    for index, data in enumerate(losses):
        lost.write_bytes(data)
        content = read_all(lost)  # (read-only: any log replayed in memory)
        for sector in range(0, len(before), 512):
            piece = content[sector : sector + 512]
            assert piece in (before[sector : sector + 512], after[sector : sector + 512]), (index, sector)
        if index % 4 == 0:
            qemu_img("check", "-r", "all", "-f", "vhdx", lost)
            assert qemu_raw(lost) == content


def test_read_only_and_differencing_refuse_writes(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    imago.create(image, "vhdx", size=MiB)
    with open_vhdx(image) as disk, pytest.raises(imago.ImagoError):
        disk.write(b"x" * 512, 0)
    parent = tmp_path / "parent.vhdx"
    craft_vhdx(parent, MiB, blocks={0: (FULL, b"p")})
    child = tmp_path / "child.vhdx"
    craft_vhdx(child, MiB, parent={"parent_linkage": str(header_guid(parent)), "relative_path": "parent.vhdx"})
    with pytest.raises(UnsupportedFeatureError, match="differencing"):
        open_vhdx(child, writable=True)


def test_fixed_image_keeps_its_blocks(tmp_path: Path) -> None:
    image = tmp_path / "fixed.vhdx"
    imago.create(image, "vhdx", size=4 * MiB, block_size=MiB, subformat="fixed")
    size = image.stat().st_size
    with open_vhdx(image, writable=True) as disk:
        disk.write(b"\x71" * (4 * MiB), 0)
        disk.write_zeroes(MiB, 2 * MiB)
    assert image.stat().st_size == size  # (LeaveBlocksAllocated: zeroes written, no block given up or added)
    assert qemu_raw(image) == b"\x71" * MiB + bytes(2 * MiB) + b"\x71" * MiB
    qemu_img("check", "-f", "vhdx", image)
