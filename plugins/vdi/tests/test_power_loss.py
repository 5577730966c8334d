"""A power loss at any storage call of a write workload leaves a VDI image qemu-img finds clean.

The image lives on the ``faults`` storage with a volatile write cache; before every call that
changes the file, the test takes the images a power loss would leave (pending changes dropped,
a random subset kept, torn at 512 bytes). Each must pass ``qemu-img check`` (a crash between the
header and the map may leave ``blocks_allocated`` too high, never too low) and read, sector by
sector, either the content before the workload or after it: new blocks' data reaches the disk
before the block map names them.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

import imago
from imago import PermissiveImplicitOpenGate, StorageOpenOptions, SyncFormatAccess, runtime, storage_driver
from imago_faults import Call, Fault, FaultPlan, FaultyStorage, InjectedError
from imago_vdi import Vdi

from ._vdi import MiB, qemu_raw, run

SIZE = 4 * MiB
WRITE_CALLS = ("write", "write_zeroes", "discard", "resize", "flush", "sync")


def test_power_loss_leaves_a_clean_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.vdi"
    imago.create(image, "vdi", SIZE)
    with SyncFormatAccess(Vdi.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())) as disk:
        disk.write(b"\x11" * MiB, MiB)
    before = qemu_raw(image)
    rng = random.Random(3)
    losses: list[bytes] = []
    plan = FaultPlan(write_cache=True)

    def observe(call: Call) -> None:
        if call.op in WRITE_CALLS:
            for seed in range(3):
                losses.append(storage.power_loss_image(rng.randrange(1 << 30), keep=0.5, sector=512 if seed else None))

    inner = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=image, writable=True)))
    storage = FaultyStorage(inner, plan)
    plan.observer = observe
    after = bytearray(before)
    with SyncFormatAccess(Vdi.builder(storage).write().open_sync(PermissiveImplicitOpenGate())) as disk:
        for offset, length, byte in ((MiB + 4096, 8192, 0x22), (3 * MiB + 512, 70_000, 0x33), (100, 5000, 0x44)):
            disk.write(bytes([byte]) * length, offset)
            after[offset : offset + length] = bytes([byte]) * length
        disk.flush()
        disk.write(b"\x55" * 4096, 2 * MiB)
        after[2 * MiB : 2 * MiB + 4096] = b"\x55" * 4096
    assert qemu_raw(image) == after
    assert len(losses) > 10
    lost = tmp_path / "lost.vdi"
    torn = 0
    for data in losses:
        lost.write_bytes(data)
        check = run(["qemu-img", "check", "-f", "vdi", lost])
        if check.returncode != 0:
            # Only a crash between header and map, leaving the count too high (a block wasted).
            found = re.fullmatch(r"ERROR: allocated blocks mismatch, is (\d+), should be (\d+)\n", check.stderr)
            assert found, check.stdout + check.stderr
            assert int(found[1]) < int(found[2])
            torn += 1
        content = qemu_raw(lost)
        for block in range(0, SIZE, 512):
            piece = content[block : block + 512]
            assert piece in (before[block : block + 512], after[block : block + 512]), block
    assert torn < len(losses)


def test_failed_data_write_takes_its_block_back(tmp_path: Path) -> None:
    image = tmp_path / "disk.vdi"
    imago.create(image, "vdi", SIZE)
    # The data write into the new block (at the data area's start: block 0 of the file) fails.
    plan = FaultPlan(faults=[Fault(op="write", offset_range=(1024, 1024 + MiB))])
    inner = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=image, writable=True)))
    disk = SyncFormatAccess(Vdi.builder(FaultyStorage(inner, plan)).write().open_sync(PermissiveImplicitOpenGate()))
    with disk:
        with pytest.raises(InjectedError):
            disk.write(b"\x66" * 4096, 2 * MiB)
        buf = bytearray(4096)
        disk.read(buf, 2 * MiB)
        assert buf == bytes(4096)
        disk.write(b"\x77" * 4096, 3 * MiB)  # (gets the block taken back)
    assert run(["qemu-img", "check", "-f", "vdi", image]).returncode == 0
    expected = bytearray(SIZE)
    expected[3 * MiB : 3 * MiB + 4096] = b"\x77" * 4096
    assert qemu_raw(image) == expected
