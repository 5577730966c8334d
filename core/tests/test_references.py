"""open_named_image and naming_the_referrer: the images an image names, opened through the gate."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

import imago
from imago import (
    BackingChainError,
    DenyImplicitOpenGate,
    FormatDriverBuilder,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    StorageOpenOptions,
    naming_the_referrer,
    open_named_image,
    runtime,
)
from imago_file import File
from imago_raw import Raw


class RecordingGate(PermissiveImplicitOpenGate):
    """Permissive, and remembers the images it was asked to open."""

    def __init__(self) -> None:
        self.formats: list[FormatDriverBuilder[Any]] = []

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        self.formats.append(builder)


@pytest.fixture
def images(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "top.img").write_bytes(b"t" * 512)
    (tmp_path / "base.img").write_bytes(b"b" * 1024)
    return tmp_path


def _open(
    directory: pathlib.Path,
    recorded: str,
    gate: imago.ImplicitOpenGate,
    *,
    force_share: bool = False,
    role: str = "parent",
) -> imago.FormatDriver:
    builder = Raw.builder_path(directory / "top.img").storage_options(StorageOpenOptions(force_share=force_share))
    storage = File.open_sync(StorageOpenOptions(filename=str(directory / "top.img"), force_share=force_share))
    try:
        return runtime.run_sync(open_named_image(builder, gate, storage, recorded, Raw, role=role))
    finally:
        runtime.run_sync(storage.close())


def test_the_name_is_resolved_next_to_the_image_and_opened_read_only_below_it(images: pathlib.Path) -> None:
    gate = RecordingGate()
    base = _open(images, "base.img", gate, force_share=True)
    try:
        assert base.size == 1024
        assert not base.writable
        [asked] = gate.formats
        assert asked.path == str(images / "base.img")
        assert asked.depth == 1  # below the image that names it
        assert asked.given_storage_options.force_share  # the reader's force_share passes on
    finally:
        runtime.run_sync(base.close())


@pytest.mark.parametrize("recorded", ["json:{}", "nbd://host/x", "", "a\0b"])
def test_names_that_are_not_local_files_are_refused_naming_the_image_and_role(
    images: pathlib.Path, recorded: str
) -> None:
    with pytest.raises(ImplicitOpenDeniedError, match=r"named as the parent of .*top\.img"):
        _open(images, recorded, PermissiveImplicitOpenGate())


def test_a_gate_refusal_names_the_image_and_role(images: pathlib.Path) -> None:
    with pytest.raises(ImplicitOpenDeniedError, match=r"named as the backing file of .*top\.img") as refused:
        _open(images, "base.img", DenyImplicitOpenGate(), role="backing file")
    assert refused.value.filename == str(images / "base.img")
    outside = images / "elsewhere"
    outside.mkdir()
    with pytest.raises(ImplicitOpenDeniedError, match="named as the parent"):
        _open(images, "base.img", SandboxImplicitOpenGate([outside]))


def test_a_missing_file_is_not_renamed(images: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        _open(images, "missing.img", PermissiveImplicitOpenGate())


def test_refusals_of_other_files_pass_unchanged(images: pathlib.Path) -> None:
    storage = File.open_sync(StorageOpenOptions(filename=str(images / "top.img")))
    try:
        with pytest.raises(ImplicitOpenDeniedError) as refused, naming_the_referrer(storage, "base.img", "parent"):
            raise ImplicitOpenDeniedError(str(images / "deeper.img"), "denied further down")
        assert "named as" not in str(refused.value)
        assert refused.value.filename == str(images / "deeper.img")
    finally:
        runtime.run_sync(storage.close())


def test_an_image_naming_itself_is_a_loop(images: pathlib.Path) -> None:
    with pytest.raises(BackingChainError):
        _open(images, "top.img", PermissiveImplicitOpenGate())
