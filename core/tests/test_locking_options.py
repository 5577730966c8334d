"""The locking options (``force_share``, ``share_write``) and :class:`ImageLockedError`."""

from __future__ import annotations

import errno

import attrs
import pytest

import imago
from imago import ImageLockedError, ImagoError, InvalidOptionError, StorageCreateOptions, StorageOpenOptions


def test_force_share_defaults_off() -> None:
    options = StorageOpenOptions(filename="disk.img")
    assert (options.force_share, options.share_write) == (False, False)
    assert StorageOpenOptions(filename="disk.img", force_share=True).force_share


def test_force_share_is_refused_with_writable() -> None:
    with pytest.raises(InvalidOptionError) as refused:
        StorageOpenOptions(filename="disk.img", writable=True, force_share=True)
    assert refused.value.option == "force_share"
    assert "writable" in str(refused.value)


def test_force_share_is_refused_when_evolved_writable() -> None:
    # How builders fill in writable: the combination is caught there too.
    with pytest.raises(InvalidOptionError) as refused:
        attrs.evolve(StorageOpenOptions(force_share=True), filename="disk.img", writable=True)
    assert refused.value.option == "force_share"


@pytest.mark.parametrize("field", ["force_share", "share_write"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_locking_options_must_be_bools(field: str, value: object) -> None:
    with pytest.raises(InvalidOptionError) as refused:
        StorageOpenOptions(filename="disk.img", **{field: value})  # type: ignore[arg-type]
    assert refused.value.option == field


def test_created_storages_are_opened_without_force_share() -> None:
    options = StorageCreateOptions(filename="disk.img").open_options()
    assert options.writable
    assert not options.force_share


@pytest.mark.parametrize("api", [imago.open, imago.open_async])
def test_open_refuses_force_share_with_write_before_touching_the_file(tmp_path, api) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "missing.qcow2"  # not FileNotFoundError: the options are checked first

    def open_it() -> object:
        result = api(missing, "raw", write=True, force_share=True)
        return imago.runtime.run_sync(result) if api is imago.open_async else result

    with pytest.raises(InvalidOptionError) as refused:
        open_it()
    assert refused.value.option == "force_share"
    assert not missing.exists()


def test_image_locked_error_names_file_and_lock() -> None:
    error = ImageLockedError("/images/vm.qcow2", "write")
    assert isinstance(error, ImagoError)
    assert isinstance(error, OSError)
    assert (error.filename, error.lock, error.shared, error.errno) == ("/images/vm.qcow2", "write", False, errno.EAGAIN)
    message = str(error)
    assert message.startswith("/images/vm.qcow2: ")
    assert 'Failed to get "write" lock' in message
    assert "force_share=True" in message
    assert "-U" in message


def test_image_locked_error_for_a_permission_not_shared() -> None:
    error = ImageLockedError("vm.qcow2", "resize", shared=True)
    assert 'Failed to get shared "resize" lock' in str(error)
    assert error.shared


def test_image_locked_error_is_exported() -> None:
    assert "ImageLockedError" in imago.__all__
    assert imago.ImageLockedError is ImageLockedError
