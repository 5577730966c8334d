"""UnopenedFile: a named file left closed for a metadata-only open; its I/O refused, its size by lstat."""

from __future__ import annotations

import os
import pathlib

import pytest

from imago import MissingStorageError, StorageOpenOptions, UnopenedFile, runtime


def test_io_is_refused_naming_the_image_the_role_and_the_file(tmp_path: pathlib.Path) -> None:
    image = str(tmp_path / "disk.qcow2")
    unopened = UnopenedFile("data.raw", image, role="data_file", what="external data file")
    assert (unopened.size, unopened.writable, unopened.filename) == (0, False, "data.raw")
    for call in (
        lambda: unopened.readv([memoryview(bytearray(4))], 0),
        lambda: unopened.writev([memoryview(b"abcd")], 0),
        lambda: unopened.resize(4096),
    ):
        with pytest.raises(
            MissingStorageError, match=r"disk\.qcow2: .*external data file 'data\.raw' is not open"
        ) as e:
            runtime.run_sync(call())
        assert e.value.role == "data_file"
        assert e.value.filename == image


def test_it_is_never_opened_by_name() -> None:
    with pytest.raises(NotImplementedError):
        runtime.run_sync(UnopenedFile.open(StorageOpenOptions(filename="x")))


def test_allocated_size_only_when_counted_and_beside_the_image(tmp_path: pathlib.Path) -> None:
    image = str(tmp_path / "disk.vmdk")
    extent = tmp_path / "disk-flat.vmdk"
    extent.write_bytes(b"x" * 8192)
    expected = os.lstat(extent).st_blocks * 512
    assert expected > 0
    counted = UnopenedFile(str(extent), image, role="extent", what="flat extent file", counted=True)
    assert counted.allocated_size() == expected
    assert UnopenedFile(str(extent), image, role="extent", what="flat extent file").allocated_size() is None
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    (elsewhere / "far.vmdk").write_bytes(b"x" * 8192)
    far = UnopenedFile(str(elsewhere / "far.vmdk"), image, role="extent", what="flat extent file", counted=True)
    assert far.allocated_size() is None
    missing = UnopenedFile(str(tmp_path / "gone.vmdk"), image, role="extent", what="flat extent file", counted=True)
    assert missing.allocated_size() is None


def test_a_link_is_not_followed(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    (target / "big").write_bytes(b"x" * 65536)
    link = tmp_path / "link.vmdk"
    link.symlink_to(target / "big")
    unopened = UnopenedFile(str(link), str(tmp_path / "disk.vmdk"), role="extent", what="extent", counted=True)
    assert unopened.allocated_size() is None
