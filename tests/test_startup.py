"""Start-up of ``import imago`` and of the ``imago`` command: what is (not) imported.

Structural, never timed (bench/bench_startup.py measures): a fresh interpreter runs the command
and reports ``sys.modules``; the heavy modules a command does not need (asyncio,
importlib.metadata, tqdm, json, the plugins of other drivers, the CLI modules of other
subcommands) must be absent. Also: the lazy exports of :mod:`imago` and the loading of single
plugins for drivers looked up by name, with the fall-back to loading everything.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from unittest import mock

import pytest

import imago
import imago.cli
import imago.plugin.manager as manager

RunPython = Callable[..., subprocess.CompletedProcess[str]]

# What no synchronous command should pay for unless it needs it.
HEAVY = {"asyncio", "concurrent.futures", "importlib.metadata", "importlib_metadata", "tqdm", "json"}
# What the core's own modules no longer import at all on the way to ``imago info``: attrs (its
# value classes are imago._record's), and standard modules only some paths use (argparse's
# shutil, snapshot dates, threading).
NOT_FOR_INFO = {"attr", "attrs", "shutil", "datetime", "threading"}
MARKER = "--- modules ---"

# Runs the CLI with the arguments given, then lists sys.modules after a marker line.
CLI_SCRIPT = f"""
import sys
from imago.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
print({MARKER!r})
print(status)
print("\\n".join(sorted(sys.modules)))
"""


def run_cli(run_python: RunPython, *args: str | Path) -> tuple[int, str, set[str]]:
    """``imago ARGS`` in a fresh interpreter: exit status, the output before the marker, modules."""
    result = run_python(["-c", CLI_SCRIPT, *map(str, args)])
    assert MARKER in result.stdout, result.stderr
    out, _, listing = result.stdout.partition(MARKER + "\n")
    status, *modules = listing.splitlines()
    return int(status), out, set(modules)


def subcommand_modules(but: str | None = None) -> set[str]:
    return {f"imago.cli.{name}" for name in imago.cli.COMMANDS if name != but}


def plugin_modules(modules: set[str]) -> set[str]:
    """The in-repo plugin packages among *modules*."""
    return {name.partition(".")[0] for name in modules if name.startswith("imago_")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("startup")
    paths = {}
    for fmt in ("raw", "qcow2"):
        paths[fmt] = directory / f"small.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(paths[fmt]), "1M"], check=True)
    return paths


# --- import imago -------------------------------------------------------------------------------


def test_import_imago_imports_nothing_else_of_imago(run_python: RunPython) -> None:
    result = run_python(["-c", "import sys, imago; print('\\n'.join(sorted(sys.modules)))"])
    assert result.returncode == 0, result.stderr
    modules = set(result.stdout.splitlines())
    assert {name for name in modules if name.startswith("imago")} == {"imago"}
    assert not modules & (HEAVY | {"pluggy", "attrs", "attr", "argparse"})


def test_every_public_name_resolves_to_its_module() -> None:
    origin = imago._ORIGIN
    assert set(origin) | {"__version__"} == set(imago.__all__)
    for name in imago.__all__:
        value = getattr(imago, name)
        if name == "__version__":
            assert value == importlib.metadata.version("imago-core")
            continue
        module = importlib.import_module(f"imago.{origin[name]}")
        assert value is (getattr(module, name) if imago._EXPORTS[origin[name]] else module), name
    assert set(imago.__all__) <= set(dir(imago))


def test_static_imports_match_the_lazy_table() -> None:
    # mypy sees the names through the imports under TYPE_CHECKING: they must be the table's.
    tree = ast.parse(Path(imago.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    static: dict[str, str] = {}
    for node in guarded.body:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1
            for alias in node.names:
                static[alias.name] = node.module or alias.name
    assert static == imago._ORIGIN


def test_star_import_and_from_import_in_a_fresh_interpreter(run_python: RunPython) -> None:
    script = """
        import sys
        from imago import *
        from imago import open, runtime, hookimpl, __version__
        import imago
        missing = [name for name in imago.__all__ if name != "__version__" and name not in globals()]
        assert not missing, missing
        assert runtime is sys.modules["imago.runtime"] and open is sys.modules["imago.api"].open
        print("ok")
    """
    result = run_python(["-c", textwrap.dedent(script)])
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_unknown_names_are_errors() -> None:
    with pytest.raises(AttributeError, match="module 'imago' has no attribute 'no_such_name'"):
        _ = imago.no_such_name  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match="no_such_name"):
        from imago import no_such_name  # type: ignore[attr-defined]  # noqa: F401
    # A private module name is not exported by the lazy table either.
    assert "_EXPORTS" not in imago.__all__


# --- the imago command --------------------------------------------------------------------------


def test_info_of_a_named_raw_image_loads_only_its_drivers(run_python: RunPython, images: dict[str, Path]) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "raw", images["raw"])
    assert status == 0
    assert "file format: raw" in out
    assert not modules & (HEAVY | subcommand_modules(but="info"))
    assert plugin_modules(modules) == {"imago_file", "imago_raw"}


def test_info_of_a_named_raw_image_needs_no_attrs_nor_shutil(run_python: RunPython, images: dict[str, Path]) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "raw", "--output=json", images["raw"])
    assert status == 0
    assert '"format": "raw"' in out
    assert not modules & NOT_FOR_INFO


def test_info_of_a_named_qcow2_image_loads_only_what_info_needs(run_python: RunPython, images: dict[str, Path]) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "qcow2", images["qcow2"])
    assert status == 0
    assert "file format: qcow2" in out
    # Check and repair, amend, compressed clusters (and their codecs), snapshots, resizing: the
    # driver imports them when first used.
    lazy = {"check", "repair", "compressed", "compression", "snapshots", "switchover", "resize", "backing_change"}
    assert not modules & {f"imago_qcow2.{name}" for name in lazy}
    assert not modules & (HEAVY | {"shutil", "datetime"})


def test_help_formatter_is_as_wide_as_argparse_makes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import shutil

    from imago.cli import _HelpFormatter

    for columns in ("37", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        assert _HelpFormatter("imago")._width == argparse.HelpFormatter("imago")._width
        assert _HelpFormatter("imago")._width == shutil.get_terminal_size().columns - 2
    monkeypatch.setenv("COLUMNS", "0")  # not set: the terminal's, else 80
    assert _HelpFormatter("imago")._width == argparse.HelpFormatter("imago")._width
    assert _HelpFormatter("imago", width=50)._width == 50


def test_a_subcommand_is_parsed_by_its_parser_alone(
    run_python: RunPython, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    def subcommands(parser: argparse.ArgumentParser) -> set[str]:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(action.choices)

    assert subcommands(imago.cli.build_parser("info", alone=True)) == {"info"}
    assert subcommands(imago.cli.build_parser("info")) == set(imago.cli.COMMANDS)
    built: list[bool] = []
    real = imago.cli.build_parser

    def recording(only: str | None = None, *, alone: bool = False) -> argparse.ArgumentParser:
        built.append(alone)
        return real(only, alone=alone)

    monkeypatch.setattr(imago.cli, "build_parser", recording)
    imago.cli.main(["info", "-f", "raw", str(images["raw"])])
    assert built == [True]
    # Options before the subcommand are the top-level parser's: its help lists every subcommand.
    status, out, _ = run_cli(run_python, "-h", "info")
    assert status == 0
    assert all(name in out for name in imago.cli.COMMANDS)


def test_importing_the_drivers_imports_no_registry(run_python: RunPython) -> None:
    # A program that uses a driver class directly (imago_raw.Raw) pays neither for pluggy nor
    # for the plugin registry: they come with the first look-up of a driver by name.
    script = "import sys, imago_raw, imago_qcow2; print(sorted(sys.modules))"
    result = run_python(["-c", script])
    assert result.returncode == 0, result.stderr
    modules = set(ast.literal_eval(result.stdout))
    assert not modules & (HEAVY | {"pluggy", "imago.plugin.manager", "argparse", "shutil"})
    raw_modules = {name for name in modules if name.startswith("imago_raw")}
    assert raw_modules == {"imago_raw", "imago_raw.driver", "imago_raw.create"}  # not its plugin module


def test_info_of_a_named_qcow2_image_loads_only_its_drivers(run_python: RunPython, images: dict[str, Path]) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "qcow2", images["qcow2"])
    assert status == 0
    assert "file format: qcow2" in out
    # asyncio is left out: imago_qcow2.state imports it at the top (not the core's doing).
    assert not modules & (HEAVY - {"asyncio", "concurrent.futures"} | subcommand_modules(but="info"))
    assert plugin_modules(modules) == {"imago_file", "imago_qcow2"}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_info_with_a_probed_format(run_python: RunPython, images: dict[str, Path], fmt: str) -> None:
    # Probing asks every format driver, so every plugin loads; still no progress bar, no json.
    status, out, modules = run_cli(run_python, "info", images[fmt])
    assert status == 0
    assert f"file format: {fmt}" in out
    # The entry points are read from the metadata directories, without importlib_metadata.
    assert not modules & ({"tqdm", "json", "importlib_metadata", "importlib.metadata"} | subcommand_modules(but="info"))


def test_info_json_output_needs_no_json_module(run_python: RunPython, images: dict[str, Path]) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "raw", "--output=json", images["raw"])
    assert status == 0
    assert '"format": "raw"' in out
    assert "json" not in modules  # qemu's printer is imago.cli.qjson


def test_subcommand_help_loads_no_plugin(run_python: RunPython) -> None:
    status, out, modules = run_cli(run_python, "info", "--help")
    assert status == 0
    assert "--backing-chain" in out
    assert not modules & (HEAVY | subcommand_modules(but="info"))
    assert plugin_modules(modules) == set()


def test_help_imports_no_subcommand_module(run_python: RunPython) -> None:
    status, out, modules = run_cli(run_python, "--help")
    assert status == 0
    assert all(name in out for name in imago.cli.COMMANDS)
    assert not modules & ({"tqdm", "json"} | subcommand_modules())


def test_failing_info_is_still_one_line(run_python: RunPython, tmp_path: Path) -> None:
    status, out, modules = run_cli(run_python, "info", "-f", "raw", tmp_path / "missing.raw")
    assert status == 1
    assert out == ""
    assert "traceback" not in modules  # imported only for --debug


# --- the runtime without asyncio ----------------------------------------------------------------


def test_runtime_imports_asyncio_only_when_a_loop_runs(run_python: RunPython) -> None:
    script = """
        import sys, threading
        from imago import runtime
        assert "asyncio" not in sys.modules and "concurrent.futures" not in sys.modules
        assert runtime.inline()

        async def twice(x):
            return 2 * x

        assert runtime.run_sync(runtime.gather_all([twice(1), twice(2)])) == [2, 4]
        assert "asyncio" not in sys.modules

        import asyncio

        async def under_a_loop():
            assert not runtime.inline()
            thread = await runtime.run_blocking(lambda: threading.current_thread().name)
            doubled = await runtime.run_parallel(lambda x: 2 * x, list(range(10)))
            gathered = await runtime.gather_all([twice(3), twice(4)])
            return thread, doubled, gathered

        thread, doubled, gathered = asyncio.run(under_a_loop())
        assert thread.startswith("imago-io"), thread
        assert doubled == [2 * x for x in range(10)] and gathered == [6, 8]
        assert runtime.inline()
        print("ok")
    """
    result = run_python(["-c", textwrap.dedent(script)])
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_synchronous_io_of_a_named_format_imports_no_heavy_module(run_python: RunPython, tmp_path: Path) -> None:
    script = f"""
        import sys
        import imago
        with imago.open({str(tmp_path / "disk.raw")!r}, "raw", write=True) as image:
            image.write(b"x" * 4096, 8192)
            buf = bytearray(4096)
            image.read(buf, 8192)
        assert buf == b"x" * 4096
        heavy = ("asyncio", "concurrent.futures", "importlib_metadata", "argparse", "imago.cli", "imago_qcow2")
        print(sorted(m for m in heavy if m in sys.modules))
    """
    (tmp_path / "disk.raw").write_bytes(bytes(1 << 16))
    result = run_python(["-c", textwrap.dedent(script)])
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


# --- drivers looked up by name: only the declaring plugins load -------------------------------


def storage_plugin(driver: str) -> str:
    return textwrap.dedent(f"""
        import imago

        class Driver(imago.Storage):
            name = {driver!r}

        @imago.hookimpl
        def imago_register_storage_drivers(register):
            register(Driver)
    """)


Install = Callable[..., None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Iterator[Install]:
    """``install(name, plugins, declared, source)``: a distribution on ``sys.path`` for one test.

    Its ``[imago]`` entry points are *plugins* (name -> target), it declares the storage drivers
    *declared*, and its one module (the first target's) has the text *source*. Each
    distribution gets its own ``sys.path`` entry, in the order installed.
    """
    modules: list[str] = []

    def install(name: str, plugins: dict[str, str], declared: Iterable[str], source: str) -> None:
        site = tmp_path / name
        dist_info = site / f"{name.replace('-', '_')}-1.0.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\nName: not this\n")
        lines = ["# comment", "[imago]", *(f"{k} = {v}" for k, v in plugins.items()), "", "[imago.storage_drivers]"]
        lines += [f"{driver} = unused:Class" for driver in declared]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        module = next(iter(plugins.values())).partition(":")[0].strip()
        (site / f"{module}.py").write_text(source)
        modules.append(module)
        sys.path.insert(len(modules) - 1, str(site))
        importlib.invalidate_caches()

    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards
    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def full_loads() -> Iterator[mock.MagicMock]:
    """Counts the scans of every plugin (the fall-back of a look-up by name)."""
    with mock.patch.object(manager, "_entry_points", wraps=manager._entry_points) as scans:
        yield scans


def test_declared_driver_loads_only_its_plugin(install: Install, full_loads: mock.MagicMock) -> None:
    install("imago-lazy-one", {"lazy-one": "imago_lazy_one"}, ["lazy1"], storage_plugin("lazy1"))
    install("imago-lazy-two", {"lazy-two": "imago_lazy_two"}, ["lazy2"], storage_plugin("lazy2"))
    assert imago.storage_driver("lazy1").__module__ == "imago_lazy_one"
    assert "imago_lazy_two" not in sys.modules
    assert full_loads.call_count == 0
    # A listing loads everything, the plugin already loaded included.
    assert {"lazy1", "lazy2", "file", "null"} <= set(imago.storage_drivers())
    assert full_loads.call_count == 1
    infos = {info.name: info for info in imago.plugins()}
    assert (infos["lazy-one"].distribution, infos["lazy-one"].version) == ("imago-lazy-one", "1.0")


def test_entry_point_with_an_attribute_path(install: Install, full_loads: mock.MagicMock) -> None:
    source = storage_plugin("nested") + "\n\nclass Holder:\n    plugin = __import__(__name__)\n"
    install("imago-nested", {"nested": "imago_nested:Holder.plugin [extra]"}, ["nested"], source)
    assert imago.storage_driver("nested").__module__ == "imago_nested"
    assert full_loads.call_count == 0


@pytest.mark.parametrize(
    ("target", "source", "cause"),
    [
        pytest.param("imago_lazy_broken", "raise RuntimeError('cannot import me')", "cannot import me", id="raises"),
        pytest.param("imago_lazy_broken:missing", storage_plugin("other"), "missing", id="no-such-attribute"),
        pytest.param("imago_lazy_broken", storage_plugin("other"), "did not register it", id="not-registered"),
    ],
)
def test_failing_declared_plugin_falls_back_to_the_full_load(
    install: Install, full_loads: mock.MagicMock, target: str, source: str, cause: str
) -> None:
    install("imago-lazy-broken", {"broken": target}, ["lazy-broken"], source)
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("lazy-broken")
    assert full_loads.call_count == 1
    assert caught.value.distribution == "imago-lazy-broken"
    assert cause in str(caught.value)
    assert imago.storage_driver("null").name == "null"  # the other drivers are unaffected


def test_driver_declared_twice_is_a_duplicate(install: Install, full_loads: mock.MagicMock) -> None:
    install("imago-twin-a", {"twin-a": "imago_twin_a"}, ["twin"], storage_plugin("twin"))
    install("imago-twin-b", {"twin-b": "imago_twin_b"}, ["twin"], storage_plugin("twin"))
    with pytest.raises(imago.DuplicateDriverError) as caught:
        imago.storage_driver("twin")
    assert caught.value.plugins == ("twin-a", "twin-b")
    assert full_loads.call_count == 1


def test_undeclared_and_in_process_drivers_need_the_full_load(
    install: Install, full_loads: mock.MagicMock, register_plugin: Callable[[str, object], None]
) -> None:
    install("imago-silent", {"silent": "imago_silent"}, [], storage_plugin("silent"))
    assert imago.storage_driver("silent").__module__ == "imago_silent"
    assert full_loads.call_count == 1
    manager.reset()
    register_plugin("in-process", types.SimpleNamespace())
    assert imago.storage_driver("file").name == "file"  # declared, but the in-process plugin counts too
    assert full_loads.call_count == 2


def test_metadata_headers_are_read_like_importlib_metadata() -> None:
    lines = ["Metadata-Version: 2.1", "name: imago-x", "Summary: one", "  Version: 9 (continued)", "Version: 1.2", ""]
    assert manager._name_and_version([*lines, "Version: 3 (the body)"]) == ("imago-x", "1.2")
    assert manager._name_and_version([]) == (None, None)


def summary(sources: Iterable[manager._Source]) -> list[tuple[object, ...]]:
    return sorted((s.name, s.distribution, s.version, sorted(s.declared.items())) for s in sources)


def test_entry_points_are_read_as_importlib_metadata_reads_them() -> None:
    import importlib_metadata

    read = manager._read_sources()
    assert read is not None  # this environment's sys.path holds directories only
    expected = [manager._entry_point_source(ep) for ep in importlib_metadata.entry_points(group="imago")]
    assert summary(read) == summary(expected)
    assert {"file", "null", "raw", "qcow2"} <= {source.name for source in read}


def test_first_distribution_of_a_name_wins(install: Install) -> None:
    install("imago-first", {"first": "imago_first"}, ["first"], storage_plugin("first"))
    install("Imago.First", {"second": "imago_second"}, ["second"], storage_plugin("second"))
    names = {source.name for source in manager._read_sources() or ()}
    assert "first" in names
    assert "second" not in names
    assert imago.storage_driver("first").__module__ == "imago_first"


def zipped_distribution(path: Path, driver: str) -> None:
    """A zip file holding a distribution whose plugin registers the storage driver *driver*."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "imago_zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: imago-zipped\nVersion: 1.0\n"
        )
        archive.writestr("imago_zipped-1.0.dist-info/entry_points.txt", "[imago]\nzipped = imago_zipped\n")
        archive.writestr("imago_zipped.py", storage_plugin(driver))


def test_zip_files_on_the_path_are_read_through_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_loads: mock.MagicMock, fresh_registry: None
) -> None:
    zipped_distribution(tmp_path / "plugins.zip", "zipped")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "plugins.zip"), *sys.path])
    monkeypatch.delitem(sys.modules, "imago_zipped", raising=False)
    assert manager._read_sources() is None
    assert imago.storage_driver("zipped").__module__ == "imago_zipped"
    infos = {info.name: info for info in imago.plugins()}
    assert (infos["zipped"].distribution, infos["zipped"].version) == ("imago-zipped", "1.0")
    assert imago.storage_driver("null").name == "null"  # the directories' plugins too
    sys.modules.pop("imago_zipped", None)


def test_eggs_and_other_distribution_finders_are_left_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert manager._read_sources() is not None
    (tmp_path / "old-1.0-py3.11.egg").mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    assert manager._read_sources() is None
    monkeypatch.setattr(sys, "path", [*sys.path[:-1], str(tmp_path / "missing"), 42])
    assert manager._read_sources() is None  # an entry that is not a string
    monkeypatch.setattr(sys, "path", sys.path[:-1])
    assert manager._read_sources() is not None  # a missing directory holds nothing

    class Finder:
        @staticmethod
        def find_distributions(context: object = None) -> Iterator[object]:
            return iter(())

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder])
    assert manager._read_sources() is None


# --- the value classes without attrs ------------------------------------------------------------


def test_value_classes_behave_as_their_attrs_versions() -> None:
    import copy
    import pickle

    import attrs

    options = imago.StorageOpenOptions(filename="a.img", writable=True)
    assert repr(options) == (
        "StorageOpenOptions(filename='a.img', writable=True, direct=False, no_flush=False, force_share=False,"
        " share_write=False, driver='file', driver_options={})"
    )
    # attrs' functions still work on them (attrs is imported only when something asks).
    assert attrs.has(imago.StorageOpenOptions)
    assert [field.name for field in attrs.fields(imago.CheckFinding)][:2] == ["kind", "message"]
    assert attrs.asdict(imago.Measurement(1, 2)) == {"required": 1, "fully_allocated": 2, "bitmaps": None}
    changed = attrs.evolve(options, writable=False)
    assert changed == options.__replace__(writable=False) != options
    with pytest.raises(imago.InvalidOptionError):
        options.__replace__(driver="")  # the constructor's checks apply

    raw = imago.MappingRaw(None, 4096, True)  # type: ignore[arg-type]
    same = imago.MappingRaw(None, 4096, True)  # type: ignore[arg-type]
    assert raw == same
    assert hash(raw) == hash(same)
    assert raw != imago.ShallowRaw(None, 4096, True)  # type: ignore[arg-type]  # same fields, another class
    assert repr(raw) == "MappingRaw(storage=None, offset=4096, writable=True)"
    match raw:
        case imago.Mapping.Raw(_, offset, writable=True):
            assert offset == 4096
        case _:
            pytest.fail("no match")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        raw.offset = 0  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del raw.offset
    for copied in (copy.copy(raw), copy.deepcopy(imago.MappingZero(True)), pickle.loads(pickle.dumps(options))):
        assert copied == copy.copy(copied)
    assert pickle.loads(pickle.dumps(options)) == options

    # A field left out of equality and repr (the protocol of a capability).
    assert imago.Capability("check", ("check",), object) == imago.Capability.CHECK
    assert "protocol" not in repr(imago.Capability.CHECK)
    # Nested and keyword-only classes.
    option = imago.FormatCreateBuilder.Option("size", "size", "Virtual disk size")
    assert repr(option).startswith("FormatCreateBuilder.Option(name='size', ")
    assert imago.CheckFinding.__match_args__ == ()
    with pytest.raises(TypeError):
        imago.CheckFinding(imago.FindingKind.LEAK, "x")  # type: ignore[misc]
