"""imago's qcow2 check and repair against ``qemu-img check`` on a corpus of damaged images.

Each case (see :mod:`._damaged`) builds one damaged image with qemu-img/qemu-io and byte
patches, on one of several cluster sizes and refcount widths, with or without an internal
snapshot and extended L2 entries. For each:

* qemu-img reports the damage the builder made (so that no case is vacuous);
* imago's check equals ``qemu-img check``: exit status, the JSON dict, the finding lines;
* ``-r all`` (and ``-r leaks`` on leak-only images) repairs one copy with imago and another with
  qemu-img: the same exit status, JSON and lines as qemu-img's repair, then ``qemu-img check``
  finds the same on both copies (nothing, where qemu-img's repair is complete) and
  ``qemu-img compare`` finds the same content (what QEMU cannot read, by either repair, is
  made unallocated in both copies first).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imago import CheckResult, ImagoError, PermissiveImplicitOpenGate, SyncFormatAccess
from imago_qcow2 import Qcow2, Qcow2Builder

from . import _damaged as dmg
from ._damaged import Builder, Damaged, Geometry, QemuCheck

G64K = Geometry(65536, 16)
G512 = Geometry(512, 64)
G4K_R1 = Geometry(4096, 1)
G64K_XL2 = Geometry(65536, 64, extended_l2=True)
G4K_SNAP = Geometry(4096, 16, snapshot=True)
G512_SNAP = Geometry(512, 8, snapshot=True)
G64K_XL2_SNAP = Geometry(65536, 2, extended_l2=True, snapshot=True)
ALL = (G64K, G512, G4K_R1, G64K_XL2, G4K_SNAP, G512_SNAP, G64K_XL2_SNAP)


@dataclass(frozen=True)
class Case:
    """One builder on one geometry."""

    builder: Builder
    geometry: Geometry

    @property
    def id(self) -> str:
        return f"{self.builder.__name__}-{self.geometry.id}"

    def build(self, directory: Path) -> Damaged:
        return self.builder(directory, self.geometry)


def cases(builder: Builder, *geometries: Geometry) -> list[Case]:
    """*builder* on each of *geometries*."""
    return [Case(builder, g) for g in geometries]


CASES = [
    *cases(dmg.leak_free_cluster, *ALL),
    *cases(dmg.leak_marked_corrupt, G64K, G4K_SNAP),
    *cases(dmg.refcount_raised_l2, G64K, G4K_SNAP, G64K_XL2_SNAP),
    *cases(dmg.refcount_raised_data, G512, G64K_XL2, G512_SNAP),
    *cases(dmg.refcount_lowered_shared_data, G4K_SNAP, G64K_XL2_SNAP),
    *cases(dmg.refcount_lowered_shared_l2, G512_SNAP, G64K_XL2_SNAP),
    *cases(dmg.refcount_zero_data, G64K, G4K_R1, G4K_SNAP),
    *cases(dmg.refcount_zero_l2, G512, G64K_XL2, G64K_XL2_SNAP),
    *cases(dmg.copied_cleared_l2, G64K, G4K_R1, G64K_XL2, G512_SNAP),
    *cases(dmg.copied_cleared_l1, G512, G4K_SNAP),
    *cases(dmg.copied_set_shared_l2, G4K_SNAP, G64K_XL2_SNAP),
    *cases(dmg.copied_set_shared_l1, G512_SNAP, G64K_XL2_SNAP),
    *cases(dmg.referenced_twice, G64K, G4K_R1, G64K_XL2_SNAP),
    *cases(dmg.l2_entry_past_eof, G64K, G512, G4K_SNAP),
    *cases(dmg.unaligned_data, G4K_R1, G64K_XL2, G4K_SNAP),
    *cases(dmg.unaligned_zero, G64K, G64K_XL2_SNAP),
    *cases(dmg.unaligned_l2, G64K, G64K_XL2_SNAP),
    *cases(dmg.l2_table_twice, G512, G4K_R1, G4K_SNAP),
    *cases(dmg.l2_on_refcount_block, G64K, G64K_XL2),
    *cases(dmg.l2_on_l1, G512, G64K_XL2_SNAP),
    *cases(dmg.reftable_entry_past_eof, G64K, G4K_R1),
    *cases(dmg.reftable_entry_zero, G64K, G512, G4K_SNAP),
    *cases(dmg.reftable_entry_on_l1, G64K, G64K_XL2_SNAP),
    *cases(dmg.reftable_entry_on_l2, G512, G4K_R1),
    *cases(dmg.reftable_entry_unaligned, G64K_XL2),
    *cases(dmg.compressed_shared_low, G64K, G512_SNAP),
    *cases(dmg.snapshot_l1_unaligned, G4K_SNAP, G64K_XL2_SNAP),
    *cases(dmg.subcluster_alloc_and_zero, G64K_XL2, G64K_XL2_SNAP),
    *cases(dmg.subcluster_unallocated_with_bits, G64K_XL2),
    *cases(dmg.dirty_lazy_opened, G64K, G4K_R1, G64K_XL2_SNAP),
    *cases(dmg.dirty_lazy_created, G512, G64K_XL2, G4K_SNAP),
]
# Only leaks: a raised refcount is a pure leak where the cluster is shared with a snapshot (its
# COPIED flag is clear either way); on a private cluster COPIED then disagrees too.
LEAK_CASES = [
    *cases(dmg.leak_free_cluster, G64K, G4K_R1, G64K_XL2_SNAP),
    *cases(dmg.leak_marked_corrupt, G4K_SNAP),
    *cases(dmg.refcount_raised_l2, G4K_SNAP, G64K_XL2_SNAP),
    *cases(dmg.refcount_raised_data, G512_SNAP),
]


def case_params(selected: list[Case]) -> pytest.MarkDecorator:
    """Parametrize a test over *selected* cases, named by builder and geometry."""
    return pytest.mark.parametrize("case", selected, ids=[c.id for c in selected])


# --- imago's side ----------------------------------------------------------------------------------


def open_image(path: Path, *, write: bool) -> SyncFormatAccess:
    """Open the image as a check does: images marked corrupt too (as ``qemu-img check`` does)."""
    builder = Qcow2.builder_path(str(path)).write(write)
    assert isinstance(builder, Qcow2Builder)
    return SyncFormatAccess(builder.allow_corrupt(True).open_sync(PermissiveImplicitOpenGate()))


def imago_check(path: Path) -> CheckResult:
    """imago's check of the image, opened read-only."""
    with open_image(path, write=False) as image:
        return image.check()


def imago_repair(path: Path, mode: str) -> CheckResult | ImagoError:
    """imago's repair (``check(mode)`` on the image opened for writing), or the error it raised."""
    try:
        with open_image(path, write=True) as image:
            return image.check(mode)
    except ImagoError as error:
        return error


def lines(result: CheckResult, *, repaired: bool = False) -> set[str]:
    """The finding lines of *result* (those of the repair pass too, with *repaired*)."""
    findings = (*result.repaired, *result.findings) if repaired else result.findings
    return {line for finding in findings for line in finding.message.splitlines()}


def without_filename(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """*report* without its ``filename`` (two copies of one image have different names)."""
    if report is None:
        return None
    return {key: value for key, value in report.items() if key != "filename"}


def differences(
    ours: tuple[int, dict[str, Any] | None, set[str]], theirs: QemuCheck, *, keep_filename: bool
) -> list[str]:
    """How imago's (exit status, JSON, lines) differ from qemu-img's, one string per difference."""
    status, report, found = ours
    expected = theirs.json if keep_filename else without_filename(theirs.json)
    out = []
    if status != theirs.status:
        out.append(f"exit status: imago {status}, qemu-img {theirs.status}")
    if report != expected:
        keys = sorted(set(report or {}) | set(expected or {}))
        diff = {k: ((report or {}).get(k), (expected or {}).get(k)) for k in keys}
        out.append(f"JSON (imago, qemu-img): { {k: v for k, v in diff.items() if v[0] != v[1]} }")
    if found != set(theirs.lines):
        out.append(f"lines only imago printed: {sorted(found - set(theirs.lines))}")
        out.append(f"lines only qemu-img printed: {sorted(set(theirs.lines) - found)}")
    return out


def counts(result: QemuCheck) -> dict[str, int]:
    """The counts of a check that do not depend on where the repair placed things."""
    report = result.json or {}
    return {key: report.get(key, 0) for key in ("check-errors", "corruptions", "leaks")}


# --- the tests -------------------------------------------------------------------------------------


@case_params(CASES)
def test_qemu_reports_the_damage(case: Case, tmp_path: Path) -> None:
    """The builder made the damage it claims (qemu-img alone is the judge)."""
    damaged = case.build(tmp_path)
    report = dmg.qemu_check(damaged.path)
    assert not damaged.unmet(report), f"{damaged.unmet(report)}\n{report}"


@case_params(CASES)
def test_check_equals_qemu(case: Case, tmp_path: Path) -> None:
    """imago's check says what ``qemu-img check`` says, and writes nothing."""
    damaged = case.build(tmp_path)
    before = damaged.path.read_bytes()
    theirs = dmg.qemu_check(damaged.path)
    assert not damaged.unmet(theirs), str(theirs)
    ours = imago_check(damaged.path)
    problems = differences((ours.exit_status, ours.to_json(), lines(ours)), theirs, keep_filename=True)
    assert not problems, "\n".join(problems)
    assert damaged.path.read_bytes() == before, "a check without repair wrote to the image"


def repair_both(damaged: Damaged, directory: Path, mode: str) -> None:
    """Repair a copy with imago and another with qemu-img; both must come out the same."""
    ours_path = directory / "ours.qcow2"
    theirs_path = directory / "theirs.qcow2"
    shutil.copyfile(damaged.path, ours_path)
    shutil.copyfile(damaged.path, theirs_path)
    theirs = dmg.qemu_check(theirs_path, "-r", mode)
    ours = imago_repair(ours_path, mode)

    if theirs.json is None:
        # qemu-img gave up ("Check failed: ..." after refusing a write onto metadata, half
        # way through): imago must fail as well, and leave no more damage than it found.
        assert isinstance(ours, ImagoError) or ours.exit_status == 1, f"imago: {ours!r}\nqemu-img: {theirs}"
        before, after = dmg.qemu_check(damaged.path), dmg.qemu_check(ours_path)
        assert sum(counts(after).values()) <= sum(counts(before).values()), f"before:\n{before}\nafter:\n{after}"
    else:
        assert not isinstance(ours, ImagoError), f"imago: {ours!r}\nqemu-img: {theirs}"
        if damaged.dirty:
            # Opening for writing repaired the dirty image before the check ran (as QEMU's
            # open does): the fixed counts are the open's business; the outcome must agree.
            assert ours.exit_status == theirs.status == 0, f"{ours!r}\nqemu-img: {theirs}"
        else:
            got = (ours.exit_status, without_filename(ours.to_json()), lines(ours, repaired=True))
            problems = differences(got, theirs, keep_filename=False)
            assert not problems, "\n".join(problems)

        # Afterwards qemu-img finds the same on both copies (clean, where qemu-img's repair is).
        after_ours, after_theirs = dmg.qemu_check(ours_path), dmg.qemu_check(theirs_path)
        assert (after_ours.status, counts(after_ours)) == (after_theirs.status, counts(after_theirs)), (
            f"imago's repair:\n{after_ours}\nqemu-img's repair:\n{after_theirs}"
        )
        # Dirty and corrupt bits: cleared by a repair that leaves the image consistent.
        flags = dmg.INCOMPAT_DIRTY | dmg.INCOMPAT_CORRUPT
        ours_flags = dmg.Qcow2File(ours_path).incompatible_features & flags
        assert ours_flags == dmg.Qcow2File(theirs_path).incompatible_features & flags
    # And the same content, past what QEMU cannot read in either.
    for path in (ours_path, theirs_path):
        dmg.unmap(path, damaged)
    compared = dmg.qemu_compare(ours_path, theirs_path)
    assert compared.returncode == 0, f"qemu-img compare: {compared.stdout}{compared.stderr}"


# An L2 entry past the end of the file is the one damage imago's `-r all` repairs where QEMU 7.2
# cannot (the entry is unmapped): plugins/qcow2/tests/test_repair_past_end.py tests that instead.
@case_params([case for case in CASES if case.builder is not dmg.l2_entry_past_eof])
def test_repair_all_as_qemu(case: Case, tmp_path: Path) -> None:
    """``check("all")`` repairs as ``qemu-img check -r all`` does."""
    damaged = case.build(tmp_path)
    repair_both(damaged, tmp_path, "all")


@case_params(LEAK_CASES)
def test_repair_leaks_as_qemu(case: Case, tmp_path: Path) -> None:
    """``check("leaks")`` repairs a leak-only image as ``qemu-img check -r leaks`` does."""
    damaged = case.build(tmp_path)
    assert damaged.leaks_only
    repair_both(damaged, tmp_path, "leaks")
