from __future__ import annotations

from pathlib import Path

from . import cli_run


def test_imago_and_qemu_img_run_side_by_side(tmp_path: Path) -> None:
    created = cli_run.qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=tmp_path)
    assert created.status == 0
    checked = cli_run.imago("check", "a.qcow2", cwd=tmp_path)
    reference = cli_run.qemu_img("check", "a.qcow2", cwd=tmp_path)
    cli_run.same_text_as_qemu(checked, reference)
    missing = cli_run.imago("check", "missing.qcow2", cwd=tmp_path)
    assert missing.status == 1
    assert "missing.qcow2" in missing.err
