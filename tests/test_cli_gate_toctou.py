"""The command line's sandbox gate and a backing file swapped between the gate's check and the open.

The swap is made deterministic by a hook right after the check; ``imago info --backing-chain``
refuses in one line (no ``--allow-dir`` hint: no wider sandbox would help), and the file put in
the backing file's place is never opened for I/O.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from imago import SandboxImplicitOpenGate, StorageOpenOptions

from . import cli_run

SECRET = b"not for the guest " * 29


def test_backing_file_swapped_for_a_link_out_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(SECRET)
    assert cli_run.qemu_img("create", "-q", "-f", "raw", "base.raw", "1M", cwd=inside).status == 0
    created = cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "image", cwd=inside)
    assert created.status == 0
    reference = cli_run.qemu_img("info", "--backing-chain", "image", cwd=inside)
    cli_run.same_text_as_qemu(cli_run.imago("info", "--backing-chain", "image", cwd=inside), reference)

    original = SandboxImplicitOpenGate.check_storage
    secret_id = (secret.stat().st_dev, secret.stat().st_ino)
    opened: list[tuple[int, int]] = []
    real_open = os.open

    async def check_then_swap(self: SandboxImplicitOpenGate, options: StorageOpenOptions) -> StorageOpenOptions:
        result = await original(self, options)
        if os.path.basename(str(options.filename)) == "base.raw":
            link = inside / "base.raw.new"
            link.symlink_to(secret)
            os.replace(link, inside / "base.raw")
        return result

    def spying_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        st = os.fstat(fd)
        if not flags & os.O_PATH:
            opened.append((st.st_dev, st.st_ino))
        return fd

    monkeypatch.setattr(SandboxImplicitOpenGate, "check_storage", check_then_swap)
    monkeypatch.setattr(os, "open", spying_open)
    refused = cli_run.imago("info", "--backing-chain", "image", cwd=inside)
    assert refused.status == 1
    assert refused.out == ""
    assert refused.err.count("\n") == 1
    assert "base.raw" in refused.err
    assert "changed while it was being opened" in refused.err
    assert "--allow-dir" not in refused.err
    assert secret_id not in opened
    assert (inside / "base.raw").is_symlink()  # (the swap did happen)
