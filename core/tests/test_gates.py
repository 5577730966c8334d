"""Implicit open gates: local-name rule, permissive/deny/sandbox gates, backing chain checks."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import attrs
import pytest

import imago
from imago import (
    MAX_CHAIN_DEPTH,
    DenyImplicitOpenGate,
    FormatDriverBuilder,
    ImplicitOpenGate,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    StorageOpenOptions,
    check_local_file_name,
    runtime,
)
from imago_file import File
from imago_null import Null
from imago_raw import Raw


def _image(path: pathlib.Path, data: bytes = b"imago" * 100) -> pathlib.Path:
    path.write_bytes(data)
    return path


class RecordingGate(PermissiveImplicitOpenGate):
    """Permissive, and remembers what it was asked."""

    def __init__(self) -> None:
        self.storages: list[StorageOpenOptions] = []
        self.formats: list[FormatDriverBuilder[Any]] = []

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        self.storages.append(options)
        return options

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        self.formats.append(builder)


ALL_GATES = [
    pytest.param(lambda tmp: PermissiveImplicitOpenGate(), id="permissive"),
    pytest.param(lambda tmp: DenyImplicitOpenGate(), id="deny"),
    pytest.param(lambda tmp: SandboxImplicitOpenGate([tmp, "/"]), id="sandbox"),
    pytest.param(lambda tmp: RecordingGate(), id="recording"),
]

BAD_NAMES = [
    'json:{"driver": "file", "filename": "/etc/passwd"}',
    "json:{}",
    "nbd://host/x",
    "nbd:localhost:10809",
    "http://example.com/disk.img",
    "file:foo",
    "file:/etc/passwd",
    "ssh://user@host/disk",
    "a:b",
    ":leading-colon",
    "",
    "name\0with-nul",
    "/abs/name\0with-nul",
]


# --- the local-name rule --------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_local_file_name_refuses(name: str) -> None:
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        check_local_file_name(name)
    assert isinstance(info.value, PermissionError)


def test_check_local_file_name_refuses_none() -> None:
    with pytest.raises(imago.ImplicitOpenDeniedError, match="no file name"):
        check_local_file_name(None)


@pytest.mark.parametrize(
    "name", ["./a:b", "/abs/a:b", "dir/a:b", "plain.img", "/images/disk.qcow2", "../up.img", "a b", "./json:{}"]
)
def test_check_local_file_name_accepts(name: str) -> None:
    assert check_local_file_name(name) == name


def test_protocol_refusal_names_the_file() -> None:
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        check_local_file_name("nbd://host/x")
    assert info.value.filename == "nbd://host/x"
    assert "nbd://host/x" in str(info.value)


@pytest.mark.parametrize("make_gate", ALL_GATES)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_gate_refuses_non_local_names(make_gate: Any, name: str, tmp_path: pathlib.Path) -> None:
    gate = make_gate(tmp_path)
    with pytest.raises(imago.ImplicitOpenDeniedError):
        runtime.run_sync(gate.open_storage(StorageOpenOptions(filename=name)))
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(name).open_sync(gate)
    if isinstance(gate, RecordingGate):
        assert gate.storages == []  # refused before the gate's own check


@pytest.mark.parametrize("make_gate", ALL_GATES)
def test_every_gate_refuses_missing_name(make_gate: Any, tmp_path: pathlib.Path) -> None:
    gate = make_gate(tmp_path)
    with pytest.raises(imago.ImplicitOpenDeniedError):
        runtime.run_sync(gate.open_storage(StorageOpenOptions()))


@pytest.mark.parametrize(
    "make_gate",
    [
        pytest.param(lambda tmp: PermissiveImplicitOpenGate(), id="permissive"),
        pytest.param(lambda tmp: SandboxImplicitOpenGate([tmp]), id="sandbox"),
    ],
)
def test_colon_names_written_as_paths_are_opened(
    make_gate: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _image(tmp_path / "a:b", b"colon" * 10)
    gate = make_gate(tmp_path)
    image = imago.SyncFormatAccess(Raw.builder_path(str(tmp_path / "a:b")).open_sync(gate))
    assert image.size == 50
    image.close()
    monkeypatch.chdir(tmp_path)
    image = imago.SyncFormatAccess(Raw.builder_path("./a:b").open_sync(gate))
    buf = bytearray(5)
    image.read(buf, 0)
    assert buf == b"colon"
    image.close()


# --- gates on the image file itself ----------------------------------------------------------


def test_builder_path_consults_the_gate(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    gate = RecordingGate()
    driver = Raw.builder_path(path).write(True).open_sync(gate)
    try:
        assert len(gate.storages) == 1
        options = gate.storages[0]
        assert options.filename == str(path)
        assert options.writable is True
        assert options.driver == "file"
        assert gate.formats == []  # builder.open is an explicit open of the format
    finally:
        runtime.run_sync(driver.close())


def test_builder_with_storage_does_not_consult_the_gate(tmp_path: pathlib.Path) -> None:
    storage = File.open_sync(StorageOpenOptions(filename=_image(tmp_path / "disk.img")))
    driver = Raw.builder(storage).open_sync(DenyImplicitOpenGate())
    assert driver.storage is storage
    runtime.run_sync(driver.close())


def test_storage_options_pass_through_the_gate(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    gate = RecordingGate()
    options = StorageOpenOptions(filename="ignored", writable=True, driver="file", driver_options={"k": 1})
    driver = Raw.builder_path(path).storage_options(options).open_sync(gate)
    seen = gate.storages[0]
    assert seen.filename == str(path)  # from the builder
    assert seen.writable is False  # from the builder
    assert dict(seen.driver_options) == {"k": 1}
    runtime.run_sync(driver.close())


def test_deny_refuses_image_file_naming_it(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        Raw.builder_path(path).open_sync(DenyImplicitOpenGate())
    assert isinstance(info.value, PermissionError)
    assert info.value.filename == str(path)
    assert str(path) in str(info.value)


def test_deny_refuses_open_storage_directly(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    with pytest.raises(PermissionError, match=r"disk\.img"):
        runtime.run_sync(DenyImplicitOpenGate().open_storage(StorageOpenOptions(filename=str(path))))


def test_permissive_opens_anything_local(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img", b"x" * 1000)
    image = imago.SyncFormatAccess(Raw.builder_path(path).open_sync(PermissiveImplicitOpenGate()))
    assert image.size == 1000
    image.close()
    options = StorageOpenOptions(driver="null", filename="x", driver_options={"size": 7})
    storage = runtime.run_sync(PermissiveImplicitOpenGate().open_storage(options))
    assert isinstance(storage, Null)
    assert storage.size == 7


def test_permissive_passes_os_errors_through(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        Raw.builder_path(tmp_path / "missing.img").open_sync(PermissiveImplicitOpenGate())
    with pytest.raises(IsADirectoryError):
        Raw.builder_path(tmp_path).open_sync(PermissiveImplicitOpenGate())


def test_open_requires_a_gate(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    with pytest.raises(imago.InvalidOptionError) as info:
        Raw.builder_path(path).open_sync(None)  # type: ignore[arg-type]
    assert info.value.option == "gate"


def test_gate_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        ImplicitOpenGate()  # type: ignore[abstract]


# --- the sandbox ----------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: pathlib.Path) -> pathlib.Path:
    inside = tmp_path / "inside"
    inside.mkdir()
    (tmp_path / "outside").mkdir()
    return inside


def test_sandbox_allows_files_under_listed_dirs(sandbox: pathlib.Path) -> None:
    deep = sandbox / "a" / "b"
    deep.mkdir(parents=True)
    for path in (_image(sandbox / "top.img"), _image(deep / "deep.img")):
        driver = Raw.builder_path(path).write(True).open_sync(SandboxImplicitOpenGate([sandbox]))
        assert driver.size == 500
        assert driver.writable
        runtime.run_sync(driver.close())


def test_sandbox_several_directories(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    other = tmp_path / "outside"
    gate = SandboxImplicitOpenGate([sandbox, other])
    for path in (_image(sandbox / "1.img"), _image(other / "2.img")):
        runtime.run_sync(Raw.builder_path(path).open_sync(gate).close())
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(_image(tmp_path / "3.img")).open_sync(gate)


def test_sandbox_refuses_outside(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    outside = _image(tmp_path / "outside" / "secret.img")
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        Raw.builder_path(outside).open_sync(SandboxImplicitOpenGate([sandbox]))
    assert info.value.filename == str(outside)
    assert "outside" in info.value.reason


def test_sandbox_refuses_dotdot_escape(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    _image(tmp_path / "outside" / "secret.img")
    sneaky = f"{sandbox}/../outside/secret.img"
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(sneaky).open_sync(SandboxImplicitOpenGate([sandbox]))


def test_sandbox_refuses_sibling_with_common_prefix(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    sibling = tmp_path / "inside-not"
    sibling.mkdir()
    path = _image(sibling / "x.img")
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(path).open_sync(SandboxImplicitOpenGate([sandbox]))


def test_sandbox_refuses_symlink_out(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    target = _image(tmp_path / "outside" / "secret.img")
    link = sandbox / "innocent.img"
    link.symlink_to(target)
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        Raw.builder_path(link).open_sync(SandboxImplicitOpenGate([sandbox]))
    assert str(target) in str(info.value)


def test_sandbox_refuses_symlinked_directory_out(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    _image(tmp_path / "outside" / "secret.img")
    (sandbox / "door").symlink_to(tmp_path / "outside")
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(sandbox / "door" / "secret.img").open_sync(SandboxImplicitOpenGate([sandbox]))


def test_sandbox_allows_symlink_inside(sandbox: pathlib.Path) -> None:
    target = _image(sandbox / "real.img", b"real data")
    link = sandbox / "link.img"
    link.symlink_to("real.img")
    image = imago.SyncFormatAccess(Raw.builder_path(link).open_sync(SandboxImplicitOpenGate([sandbox])))
    # The file checked is the file opened: the real path.
    assert image.filename == str(target)
    buf = bytearray(9)
    image.read(buf, 0)
    assert buf == b"real data"
    image.close()


def test_sandbox_allows_link_into_sandbox_from_outside(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    target = _image(sandbox / "real.img")
    link = tmp_path / "outside" / "link.img"
    link.symlink_to(target)
    driver = Raw.builder_path(link).open_sync(SandboxImplicitOpenGate([sandbox]))
    assert driver.storage.filename == str(target)
    runtime.run_sync(driver.close())


def test_sandbox_directory_given_through_symlink(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(sandbox)
    path = _image(sandbox / "x.img")
    gate = SandboxImplicitOpenGate([alias])
    assert gate.directories == (os.path.realpath(sandbox),)
    runtime.run_sync(Raw.builder_path(path).open_sync(gate).close())
    runtime.run_sync(Raw.builder_path(alias / "x.img").open_sync(gate).close())


def test_sandbox_refuses_directory(sandbox: pathlib.Path) -> None:
    (sandbox / "sub").mkdir()
    gate = SandboxImplicitOpenGate([sandbox])
    for path in (sandbox / "sub", sandbox):
        with pytest.raises(imago.ImplicitOpenDeniedError, match="regular file"):
            Raw.builder_path(path).open_sync(gate)


def test_sandbox_refuses_device() -> None:
    with pytest.raises(imago.ImplicitOpenDeniedError, match="regular file"):
        Raw.builder_path("/dev/null").open_sync(SandboxImplicitOpenGate(["/dev"]))


def test_sandbox_refuses_fifo(sandbox: pathlib.Path) -> None:
    fifo = sandbox / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(imago.ImplicitOpenDeniedError, match="regular file"):
        Raw.builder_path(fifo).open_sync(SandboxImplicitOpenGate([sandbox]))


def test_sandbox_missing_file_is_file_not_found(sandbox: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.img"):
        Raw.builder_path(sandbox / "missing.img").open_sync(SandboxImplicitOpenGate([sandbox]))
    dangling = sandbox / "dangling.img"
    dangling.symlink_to(sandbox / "gone.img")
    with pytest.raises(FileNotFoundError, match=r"gone\.img"):
        Raw.builder_path(dangling).open_sync(SandboxImplicitOpenGate([sandbox]))
    # Outside the allowed directories, missing or not, it is a denial: no existence probing.
    outside = tmp_path / "elsewhere-missing.img"
    with pytest.raises(imago.ImplicitOpenDeniedError, match="outside"):
        Raw.builder_path(outside).open_sync(SandboxImplicitOpenGate([sandbox]))


@pytest.mark.parametrize("driver", ["null", "annotated", "no-such-driver"])
def test_sandbox_refuses_non_file_drivers(sandbox: pathlib.Path, driver: str) -> None:
    path = _image(sandbox / "x.img")
    gate = SandboxImplicitOpenGate([sandbox])
    with pytest.raises(imago.ImplicitOpenDeniedError, match=driver):
        runtime.run_sync(gate.open_storage(StorageOpenOptions(filename=str(path), driver=driver)))
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path(path).storage_options(StorageOpenOptions(driver=driver)).open_sync(gate)


def test_sandbox_check_storage_returns_real_path(sandbox: pathlib.Path) -> None:
    target = _image(sandbox / "real.img")
    (sandbox / "link.img").symlink_to(target)
    gate = SandboxImplicitOpenGate([sandbox])
    options = runtime.run_sync(
        gate.check_storage(StorageOpenOptions(filename=str(sandbox / "link.img"), writable=True))
    )
    assert options.filename == str(target)
    assert options.writable is True


def test_sandbox_allows(sandbox: pathlib.Path, tmp_path: pathlib.Path) -> None:
    gate = SandboxImplicitOpenGate([sandbox])
    assert gate.allows(str(sandbox / "anything"))
    assert gate.allows(str(sandbox))
    assert not gate.allows(str(tmp_path))
    assert not gate.allows(str(tmp_path / "outside" / "x"))
    assert not gate.allows("/etc/passwd")


def test_sandbox_root_allows_everything_local() -> None:
    gate = SandboxImplicitOpenGate(["/"])
    assert gate.allows("/etc/passwd")


def test_sandbox_needs_directories() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SandboxImplicitOpenGate([])
    with pytest.raises(ValueError, match="at least one"):
        SandboxImplicitOpenGate(())
    with pytest.raises(TypeError):
        SandboxImplicitOpenGate()  # type: ignore[call-arg]


def test_sandbox_single_path_is_one_directory(sandbox: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # A bare string must not be taken as an iterable of one-character "directories" (one is "/").
    for directory in (str(sandbox), sandbox):
        gate = SandboxImplicitOpenGate(directory)  # type: ignore[arg-type]
        assert gate.directories == (os.path.realpath(sandbox),)
        assert not gate.allows("/etc/passwd")
        with pytest.raises(imago.ImplicitOpenDeniedError):
            Raw.builder_path(_image(tmp_path / "outside" / "x.img")).open_sync(gate)


def test_sandbox_is_frozen(sandbox: pathlib.Path, tmp_path: pathlib.Path) -> None:
    gate = SandboxImplicitOpenGate([sandbox])
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        gate.directories = ("/",)  # type: ignore[misc]
    assert gate == SandboxImplicitOpenGate([str(sandbox)])


def test_sandbox_relative_directory(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    _image(tmp_path / "rel" / "x.img")
    gate = SandboxImplicitOpenGate(["rel"])
    assert gate.directories == (os.path.realpath(tmp_path / "rel"),)
    runtime.run_sync(Raw.builder_path("rel/x.img").open_sync(gate).close())
    _image(tmp_path / "y.img")
    with pytest.raises(imago.ImplicitOpenDeniedError):
        Raw.builder_path("y.img").open_sync(gate)


# --- open_format ----------------------------------------------------------------------------


def test_open_format_permissive(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "base.img", b"base" * 256)
    driver = runtime.run_sync(PermissiveImplicitOpenGate().open_format(Raw.builder_path(path)))
    assert isinstance(driver, Raw)
    assert driver.size == 1024
    assert not driver.writable
    runtime.run_sync(driver.close())


def test_open_format_deny_names_file(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "base.img")
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        runtime.run_sync(DenyImplicitOpenGate().open_format(Raw.builder_path(path)))
    assert str(path) in str(info.value)
    # Even with an explicit storage, an implicit open of a format is refused.
    storage = Null(512)
    with pytest.raises(imago.ImplicitOpenDeniedError):
        runtime.run_sync(DenyImplicitOpenGate().open_format(Raw.builder(storage)))


def test_open_format_sandbox(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    gate = SandboxImplicitOpenGate([sandbox])
    inside = _image(sandbox / "base.img")
    driver = runtime.run_sync(gate.open_format(Raw.builder_path(inside)))
    assert driver.storage.filename == str(inside)
    runtime.run_sync(driver.close())
    outside = _image(tmp_path / "outside" / "base.img")
    with pytest.raises(imago.ImplicitOpenDeniedError):
        runtime.run_sync(gate.open_format(Raw.builder_path(outside)))


def test_open_format_calls_check_format_then_check_storage(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "base.img")
    gate = RecordingGate()
    builder = Raw.builder_path(path)
    driver = runtime.run_sync(gate.open_format(builder))
    assert gate.formats == [builder]
    assert [o.filename for o in gate.storages] == [str(path)]
    runtime.run_sync(driver.close())


class RefuseFormats(PermissiveImplicitOpenGate):
    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        raise imago.ImplicitOpenDeniedError(str(builder.path), "no backing files today")


def test_open_format_custom_check_format(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "base.img")
    with pytest.raises(imago.ImplicitOpenDeniedError, match="no backing files today"):
        runtime.run_sync(RefuseFormats().open_format(Raw.builder_path(path)))
    # A direct builder.open does not go through check_format.
    runtime.run_sync(Raw.builder_path(path).open_sync(RefuseFormats()).close())


# --- backing chains -------------------------------------------------------------------------


def test_chain_depth_and_identity(tmp_path: pathlib.Path) -> None:
    top = Raw.builder_path(tmp_path / "top.img")
    middle = Raw.builder_path(tmp_path / "mid.img").below(top)
    base = Raw.builder_path(tmp_path / "base.img").below(middle)
    assert (top.depth, middle.depth, base.depth) == (0, 1, 2)
    assert top.identity() == os.path.realpath(tmp_path / "top.img")
    by_name = Raw.builder_path(tmp_path / "x.img").below(str(tmp_path / "top.img"))
    assert by_name.depth == 1
    assert Raw.builder_path(tmp_path / "y.img").below(None).depth == 0


def test_chain_loop_to_self(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "a.img")
    parent = Raw.builder_path(path)
    with pytest.raises(imago.BackingChainError) as info:
        Raw.builder_path(path).below(parent).open_sync(PermissiveImplicitOpenGate())
    assert info.value.filename == os.path.realpath(path)
    assert "loop" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_chain_loop_through_others(tmp_path: pathlib.Path) -> None:
    a, b, c = (_image(tmp_path / n) for n in ("a.img", "b.img", "c.img"))
    top = Raw.builder_path(a)
    mid = Raw.builder_path(b).below(top)
    low = Raw.builder_path(c).below(mid)
    # c opens fine below a and b...
    runtime.run_sync(low.open_sync(PermissiveImplicitOpenGate()).close())
    # ...but a below c loops.
    with pytest.raises(imago.BackingChainError, match="loop"):
        Raw.builder_path(a).below(low).open_sync(PermissiveImplicitOpenGate())


def test_chain_loop_through_symlink(tmp_path: pathlib.Path) -> None:
    real = _image(tmp_path / "real.img")
    link = tmp_path / "link.img"
    link.symlink_to(real)
    with pytest.raises(imago.BackingChainError):
        Raw.builder_path(link).below(Raw.builder_path(real)).open_sync(PermissiveImplicitOpenGate())


def test_chain_loop_by_parent_name(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "a.img")
    with pytest.raises(imago.BackingChainError):
        Raw.builder_path(path).below(str(path)).open_sync(PermissiveImplicitOpenGate())


def test_chain_loop_checked_before_the_gate(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "a.img")
    gate = RecordingGate()
    with pytest.raises(imago.BackingChainError):
        Raw.builder_path(path).below(Raw.builder_path(path)).open_sync(gate)
    assert gate.storages == []


def test_chain_loop_with_storage_builders(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "a.img")
    storage = File.open_sync(StorageOpenOptions(filename=path))
    with pytest.raises(imago.BackingChainError):
        Raw.builder(storage).below(Raw.builder_path(path)).open_sync(PermissiveImplicitOpenGate())
    runtime.run_sync(storage.close())
    null = Null(512)
    assert Raw.builder(null).identity() != Raw.builder(Null(512)).identity()


def _chain(tmp_path: pathlib.Path, length: int) -> FormatDriverBuilder[Raw]:
    """A builder with *length* distinct images above it."""
    builder = Raw.builder_path(tmp_path / "layer-0.img")
    for i in range(1, length + 1):
        builder = Raw.builder_path(tmp_path / f"layer-{i}.img").below(builder)
    return builder


def test_chain_at_max_depth_opens(tmp_path: pathlib.Path) -> None:
    builder = _chain(tmp_path, MAX_CHAIN_DEPTH - 1)
    assert builder.depth == MAX_CHAIN_DEPTH - 1
    _image(tmp_path / f"layer-{MAX_CHAIN_DEPTH - 1}.img")
    runtime.run_sync(builder.open_sync(PermissiveImplicitOpenGate()).close())


def test_chain_deeper_than_max_depth(tmp_path: pathlib.Path) -> None:
    builder = _chain(tmp_path, MAX_CHAIN_DEPTH)
    assert builder.depth == MAX_CHAIN_DEPTH
    _image(tmp_path / f"layer-{MAX_CHAIN_DEPTH}.img")
    with pytest.raises(imago.BackingChainError, match=str(MAX_CHAIN_DEPTH)):
        builder.open_sync(PermissiveImplicitOpenGate())
    deeper = Raw.builder_path(tmp_path / "deeper.img").below(builder)
    with pytest.raises(imago.BackingChainError):
        deeper.open_sync(PermissiveImplicitOpenGate())


def test_chain_depth_with_explicit_storage(tmp_path: pathlib.Path) -> None:
    builder = Raw.builder(Null(512)).below(_chain(tmp_path, MAX_CHAIN_DEPTH - 1))
    assert builder.depth == MAX_CHAIN_DEPTH
    with pytest.raises(imago.BackingChainError):
        builder.open_sync(DenyImplicitOpenGate())


def test_max_chain_depth_value() -> None:
    assert isinstance(MAX_CHAIN_DEPTH, int)
    assert MAX_CHAIN_DEPTH >= 16


# --- builder misuse ---------------------------------------------------------------------------


def test_builder_needs_exactly_one_source(tmp_path: pathlib.Path) -> None:
    with pytest.raises(imago.InvalidOptionError):
        FormatDriverBuilder(Raw)
    with pytest.raises(imago.InvalidOptionError):
        FormatDriverBuilder(Raw, storage=Null(1), path=tmp_path / "x")
    with pytest.raises(imago.InvalidOptionError):
        Raw.builder("not a storage")  # type: ignore[arg-type]


def test_builder_option_validation(tmp_path: pathlib.Path) -> None:
    builder = Raw.builder_path(tmp_path / "x.img")
    with pytest.raises(imago.InvalidOptionError) as info:
        builder.write("yes")  # type: ignore[arg-type]
    assert info.value.option == "write"
    with pytest.raises(imago.InvalidOptionError) as info:
        builder.storage_options({"driver": "null"})  # type: ignore[arg-type]
    assert info.value.option == "storage_options"
    assert builder.write() is builder
    assert builder.writable
    assert builder.write(False).writable is False
    assert builder.path == str(tmp_path / "x.img")
    assert builder.driver is Raw


def test_storage_open_options_is_storage_options(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "disk.img")
    options = StorageOpenOptions(direct=False, no_flush=True)
    builder = Raw.builder_path(path)
    assert builder.storage_open_options(options) is builder
    assert builder.given_storage_options is options
    driver = builder.write(True).open_sync(imago.PermissiveImplicitOpenGate())
    assert driver.storage.writable
    runtime.run_sync(driver.close())
    with pytest.raises(imago.InvalidOptionError) as info:
        builder.storage_open_options("direct")  # type: ignore[arg-type]
    assert info.value.option == "storage_open_options"
    assert builder.given_storage_options is options  # unchanged by the refused call
