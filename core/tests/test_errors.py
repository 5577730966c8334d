"""The exception tree, and the option value objects whose validators raise from it."""

from __future__ import annotations

import pathlib

import attrs
import pytest

import imago
from imago import errors
from imago.storage import PreallocateMode, StorageCreateOptions, StorageOpenOptions

# --- the class tree ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (imago.PluginError, Exception),
        (imago.PluginLoadError, Exception),
        (imago.DuplicateDriverError, Exception),
        (imago.InvalidDriverError, TypeError),
        (imago.DriverNotFoundError, LookupError),
        (imago.ImplicitOpenDeniedError, PermissionError),
        (imago.BackingChainError, ValueError),
        (imago.CorruptImageError, ValueError),
        (imago.UnsupportedFeatureError, NotImplementedError),
        (imago.InvalidRequestError, ValueError),
        (imago.InvalidBufferError, TypeError),
        (imago.InvalidOptionError, ValueError),
        (imago.ReadOnlyError, PermissionError),
        (imago.ClosedError, ValueError),
        (imago.SuspendedInSyncModeError, RuntimeError),
    ],
)
def test_every_error_is_an_imago_error_and_its_builtin(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, imago.ImagoError)
    assert issubclass(cls, builtin)
    assert cls.__doc__


def test_root_is_a_plain_exception() -> None:
    assert issubclass(imago.ImagoError, Exception)
    assert not issubclass(imago.ImagoError, (ValueError, OSError))


def test_plugin_errors_are_plugin_errors() -> None:
    assert issubclass(imago.PluginLoadError, imago.PluginError)
    assert issubclass(imago.DuplicateDriverError, imago.PluginError)
    assert issubclass(imago.InvalidDriverError, imago.PluginError)


def test_errors_module_exports_match_the_package() -> None:
    for name in errors.__all__:
        assert getattr(imago, name) is getattr(errors, name)


def test_implicit_open_denied() -> None:
    error = imago.ImplicitOpenDeniedError("/etc/shadow", "not allowed here")
    assert isinstance(error, PermissionError)
    assert isinstance(error, OSError)
    assert error.filename == "/etc/shadow"
    assert error.reason == "not allowed here"
    assert "/etc/shadow" in str(error)
    assert "not allowed here" in str(error)
    with pytest.raises(PermissionError, match="shadow"):
        raise error


def test_corrupt_image_names_file_and_offset() -> None:
    error = imago.CorruptImageError("disk.qcow2", 0x30200, "L2 table offset is not aligned")
    assert isinstance(error, ValueError)
    assert error.filename == "disk.qcow2"
    assert error.offset == 0x30200
    assert error.problem == "L2 table offset is not aligned"
    text = str(error)
    assert "disk.qcow2" in text
    assert "0x30200" in text
    assert "L2 table offset is not aligned" in text


def test_corrupt_image_without_file_or_offset() -> None:
    error = imago.CorruptImageError(None, None, "bad magic")
    assert error.filename is None
    assert error.offset is None
    assert "bad magic" in str(error)
    assert "offset" not in str(error)


def test_corrupt_image_offset_zero_is_shown() -> None:
    assert "0x0" in str(imago.CorruptImageError("x", 0, "bad header"))


def test_driver_not_found_names_distribution() -> None:
    error = imago.DriverNotFoundError("format", "vmdk", "imago-vmdk")
    assert isinstance(error, LookupError)
    assert (error.kind, error.name, error.distribution) == ("format", "vmdk", "imago-vmdk")
    assert "vmdk" in str(error)
    assert "imago-vmdk" in str(error)
    with_detail = imago.DriverNotFoundError("format", "vmdk", "imago-vmdk", "plugin x broke")
    assert "plugin x broke" in str(with_detail)


def test_unsupported_feature_names_feature() -> None:
    error = imago.UnsupportedFeatureError("external data files")
    assert error.feature == "external data files"
    assert error.filename is None
    assert "external data files" in str(error)
    named = imago.UnsupportedFeatureError("zstd compression", "a.qcow2")
    assert named.filename == "a.qcow2"
    assert "a.qcow2" in str(named)
    assert "zstd compression" in str(named)


def test_invalid_option_names_option() -> None:
    error = imago.InvalidOptionError("cluster_size", "must be a power of two")
    assert isinstance(error, ValueError)
    assert error.option == "cluster_size"
    assert error.problem == "must be a power of two"
    assert "cluster_size" in str(error)
    assert "must be a power of two" in str(error)


def test_read_only_error() -> None:
    error = imago.ReadOnlyError("disk.img")
    assert isinstance(error, PermissionError)
    assert "disk.img" in str(error)
    assert "read-only" in str(error)


def test_backing_chain_error() -> None:
    error = imago.BackingChainError("/images/a.qcow2", "the chain loops")
    assert isinstance(error, ValueError)
    assert error.filename == "/images/a.qcow2"
    assert error.reason == "the chain loops"
    assert "/images/a.qcow2" in str(error)
    assert "the chain loops" in str(error)


def test_plugin_load_error() -> None:
    error = imago.PluginLoadError("qcow2", "imago-qcow2", "ImportError: boom")
    assert (error.plugin, error.distribution, error.reason) == ("qcow2", "imago-qcow2", "ImportError: boom")
    assert "qcow2" in str(error)
    assert "imago-qcow2" in str(error)
    assert "boom" in str(error)
    assert "distribution" not in str(imago.PluginLoadError("x", None, "r"))


def test_duplicate_driver_error() -> None:
    error = imago.DuplicateDriverError("storage", "file", "a", "b")
    assert error.kind == "storage"
    assert error.name == "file"
    assert error.plugins == ("a", "b")
    assert "'file'" in str(error)
    assert "'a'" in str(error)
    assert "'b'" in str(error)


def test_plain_message_errors() -> None:
    for cls in (imago.InvalidRequestError, imago.InvalidBufferError, imago.ClosedError, imago.SuspendedInSyncModeError):
        error = cls("some message")
        assert str(error) == "some message"


def test_describe() -> None:
    assert errors.describe("a.img") == "a.img"
    assert errors.describe(pathlib.Path("b.img")) == "b.img"
    assert errors.describe(None) == "<anonymous>"


# --- options --------------------------------------------------------------------------------


def test_open_options_defaults() -> None:
    options = StorageOpenOptions()
    assert options.filename is None
    assert options.writable is False
    assert options.direct is False
    assert options.driver == "file"
    assert dict(options.driver_options) == {}


def test_create_options_defaults() -> None:
    options = StorageCreateOptions()
    assert options.filename is None
    assert options.size == 0
    assert options.preallocate is PreallocateMode.NONE
    assert options.overwrite is False
    assert options.driver == "file"


@pytest.mark.parametrize("cls", [StorageOpenOptions, StorageCreateOptions])
def test_options_are_frozen(cls: type[StorageOpenOptions] | type[StorageCreateOptions]) -> None:
    options = cls(filename="a.img")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.filename = "b.img"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.driver = "null"  # type: ignore[misc]
    assert options.filename == "a.img"


@pytest.mark.parametrize("cls", [StorageOpenOptions, StorageCreateOptions])
def test_options_are_keyword_only(cls: type[StorageOpenOptions] | type[StorageCreateOptions]) -> None:
    with pytest.raises(TypeError):
        cls("a.img")  # type: ignore[misc]


def test_open_options_evolve() -> None:
    options = StorageOpenOptions(filename="a.img")
    changed = attrs.evolve(options, writable=True, driver="null")
    assert (changed.filename, changed.writable, changed.driver) == ("a.img", True, "null")
    assert (options.writable, options.driver) == (False, "file")
    assert changed != options
    assert attrs.evolve(changed, writable=False, driver="file") == options


def test_create_options_evolve_validates() -> None:
    options = StorageCreateOptions(filename="a.img", size=512)
    assert attrs.evolve(options, size=1024).size == 1024
    with pytest.raises(imago.InvalidOptionError) as info:
        attrs.evolve(options, size=-1)
    assert info.value.option == "size"


def test_filename_accepts_path_like(tmp_path: pathlib.Path) -> None:
    options = StorageOpenOptions(filename=tmp_path / "x.img")
    assert options.filename == str(tmp_path / "x.img")
    assert isinstance(options.filename, str)
    assert StorageCreateOptions(filename=tmp_path / "y.img").filename == str(tmp_path / "y.img")


@pytest.mark.parametrize("value", [123, 1.5, b"bytes.img", ["a.img"]])
def test_filename_rejects_non_paths(value: object) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        StorageOpenOptions(filename=value)  # type: ignore[arg-type]
    assert info.value.option == "filename"
    with pytest.raises(imago.InvalidOptionError):
        StorageCreateOptions(filename=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"writable": "yes"}, "writable"),
        ({"writable": 1}, "writable"),
        ({"writable": None}, "writable"),
        ({"direct": "no"}, "direct"),
        ({"direct": 0}, "direct"),
        ({"driver": ""}, "driver"),
        ({"driver": None}, "driver"),
        ({"driver": 3}, "driver"),
    ],
)
def test_open_options_validators(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        StorageOpenOptions(**kwargs)  # type: ignore[arg-type]
    assert info.value.option == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": -1}, "size"),
        ({"size": 1.5}, "size"),
        ({"size": "10"}, "size"),
        ({"size": True}, "size"),
        ({"size": None}, "size"),
        ({"overwrite": "yes"}, "overwrite"),
        ({"overwrite": 1}, "overwrite"),
        ({"driver": ""}, "driver"),
        ({"preallocate": "bogus"}, "preallocate"),
        ({"preallocate": 3}, "preallocate"),
    ],
)
def test_create_options_validators(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        StorageCreateOptions(**kwargs)  # type: ignore[arg-type]
    assert info.value.option == field
    assert field in str(info.value)


def test_create_options_accept_big_and_zero_sizes() -> None:
    assert StorageCreateOptions(size=0).size == 0
    assert StorageCreateOptions(size=1 << 60).size == 1 << 60


def test_create_options_parse_preallocate() -> None:
    assert StorageCreateOptions(preallocate="full").preallocate is PreallocateMode.FULL
    assert StorageCreateOptions(preallocate="off").preallocate is PreallocateMode.NONE
    assert StorageCreateOptions(preallocate=PreallocateMode.FALLOC).preallocate is PreallocateMode.FALLOC


def test_create_options_open_options() -> None:
    options = StorageCreateOptions(filename="n", size=4096, driver="null", driver_options={"size": 4096})
    opened = options.open_options()
    assert isinstance(opened, StorageOpenOptions)
    assert opened.filename == "n"
    assert opened.writable is True
    assert opened.driver == "null"
    assert dict(opened.driver_options) == {"size": 4096}


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("off", PreallocateMode.NONE),
        ("none", PreallocateMode.NONE),
        ("NONE", PreallocateMode.NONE),
        ("metadata", PreallocateMode.METADATA),
        ("falloc", PreallocateMode.FALLOC),
        ("full", PreallocateMode.FULL),
        ("Full", PreallocateMode.FULL),
        ("zero", PreallocateMode.ZERO),
    ],
)
def test_preallocate_parse_names(name: str, mode: PreallocateMode) -> None:
    assert PreallocateMode.parse(name) is mode


@pytest.mark.parametrize("mode", list(PreallocateMode))
def test_preallocate_parse_members_and_values(mode: PreallocateMode) -> None:
    assert PreallocateMode.parse(mode) is mode
    assert PreallocateMode.parse(mode.value) is mode


@pytest.mark.parametrize("value", ["", "on", "sparse", "fulll", "1", 1, None])
def test_preallocate_parse_rejects(value: object) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        PreallocateMode.parse(value)  # type: ignore[arg-type]
    assert "falloc" in str(info.value)  # the message lists the choices
    assert isinstance(info.value, ValueError)


# --- errors that carry their data -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (imago.DirtyImageError, ValueError),
        (imago.SnapshotNotFoundError, LookupError),
        (imago.MissingStorageError, ValueError),
        (imago.AllocationError, RuntimeError),
        (imago.DriverContractError, RuntimeError),
        (imago.UnsupportedFileTypeError, OSError),
    ],
)
def test_specific_errors_have_their_builtin_base(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, imago.ImagoError)
    assert issubclass(cls, builtin)
    assert cls.__doc__


def test_dirty_image_error() -> None:
    error = imago.DirtyImageError("vm.qcow2", "repair it (qemu-img check -r all)")
    assert (error.filename, error.repair) == ("vm.qcow2", "repair it (qemu-img check -r all)")
    assert str(error).startswith("vm.qcow2: the image is dirty")
    assert "qemu-img check -r all" in str(error)
    assert "<anonymous>" in str(imago.DirtyImageError(None, "repair it"))


def test_snapshot_not_found_error() -> None:
    error = imago.SnapshotNotFoundError("vm.qcow2", "before-upgrade")
    assert (error.filename, error.snapshot) == ("vm.qcow2", "before-upgrade")
    assert str(error) == "vm.qcow2: no snapshot with ID or name 'before-upgrade'"


def test_missing_storage_error() -> None:
    error = imago.MissingStorageError("vm.qcow2", "data_file", "the data file was not given")
    assert (error.filename, error.role, error.problem) == ("vm.qcow2", "data_file", "the data file was not given")
    assert str(error) == "vm.qcow2: the data file was not given"


def test_allocation_error() -> None:
    error = imago.AllocationError("vm.qcow2", "an L1 table", "no contiguous clusters")
    assert (error.what, error.problem) == ("an L1 table", "no contiguous clusters")
    assert str(error) == "vm.qcow2: cannot place an L1 table: no contiguous clusters"


def test_driver_contract_error() -> None:
    error = imago.DriverContractError("vmdk", "get_mapping returned an empty mapping", 4096)
    assert (error.driver, error.offset) == ("vmdk", 4096)
    assert str(error) == "vmdk driver at offset 4096: get_mapping returned an empty mapping"
    assert str(imago.DriverContractError("vmdk", "broken")) == "vmdk driver: broken"


def test_unsupported_file_type_error() -> None:
    error = imago.UnsupportedFileTypeError("/dev/null", "a character device", "a regular file or block device")
    assert (error.filename, error.kind, error.expected) == (
        "/dev/null",
        "a character device",
        "a regular file or block device",
    )
    assert str(error) == "/dev/null: a character device, not a regular file or block device"
    assert error.errno is None  # not an OS error from the kernel
