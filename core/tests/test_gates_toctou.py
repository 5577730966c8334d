"""The sandbox gate's check and the open reach the same file: names changed in between are refused.

Someone who can write inside an allowed directory races the open: between the gate's check and
the ``file`` driver's open (or during the check's own walk) a name is swapped for a symbolic
link out of the sandbox, a FIFO, another file, or a directory for a link. The races are made
deterministic by a hook at that point; each is refused as "changed while it was being opened",
and a spy on ``os.open`` shows that the file put there was never opened for I/O.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import imago
import imago_file.storage
from imago import (
    ImplicitOpenDeniedError,
    InvalidOptionError,
    SandboxImplicitOpenGate,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    UnsupportedFileTypeError,
    runtime,
)
from imago.format import gates
from imago.format.gates import FILE_IDENTITY
from imago_file import File
from imago_null import Null

SECRET = b"secret outside the sandbox " * 19  # 513 bytes: not a multiple of anything an image uses


# --- helpers ----------------------------------------------------------------------------------------


class OpenSpy:
    """Wraps ``os.open``: remembers which files were opened for I/O (``O_PATH`` handles are not)."""

    def __init__(self) -> None:
        self.opened_for_io: list[tuple[int, int]] = []
        self.handles: list[tuple[int, int]] = []
        self._open = os.open

    def __call__(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = self._open(path, flags, *args, **kwargs)
        st = os.fstat(fd)
        (self.handles if flags & os.O_PATH else self.opened_for_io).append((st.st_dev, st.st_ino))
        return fd

    def never_opened(self, path: pathlib.Path) -> bool:
        """Whether no descriptor for I/O was ever opened on the file *path* names."""
        st = os.stat(path)
        return (st.st_dev, st.st_ino) not in self.opened_for_io


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> OpenSpy:
    recorder = OpenSpy()
    monkeypatch.setattr(os, "open", recorder)
    return recorder


@pytest.fixture(params=["proc", "no-proc"])
def reopen(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> str:
    """Both ways the driver opens the checked file: through /proc/self/fd, and by name when /proc is missing."""
    if request.param == "no-proc":
        monkeypatch.setattr(imago_file.storage, "_PROC_FD", str(tmp_path / "no-proc") + "/")
    return str(request.param)


class HangError(Exception):
    """The hang guard fired."""


@pytest.fixture
def hang_guard() -> Iterator[None]:
    """Fail a test whose open blocks (on a FIFO) instead of waiting forever: an alarm interrupts it."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise HangError("the open blocked")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def sandbox(tmp_path: pathlib.Path) -> pathlib.Path:
    inside = tmp_path / "inside"
    inside.mkdir()
    return inside


@pytest.fixture
def secret(tmp_path: pathlib.Path) -> pathlib.Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "x.img"
    path.write_bytes(SECRET)
    return path


def _image(path: pathlib.Path, data: bytes = b"imago" * 100) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def swap_after_check(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None]) -> list[StorageOpenOptions]:
    """Run *swap* once, right after the sandbox's check returns and before the driver opens; the checked options."""
    checked: list[StorageOpenOptions] = []
    original = SandboxImplicitOpenGate.check_storage

    async def check_then_swap(self: SandboxImplicitOpenGate, options: StorageOpenOptions) -> StorageOpenOptions:
        result = await original(self, options)
        checked.append(result)
        swap()
        return result

    monkeypatch.setattr(SandboxImplicitOpenGate, "check_storage", check_then_swap)
    return checked


def swap_before_walk(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None]) -> None:
    """Run *swap* once, after the name is resolved and allowed, before the check walks down to it."""
    original = SandboxImplicitOpenGate._stat_beneath

    def swap_then_walk(self: SandboxImplicitOpenGate, name: str, real: str) -> os.stat_result:
        swap()
        return original(self, name, real)

    monkeypatch.setattr(SandboxImplicitOpenGate, "_stat_beneath", swap_then_walk)


def replace_with_symlink(path: pathlib.Path, target: pathlib.Path) -> Callable[[], None]:
    def swap() -> None:
        link = path.with_name(path.name + ".new")
        link.symlink_to(target)
        os.replace(link, path)

    return swap


def replace_with_fifo(path: pathlib.Path) -> Callable[[], None]:
    def swap() -> None:
        fifo = path.with_name(path.name + ".fifo")
        os.mkfifo(fifo)
        os.replace(fifo, path)

    return swap


def replace_directory_with_symlink(directory: pathlib.Path, target: pathlib.Path) -> Callable[[], None]:
    def swap() -> None:
        directory.rename(directory.with_name(directory.name + ".old"))
        directory.symlink_to(target, target_is_directory=True)

    return swap


def _open(gate: SandboxImplicitOpenGate, path: pathlib.Path, *, writable: bool = False) -> Storage:
    return runtime.run_sync(gate.open_storage(StorageOpenOptions(filename=path, writable=writable)))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _refused_as_changed(info: pytest.ExceptionInfo[ImplicitOpenDeniedError], path: pathlib.Path) -> None:
    assert "changed while it was being opened" in str(info.value)
    assert info.value.filename == str(path)
    assert not info.value.allowable  # a wider sandbox would not help: the file changed under the check


# --- swaps between the check and the open ------------------------------------------------------------


@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_symlink_swapped_in_after_the_check(
    monkeypatch: pytest.MonkeyPatch,
    sandbox: pathlib.Path,
    secret: pathlib.Path,
    spy: OpenSpy,
    reopen: str,
    writable: bool,
) -> None:
    path = _image(sandbox / "x.img")
    swap_after_check(monkeypatch, replace_with_symlink(path, secret))
    before = _open_fds()
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path, writable=writable)
    _refused_as_changed(info, path)
    assert path.is_symlink()  # (the swap did happen)
    assert spy.never_opened(secret)
    assert secret.read_bytes() == SECRET
    assert _open_fds() == before  # nothing left open


def test_symlink_swapped_in_points_back_inside_is_refused_too(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, spy: OpenSpy
) -> None:
    # Even a link to another file inside: the file opened must be the file checked.
    path = _image(sandbox / "x.img")
    other = _image(sandbox / "other.img", b"other" * 100)
    swap_after_check(monkeypatch, replace_with_symlink(path, other))
    with pytest.raises(ImplicitOpenDeniedError, match="changed while it was being opened"):
        _open(SandboxImplicitOpenGate([sandbox]), path)
    assert spy.never_opened(other)


@pytest.mark.usefixtures("hang_guard")
@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_fifo_swapped_in_after_the_check_does_not_block(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, spy: OpenSpy, reopen: str, writable: bool
) -> None:
    path = _image(sandbox / "x.img")
    swap_after_check(monkeypatch, replace_with_fifo(path))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path, writable=writable)
    _refused_as_changed(info, path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert spy.never_opened(path)


@pytest.mark.usefixtures("hang_guard")
def test_symlink_to_a_fifo_outside_swapped_in(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, tmp_path: pathlib.Path, spy: OpenSpy, reopen: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = _image(sandbox / "x.img")
    swap_after_check(monkeypatch, replace_with_symlink(path, fifo))
    with pytest.raises(ImplicitOpenDeniedError, match="changed while it was being opened"):
        _open(SandboxImplicitOpenGate([sandbox]), path)
    assert spy.never_opened(fifo)


def test_file_renamed_over_the_checked_one(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, spy: OpenSpy, reopen: str
) -> None:
    path = _image(sandbox / "x.img")
    replacement = _image(sandbox / "replacement.img", b"replacement" * 50)
    swap_after_check(monkeypatch, lambda: os.replace(replacement, path))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path)
    _refused_as_changed(info, path)
    assert path.read_bytes() == b"replacement" * 50
    assert spy.never_opened(path)


def test_directory_swapped_for_a_symlink_after_the_check(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path, spy: OpenSpy, reopen: str
) -> None:
    # sandbox/sub/x.img is checked; then sub becomes a link to the directory holding the secret x.img.
    path = _image(sandbox / "sub" / "x.img")
    swap_after_check(monkeypatch, replace_directory_with_symlink(sandbox / "sub", secret.parent))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path)
    _refused_as_changed(info, path)
    assert path.read_bytes() == SECRET  # (the name now leads to the secret)
    assert spy.never_opened(secret)


def test_unchanged_file_opens_and_reads(sandbox: pathlib.Path, spy: OpenSpy, reopen: str) -> None:
    # The control case: the same paths with no swap open, for reading and writing, and read back.
    path = _image(sandbox / "sub" / "x.img")
    storage = _open(SandboxImplicitOpenGate([sandbox]), path, writable=True)
    try:
        assert isinstance(storage, File)
        buf = bytearray(500)
        runtime.run_sync(storage.readv([memoryview(buf)], 0))
        assert bytes(buf) == b"imago" * 100
        runtime.run_sync(storage.writev([memoryview(b"IMAGO")], 0))
        assert os.get_blocking(storage.fileno())  # O_NONBLOCK was for the open only
    finally:
        runtime.run_sync(storage.close())
    assert path.read_bytes()[:10] == b"IMAGOimago"
    assert not spy.never_opened(path)


def test_direct_open_through_the_sandbox(sandbox: pathlib.Path, reopen: str) -> None:
    # The reopen keeps the caller's flags: O_DIRECT stays, O_NONBLOCK does not.
    path = _image(sandbox / "x.img", b"d" * 8192)
    try:
        storage = runtime.run_sync(
            SandboxImplicitOpenGate([sandbox]).open_storage(StorageOpenOptions(filename=path, direct=True))
        )
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        pytest.skip("O_DIRECT is not supported here")
    try:
        flags = fcntl.fcntl(storage.fileno(), fcntl.F_GETFL)
        assert flags & os.O_DIRECT
        assert not flags & os.O_NONBLOCK
    finally:
        runtime.run_sync(storage.close())


# --- swaps during the check's own walk ------------------------------------------------------------------


def test_symlink_swapped_in_before_the_walk(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path, spy: OpenSpy
) -> None:
    path = _image(sandbox / "x.img")
    swap_before_walk(monkeypatch, replace_with_symlink(path, secret))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path)
    _refused_as_changed(info, path)
    assert spy.never_opened(secret)


def test_directory_swapped_for_a_symlink_before_the_walk(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path, spy: OpenSpy
) -> None:
    # realpath saw a directory; the check's stat would now follow the link out: the walk does not.
    path = _image(sandbox / "a" / "sub" / "x.img")
    swap_before_walk(monkeypatch, replace_directory_with_symlink(sandbox / "a" / "sub", secret.parent))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path)
    _refused_as_changed(info, path)
    assert spy.never_opened(secret)
    assert _identity(secret) not in spy.handles  # the walk stopped at the link: not even a handle on the secret


@pytest.mark.usefixtures("hang_guard")
def test_fifo_swapped_in_before_the_walk(monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path) -> None:
    path = _image(sandbox / "x.img")
    swap_before_walk(monkeypatch, replace_with_fifo(path))
    with pytest.raises(ImplicitOpenDeniedError, match="not a regular file"):
        _open(SandboxImplicitOpenGate([sandbox]), path)


def test_file_removed_before_the_walk_is_file_not_found(monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path) -> None:
    path = _image(sandbox / "sub" / "x.img")
    swap_before_walk(monkeypatch, lambda: os.rename(sandbox / "sub", sandbox / "gone"))
    with pytest.raises(FileNotFoundError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), path)
    assert info.value.filename == str(path)


def test_walk_errors_name_the_resolved_path(sandbox: pathlib.Path) -> None:
    # A regular file used as a directory: the OS's error, about the whole name (not a refusal).
    _image(sandbox / "file.img")
    with pytest.raises(NotADirectoryError) as info:
        _open(SandboxImplicitOpenGate([sandbox]), sandbox / "file.img" / "x.img")
    assert info.value.filename == str(sandbox / "file.img" / "x.img")


# --- through an image: a qcow2 backing file swapped after its check ---------------------------------------


def test_backing_file_swapped_for_a_link_out(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path, spy: OpenSpy
) -> None:
    base = sandbox / "base.raw"
    top = sandbox / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top)], check=True)
    with imago.open(top, "qcow2", gate=SandboxImplicitOpenGate([sandbox])) as image:
        buf = bytearray(512)
        image.read(buf, 0)
        assert buf == b"\x5a" * 512  # the control: the chain opens, the backing file's data shows
    swap_after_check(monkeypatch, replace_with_symlink(base, secret))
    with pytest.raises(ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2", gate=SandboxImplicitOpenGate([sandbox]))
    assert "changed while it was being opened" in str(info.value)
    assert str(base) in str(info.value)
    assert spy.never_opened(secret)
    assert secret.read_bytes() == SECRET
    checked = subprocess.run(["qemu-img", "check", "-q", str(top)], capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr


# --- the gate's second look: a file driver that ignores the identity -----------------------------------------


def test_gate_refuses_what_a_driver_ignoring_the_identity_opened(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path
) -> None:
    # An old or replaced `file` driver that opens by name: the gate compares the descriptor itself.
    monkeypatch.setattr(imago_file.storage, "_file_identity", lambda options: None)
    path = _image(sandbox / "x.img")
    swap_after_check(monkeypatch, replace_with_symlink(path, secret))
    closed: list[File] = []
    original_close = File.close

    async def recording_close(self: File) -> None:
        closed.append(self)
        await original_close(self)

    monkeypatch.setattr(File, "close", recording_close)
    before = _open_fds()
    with pytest.raises(ImplicitOpenDeniedError, match="changed while it was being opened"):
        _open(SandboxImplicitOpenGate([sandbox]), path)
    assert len(closed) == 1  # the wrong file was closed, unread
    assert _open_fds() == before


def test_gate_refuses_a_storage_it_cannot_verify(sandbox: pathlib.Path) -> None:
    gate = SandboxImplicitOpenGate([sandbox])
    options = runtime.run_sync(gate.check_storage(StorageOpenOptions(filename=_image(sandbox / "x.img"))))
    null = Null.open_sync(StorageOpenOptions(driver="null", driver_options={"size": 512}))
    with pytest.raises(ImplicitOpenDeniedError, match="no file descriptor"):
        gate._check_opened(null, options)
    file = File.open_sync(options)
    try:
        gate._check_opened(file, options)  # the file checked: accepted
        with pytest.raises(ImplicitOpenDeniedError, match="no file identity"):
            gate._check_opened(file, StorageOpenOptions(filename=options.filename))
    finally:
        runtime.run_sync(file.close())


# --- what the check records ------------------------------------------------------------------------------------


def test_check_records_the_file_identity(sandbox: pathlib.Path) -> None:
    path = _image(sandbox / "x.img")
    (sandbox / "link.img").symlink_to(path)
    gate = SandboxImplicitOpenGate([sandbox])
    given = StorageOpenOptions(filename=sandbox / "link.img", driver_options={"other": 1, FILE_IDENTITY: (1, 2)})
    options = runtime.run_sync(gate.check_storage(given))
    st = os.stat(path)
    assert options.filename == str(path)
    # The caller's options are kept; an identity they named is replaced by the one checked.
    assert options.driver_options == {"other": 1, FILE_IDENTITY: (st.st_dev, st.st_ino)}
    assert FILE_IDENTITY == imago_file.storage._FILE_IDENTITY


def test_nested_allowed_directories_walk_from_the_deepest(tmp_path: pathlib.Path, sandbox: pathlib.Path) -> None:
    path = _image(sandbox / "x.img")
    nested: list[list[str | os.PathLike[str]]] = [[tmp_path, sandbox], [sandbox, tmp_path], ["/", sandbox]]
    for directories in nested:
        storage = _open(SandboxImplicitOpenGate(directories), path)
        runtime.run_sync(storage.close())


# --- hard links --------------------------------------------------------------------------------------------------


def test_hard_link_to_a_file_outside_is_indistinguishable_by_default(
    sandbox: pathlib.Path, secret: pathlib.Path
) -> None:
    # Documented: a second name inside the sandbox is that file's name as much as the first one.
    os.link(secret, sandbox / "linked.img")
    storage = _open(SandboxImplicitOpenGate([sandbox]), sandbox / "linked.img")
    runtime.run_sync(storage.close())


def test_refuse_hard_links(sandbox: pathlib.Path, secret: pathlib.Path) -> None:
    os.link(secret, sandbox / "linked.img")
    gate = SandboxImplicitOpenGate([sandbox], refuse_hard_links=True)
    with pytest.raises(ImplicitOpenDeniedError, match="2 names") as info:
        _open(gate, sandbox / "linked.img")
    assert info.value.filename == str(sandbox / "linked.img")
    # A file with one name opens.
    runtime.run_sync(_open(gate, _image(sandbox / "single.img")).close())
    assert gate == SandboxImplicitOpenGate([sandbox], refuse_hard_links=True)
    assert gate != SandboxImplicitOpenGate([sandbox])
    assert "refuse_hard_links=True" in repr(gate)


def test_refuse_hard_links_must_be_a_bool(sandbox: pathlib.Path) -> None:
    with pytest.raises(InvalidOptionError, match="refuse_hard_links"):
        SandboxImplicitOpenGate([sandbox], refuse_hard_links=1)  # type: ignore[arg-type]


# --- the file driver's option, used directly ---------------------------------------------------------------------


def _identity(path: pathlib.Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_driver_opens_only_the_identified_file(tmp_path: pathlib.Path, reopen: str) -> None:
    path = _image(tmp_path / "x.img")
    other = _image(tmp_path / "other.img")
    storage = File.open_sync(StorageOpenOptions(filename=path, driver_options={FILE_IDENTITY: _identity(path)}))
    assert storage.size == 500
    runtime.run_sync(storage.close())
    with pytest.raises(ImplicitOpenDeniedError, match="changed while it was being opened") as info:
        File.open_sync(StorageOpenOptions(filename=path, driver_options={FILE_IDENTITY: _identity(other)}))
    assert info.value.filename == str(path)


def test_driver_does_not_follow_a_final_symlink_to_the_identified_file(tmp_path: pathlib.Path) -> None:
    path = _image(tmp_path / "x.img")
    (tmp_path / "link.img").symlink_to(path)
    with pytest.raises(ImplicitOpenDeniedError, match="changed"):
        File.open_sync(
            StorageOpenOptions(filename=tmp_path / "link.img", driver_options={FILE_IDENTITY: _identity(path)})
        )


@pytest.mark.usefixtures("hang_guard")
def test_driver_refuses_an_identified_fifo_without_blocking(tmp_path: pathlib.Path, spy: OpenSpy) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFileTypeError) as info:
        File.open_sync(StorageOpenOptions(filename=fifo, driver_options={FILE_IDENTITY: _identity(fifo)}))
    assert info.value.kind == "a FIFO"
    assert spy.never_opened(fifo)


def test_driver_refuses_an_identified_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(IsADirectoryError):
        File.open_sync(StorageOpenOptions(filename=tmp_path, driver_options={FILE_IDENTITY: _identity(tmp_path)}))


def test_driver_refuses_an_identified_character_device(spy: OpenSpy) -> None:
    null = pathlib.Path("/dev/null")
    with pytest.raises(UnsupportedFileTypeError, match="character device"):
        File.open_sync(StorageOpenOptions(filename=null, driver_options={FILE_IDENTITY: _identity(null)}))
    assert spy.never_opened(null)


@pytest.mark.parametrize(
    "identity",
    [[1, 2], (1,), (1, 2, 3), ("1", 2), (1, -2), (True, 2), (1.0, 2), "1:2"],
    ids=["list", "one", "three", "text", "negative", "bool", "float", "string"],
)
def test_driver_refuses_a_malformed_identity(tmp_path: pathlib.Path, identity: Any) -> None:
    path = _image(tmp_path / "x.img")
    with pytest.raises(InvalidOptionError, match="file_identity"):
        File.open_sync(StorageOpenOptions(filename=path, driver_options={FILE_IDENTITY: identity}))


def test_driver_refuses_to_create_with_an_identity(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "new.img"
    with pytest.raises(InvalidOptionError, match="cannot create"):
        File.create_sync(StorageCreateOptions(filename=path, size=512, driver_options={FILE_IDENTITY: (1, 2)}))
    assert not path.exists()


def test_driver_missing_identified_file_is_file_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        File.open_sync(StorageOpenOptions(filename=tmp_path / "missing.img", driver_options={FILE_IDENTITY: (1, 2)}))
    assert info.value.errno == errno.ENOENT


def test_gates_module_names_the_option() -> None:
    assert gates.FILE_IDENTITY == "file_identity"


def test_hard_link_to_a_file_outside_swapped_in_after_the_check(
    monkeypatch: pytest.MonkeyPatch, sandbox: pathlib.Path, secret: pathlib.Path, spy: OpenSpy
) -> None:
    # The checked file's name now names the secret's inode: another file than the one checked.
    path = _image(sandbox / "x.img")

    def swap() -> None:
        os.link(secret, sandbox / "x.img.new")
        os.replace(sandbox / "x.img.new", path)

    swap_after_check(monkeypatch, swap)
    with pytest.raises(ImplicitOpenDeniedError, match="changed while it was being opened"):
        _open(SandboxImplicitOpenGate([sandbox]), path)
    assert spy.never_opened(secret)
