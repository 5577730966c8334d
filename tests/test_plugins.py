"""The plugin system: entry-point loading, the driver registry and its error paths."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pluggy
import pytest

import imago
import imago.plugin.manager
from imago import DenyImplicitOpenGate, SyncFormatAccess

FIXTURE_DISTRIBUTION = Path(__file__).parent / "fixtures" / "thirdparty_plugin"

RunPython = Callable[..., subprocess.CompletedProcess[str]]


# --- helpers ---------------------------------------------------------------------------------


def storage_class(name: Any) -> type[imago.Storage]:
    """An (abstract) storage driver class called *name*: enough to be registered."""
    return type(f"Storage_{name}", (imago.Storage,), {"name": name})


def format_class(name: Any) -> type[imago.FormatDriver]:
    """An (abstract) format driver class called *name*."""
    return type(f"Format_{name}", (imago.FormatDriver,), {"name": name})


def make_plugin(storage: Sequence[Any] = (), formats: Sequence[Any] = ()) -> types.SimpleNamespace:
    """A plugin object registering exactly the given objects, in order."""

    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[[Any], None]) -> None:
        for cls in storage:
            register(cls)

    @imago.hookimpl
    def imago_register_format_drivers(register: Callable[[Any], None]) -> None:
        for cls in formats:
            register(cls)

    return types.SimpleNamespace(
        imago_register_storage_drivers=imago_register_storage_drivers,
        imago_register_format_drivers=imago_register_format_drivers,
    )


def plugin_info(name: str) -> imago.PluginInfo:
    found = [info for info in imago.plugins() if info.name == name]
    assert len(found) == 1, [info.name for info in imago.plugins()]
    return found[0]


def null_raw_roundtrip() -> bytes:
    """Write and read back through raw-on-null, looked up by name: proves both still work."""
    null = imago.storage_driver("null")(1 << 16)
    raw = imago.format_driver("raw")
    with SyncFormatAccess(raw.builder(null).write(True).open_sync(DenyImplicitOpenGate())) as image:
        image.write(b"\xaa" * 512, 512)
        buf = bytearray(b"\xff" * 1024)
        image.read(buf, 0)
        return bytes(buf)


def write_distribution(
    site: Path,
    distribution: str,
    version: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
    other_groups: dict[str, dict[str, str]] | None = None,
) -> None:
    """Make *site* look like an installed distribution: a ``.dist-info`` and its modules.

    *entry_points* go into the group ``imago``, *other_groups* maps further groups (the driver
    declarations ``imago.format_drivers``, say) to their entry points.
    """
    site.mkdir(parents=True, exist_ok=True)
    dist_info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = ["[imago]", *(f"{name} = {target}" for name, target in entry_points.items())]
    for group, group_entry_points in (other_groups or {}).items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in group_entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def run_script(run_python: RunPython, script: str, pythonpath: Sequence[Path]) -> Any:
    """Run *script* in a fresh interpreter; it prints one JSON document as its last line."""
    result = run_python(["-c", textwrap.dedent(script)], pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# Plugin modules for the entry-point tests (run in subprocesses).
STORAGE_PLUGIN_SOURCE = """
    import imago

    class {cls}(imago.Storage):
        name = {driver!r}

    @imago.hookimpl
    def imago_register_storage_drivers(register):
        register({cls})
"""

IMPORT_FAILS_SOURCE = """
    raise RuntimeError("this plugin cannot be imported")
"""

HOOK_FAILS_SOURCE = """
    import imago

    @imago.hookimpl
    def imago_register_storage_drivers(register):
        raise RuntimeError("this plugin's hook fails")
"""

# Reports what a fresh interpreter sees of the plugin "broken" and of the healthy drivers.
BROKEN_REPORT_SCRIPT = """
    import json
    import imago
    from imago import DenyImplicitOpenGate, SyncFormatAccess

    infos = {info.name: info for info in imago.plugins()}
    broken = infos["broken"]
    try:
        imago.storage_driver("broken")
    except imago.DriverNotFoundError as error:
        lookup = {
            "message": str(error),
            "cause_is_load_error": error.__cause__ is broken.error,
            "lookup_error": isinstance(error, LookupError),
        }
    null = imago.storage_driver("null")(4096)
    with SyncFormatAccess(imago.format_driver("raw").builder(null).open_sync(DenyImplicitOpenGate())) as image:
        size = image.size
    print(json.dumps({
        "error_type": type(broken.error).__name__,
        "cause_type": type(broken.error.__cause__).__name__,
        "cause_message": str(broken.error.__cause__),
        "distribution": broken.distribution,
        "error_distribution": broken.error.distribution,
        "error_plugin": broken.error.plugin,
        "storage_drivers": list(broken.storage_drivers),
        "others": {name: info.error is None for name, info in infos.items() if name != "broken"},
        "lookup": lookup,
        "null_raw_size": size,
    }))
"""


# --- the in-repo plugins ---------------------------------------------------------------------


def test_in_repo_drivers_are_registered() -> None:
    import imago_file
    import imago_null
    import imago_raw

    storage = imago.storage_drivers()
    formats = imago.format_drivers()
    assert storage["file"] is imago_file.File
    assert storage["null"] is imago_null.Null
    assert formats["raw"] is imago_raw.Raw
    assert imago.format_driver("raw") is imago_raw.Raw
    assert imago.storage_driver("file") is imago_file.File
    assert imago.storage_driver("null") is imago_null.Null


def test_in_repo_plugins_report_their_distributions() -> None:
    infos = {info.name: info for info in imago.plugins()}
    expected = {"file": "imago-file", "null": "imago-null", "raw": "imago-raw"}
    for name, distribution in expected.items():
        info = infos[name]
        assert info.distribution == distribution
        assert info.version == importlib.metadata.version(distribution)
        assert info.error is None
    assert infos["file"].storage_drivers == ("file",)
    assert infos["null"].storage_drivers == ("null",)
    assert infos["raw"].format_drivers == ("raw",)
    assert infos["raw"].storage_drivers == ()


def test_drivers_found_by_name_do_io() -> None:
    data = null_raw_roundtrip()
    # null drops writes: everything reads back as zero, and the buffer was fully overwritten.
    assert data == bytes(1024)


# --- a third-party distribution, really installed --------------------------------------------


@pytest.fixture(scope="module")
def thirdparty_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture distribution installed with pip into a fresh target directory."""
    before = sorted(p.relative_to(FIXTURE_DISTRIBUTION) for p in FIXTURE_DISTRIBUTION.rglob("*"))
    work = tmp_path_factory.mktemp("thirdparty")
    source = work / "src-tree"
    shutil.copytree(FIXTURE_DISTRIBUTION, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site = work / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "imago_memory" / "storage.py").is_file()
    assert list(site.glob("imago_memory_example-0.7.1.dist-info"))
    after = sorted(p.relative_to(FIXTURE_DISTRIBUTION) for p in FIXTURE_DISTRIBUTION.rglob("*"))
    assert after == before, "installing must not leave build artefacts in the repository"
    return site


def test_thirdparty_distribution_provides_a_storage(run_python: RunPython, thirdparty_site: Path) -> None:
    report = run_script(
        run_python,
        """
        import json
        import imago
        import imago_memory
        import imago_raw

        infos = {info.name: info for info in imago.plugins()}
        memory = infos["memory"]
        cls = imago.storage_driver("memory")

        storage = cls(0)
        imago_raw.Raw.create_builder(storage).size(1 << 20).create_sync()
        image = imago.SyncFormatAccess(
            imago_raw.Raw.builder(storage).write(True).open_sync(imago.DenyImplicitOpenGate())
        )
        image.write(b"hello, memory" * 100, 4096 + 3)
        buf = bytearray(1300)
        image.read(buf, 4096 + 3)
        head = bytearray(16)
        image.read(head, 0)
        size = image.size
        image.close()

        print(json.dumps({
            "module": imago_memory.__file__,
            "distribution": memory.distribution,
            "version": memory.version,
            "storage_drivers": list(memory.storage_drivers),
            "cli_commands": list(memory.cli_commands),
            "error": None if memory.error is None else str(memory.error),
            "is_class": cls is imago_memory.Memory,
            "in_table": imago.storage_drivers().get("memory") is imago_memory.Memory,
            "others": sorted(name for name, info in infos.items() if info.error is None),
            "read_back": buf == b"hello, memory" * 100,
            "head_zero": head == bytes(16),
            "size": size,
            "stored": storage.contents[4096 + 3 : 4096 + 3 + 13].decode(),
        }))
        """,
        [thirdparty_site],
    )
    assert Path(report["module"]).is_relative_to(thirdparty_site)
    assert report["distribution"] == "imago-memory-example"
    assert report["version"] == "0.7.1"
    assert report["storage_drivers"] == ["memory"]
    assert report["cli_commands"] == ["memory-demo"]
    assert report["error"] is None
    assert report["is_class"] is True
    assert report["in_table"] is True
    assert {"file", "null", "raw", "memory"} <= set(report["others"])
    assert report["read_back"] is True
    assert report["head_zero"] is True
    assert report["size"] == 1 << 20
    assert report["stored"] == "hello, memory"


def test_thirdparty_distribution_in_imago_plugins(run_python: RunPython, thirdparty_site: Path) -> None:
    human = run_python(["-m", "imago.cli", "plugins"], pythonpath=[thirdparty_site])
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    index = lines.index("memory (imago-memory-example 0.7.1)")
    assert lines[index + 1].split() == ["storage", "drivers:", "memory"]
    assert lines[index + 2].split() == ["commands:", "memory-demo"]
    assert "raw (imago-raw " in human.stdout
    assert "ERROR" not in human.stdout

    as_json = run_python(["-m", "imago.cli", "plugins", "--output", "json"], pythonpath=[thirdparty_site])
    assert as_json.returncode == 0, as_json.stderr
    entries = {entry["name"]: entry for entry in json.loads(as_json.stdout)}
    assert entries["memory"] == {
        "name": "memory",
        "distribution": "imago-memory-example",
        "version": "0.7.1",
        "storage-drivers": ["memory"],
        "format-drivers": [],
        "cli-commands": ["memory-demo"],
        "error": None,
    }
    assert entries["null"]["storage-drivers"] == ["null"]


def test_thirdparty_cli_command(run_python: RunPython, thirdparty_site: Path) -> None:
    helped = run_python(["-m", "imago.cli", "--help"], pythonpath=[thirdparty_site])
    assert helped.returncode == 0, helped.stderr
    assert "memory-demo" in helped.stdout
    ran = run_python(["-m", "imago.cli", "memory-demo", "4096"], pythonpath=[thirdparty_site])
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "memory storage of 4096 bytes\n"


def test_thirdparty_plugin_absent_without_its_path(run_python: RunPython) -> None:
    report = run_script(
        run_python,
        """
        import json
        import imago
        try:
            imago.storage_driver("memory")
        except imago.DriverNotFoundError as error:
            print(json.dumps({"message": str(error), "distribution": error.distribution}))
        """,
        [],
    )
    assert report["distribution"] == "imago-memory"
    assert "'imago-memory'" in report["message"]


# --- broken and duplicate plugins found through entry points ---------------------------------


@pytest.mark.parametrize(
    ("module_source", "cause_type", "cause_message"),
    [
        pytest.param(IMPORT_FAILS_SOURCE, "RuntimeError", "this plugin cannot be imported", id="import-raises"),
        pytest.param(HOOK_FAILS_SOURCE, "RuntimeError", "this plugin's hook fails", id="hook-raises"),
        pytest.param(None, "ModuleNotFoundError", "No module named 'imago_broken_plugin'", id="module-missing"),
    ],
)
def test_broken_entry_point_plugin(
    tmp_path: Path, run_python: RunPython, module_source: str | None, cause_type: str, cause_message: str
) -> None:
    modules = {} if module_source is None else {"imago_broken_plugin": module_source}
    write_distribution(tmp_path, "imago-broken", "2.0", {"broken": "imago_broken_plugin"}, modules)
    report = run_script(run_python, BROKEN_REPORT_SCRIPT, [tmp_path])
    assert report["error_type"] == "PluginLoadError"
    assert report["cause_type"] == cause_type
    assert report["cause_message"] == cause_message
    assert report["distribution"] == "imago-broken"
    assert report["error_distribution"] == "imago-broken"
    assert report["error_plugin"] == "broken"
    assert report["storage_drivers"] == []
    assert report["others"]["file"] is True
    assert report["others"]["null"] is True
    assert report["others"]["raw"] is True
    assert report["lookup"]["cause_is_load_error"] is True
    assert report["lookup"]["lookup_error"] is True
    assert "'imago-broken'" in report["lookup"]["message"]
    assert cause_message in report["lookup"]["message"]
    assert report["null_raw_size"] == 4096

    listed = run_python(["-m", "imago.cli", "plugins"], pythonpath=[tmp_path])
    assert listed.returncode == 1
    assert "Traceback" not in listed.stderr
    lines = listed.stdout.splitlines()
    index = lines.index("broken (imago-broken 2.0)")
    assert lines[index + 1].strip() == f"ERROR: {cause_type}: {cause_message}"
    assert "null (imago-null " in listed.stdout

    as_json = run_python(["-m", "imago.cli", "plugins", "--output", "json"], pythonpath=[tmp_path])
    assert as_json.returncode == 1
    entries = {entry["name"]: entry for entry in json.loads(as_json.stdout)}
    assert cause_message in entries["broken"]["error"]
    assert entries["raw"]["error"] is None


def test_duplicate_entry_point_drivers(tmp_path: Path, run_python: RunPython) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write_distribution(
        first,
        "imago-dup-one",
        "1.0",
        {"dup-one": "imago_dup_one"},
        {"imago_dup_one": STORAGE_PLUGIN_SOURCE.format(cls="One", driver="dup")},
    )
    write_distribution(
        second,
        "imago-dup-two",
        "1.0",
        {"dup-two": "imago_dup_two"},
        {"imago_dup_two": STORAGE_PLUGIN_SOURCE.format(cls="Two", driver="dup")},
    )
    report = run_script(
        run_python,
        """
        import json
        import imago

        infos = {info.name: info for info in imago.plugins()}
        try:
            imago.storage_driver("dup")
        except imago.DuplicateDriverError as error:
            duplicate = {"plugins": list(error.plugins), "kind": error.kind, "name": error.name}
        print(json.dumps({
            "one": [list(infos["dup-one"].storage_drivers), infos["dup-one"].error is None],
            "two": [list(infos["dup-two"].storage_drivers), str(infos["dup-two"].error)],
            "two_cause": type(infos["dup-two"].error.__cause__).__name__,
            "duplicate": duplicate,
            "null": imago.storage_driver("null").__name__,
            "raw": imago.format_driver("raw").__name__,
        }))
        """,
        [first, second],
    )
    # sys.path order decides which plugin comes first.
    assert report["one"] == [["dup"], True]
    assert report["two"][0] == []
    assert "'dup' is registered twice" in report["two"][1]
    assert report["two_cause"] == "DuplicateDriverError"
    assert report["duplicate"] == {"plugins": ["dup-one", "dup-two"], "kind": "storage", "name": "dup"}
    assert report["null"] == "Null"
    assert report["raw"] == "Raw"


def test_same_entry_point_name_in_two_distributions(tmp_path: Path, run_python: RunPython) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write_distribution(
        first,
        "imago-extra-a",
        "1.0",
        {"extra": "imago_extra_a"},
        {"imago_extra_a": STORAGE_PLUGIN_SOURCE.format(cls="A", driver="extra-a")},
    )
    write_distribution(
        second,
        "imago-extra-b",
        "1.0",
        {"extra": "imago_extra_b"},
        {"imago_extra_b": STORAGE_PLUGIN_SOURCE.format(cls="B", driver="extra-b")},
    )
    report = run_script(
        run_python,
        """
        import json
        import imago

        print(json.dumps({
            "plugins": {i.name: [i.distribution, list(i.storage_drivers)] for i in imago.plugins()},
            "a": imago.storage_driver("extra-a").__name__,
            "b": imago.storage_driver("extra-b").__name__,
        }))
        """,
        [first, second],
    )
    assert report["plugins"]["extra"] == ["imago-extra-a", ["extra-a"]]
    assert report["plugins"]["extra@imago-extra-b"] == ["imago-extra-b", ["extra-b"]]
    assert (report["a"], report["b"]) == ("A", "B")


# --- duplicates registered in-process --------------------------------------------------------


def test_duplicate_storage_driver_between_plugins(register_plugin: Callable[[str, object], None]) -> None:
    first_cls, second_cls = storage_class("dupe"), storage_class("dupe")
    register_plugin("dupe-first", make_plugin(storage=[first_cls, storage_class("only-first")]))
    register_plugin("dupe-second", make_plugin(storage=[storage_class("only-second"), second_cls]))

    with pytest.raises(imago.DuplicateDriverError) as caught:
        imago.storage_driver("dupe")
    error = caught.value
    assert isinstance(error, imago.PluginError)
    assert (error.kind, error.name, error.plugins) == ("storage", "dupe", ("dupe-first", "dupe-second"))
    assert "'dupe'" in str(error)

    first, second = plugin_info("dupe-first"), plugin_info("dupe-second")
    assert first.error is None
    assert first.storage_drivers == ("dupe", "only-first")
    assert isinstance(second.error, imago.PluginLoadError)
    assert second.error.__cause__ is error
    assert second.storage_drivers == ()
    # The failed plugin registers nothing, not even its valid driver.
    with pytest.raises(imago.DriverNotFoundError):
        imago.storage_driver("only-second")
    assert imago.storage_driver("only-first").name == "only-first"
    assert null_raw_roundtrip() == bytes(1024)


def test_duplicate_format_driver_of_an_installed_plugin(register_plugin: Callable[[str, object], None]) -> None:
    import imago_raw

    register_plugin("fake-raw", make_plugin(formats=[format_class("raw")]))
    with pytest.raises(imago.DuplicateDriverError) as caught:
        imago.format_driver("raw")
    assert caught.value.kind == "format"
    assert caught.value.plugins == ("raw", "fake-raw")
    assert plugin_info("raw").error is None
    assert isinstance(plugin_info("fake-raw").error, imago.PluginLoadError)
    # The table still holds the first registration; other drivers are untouched.
    assert imago.format_drivers()["raw"] is imago_raw.Raw
    assert imago.storage_driver("null").name == "null"


def test_duplicate_within_one_plugin(register_plugin: Callable[[str, object], None]) -> None:
    register_plugin("twice", make_plugin(storage=[storage_class("twice"), storage_class("twice")]))
    info = plugin_info("twice")
    assert isinstance(info.error, imago.PluginLoadError)
    assert isinstance(info.error.__cause__, imago.DuplicateDriverError)
    with pytest.raises(imago.DuplicateDriverError):
        imago.storage_driver("twice")


def test_same_name_for_storage_and_format_is_not_a_duplicate(register_plugin: Callable[[str, object], None]) -> None:
    register_plugin("both", make_plugin(storage=[storage_class("both")], formats=[format_class("both")]))
    assert plugin_info("both").error is None
    assert imago.storage_driver("both").name == "both"
    assert imago.format_driver("both").name == "both"


# --- broken plugins registered in-process ----------------------------------------------------


def test_plugin_whose_hook_raises(register_plugin: Callable[[str, object], None]) -> None:
    failure = RuntimeError("disk on fire")

    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[[Any], None]) -> None:
        raise failure

    register_plugin("broken", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    info = plugin_info("broken")
    assert info.distribution is None
    assert isinstance(info.error, imago.PluginLoadError)
    assert info.error.__cause__ is failure
    assert info.error.plugin == "broken"
    assert info.error.reason == "RuntimeError: disk on fire"

    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("broken")
    assert caught.value.__cause__ is info.error
    assert "disk on fire" in str(caught.value)

    # An unrelated missing driver mentions the broken plugin too.
    with pytest.raises(imago.DriverNotFoundError) as unrelated:
        imago.format_driver("nothing-like-it")
    assert "plugins that failed to load: broken" in str(unrelated.value)
    assert unrelated.value.__cause__ is info.error

    assert {"file", "null"} <= set(imago.storage_drivers())
    assert null_raw_roundtrip() == bytes(1024)


def test_failing_hook_discards_what_the_plugin_registered(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[[Any], None]) -> None:
        register(storage_class("half"))

    @imago.hookimpl
    def imago_register_format_drivers(register: Callable[[Any], None]) -> None:
        raise ValueError("second hook fails")

    plugin = types.SimpleNamespace(
        imago_register_storage_drivers=imago_register_storage_drivers,
        imago_register_format_drivers=imago_register_format_drivers,
    )
    register_plugin("half", plugin)
    assert plugin_info("half").storage_drivers == ()
    assert "half" not in imago.storage_drivers()
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("half")
    assert isinstance(caught.value.__cause__, imago.PluginLoadError)
    assert isinstance(caught.value.__cause__.__cause__, ValueError)


def test_plugin_with_a_hook_argument_that_is_not_in_the_spec(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[[Any], None], extra: object) -> None:
        raise AssertionError("must not be called")

    register_plugin("bad-args", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    info = plugin_info("bad-args")
    assert isinstance(info.error, imago.PluginLoadError)
    assert "extra" in str(info.error)
    assert imago.storage_driver("null").name == "null"


class _NotADriver:
    name = "not-a-driver"


@pytest.mark.parametrize(
    ("kind", "obj", "message"),
    [
        pytest.param("storage", print, "must be a subclass of Storage", id="function"),
        pytest.param("storage", "file", "must be a subclass of Storage", id="string"),
        pytest.param("storage", _NotADriver(), "must be a subclass of Storage", id="instance"),
        pytest.param("storage", _NotADriver, "must be a subclass of Storage", id="plain-class"),
        pytest.param("storage", format_class("fmt"), "must be a subclass of Storage", id="format-as-storage"),
        pytest.param("format", storage_class("sto"), "must be a subclass of FormatDriver", id="storage-as-format"),
        pytest.param("storage", storage_class(""), "has no name", id="storage-empty-name"),
        pytest.param("format", format_class(""), "has no name", id="format-empty-name"),
        pytest.param("storage", storage_class(42), "has no name", id="non-string-name"),
        pytest.param("format", imago.FormatDriver, "has no name", id="base-class-itself"),
    ],
)
def test_invalid_driver_is_a_load_error(
    register_plugin: Callable[[str, object], None], kind: str, obj: object, message: str
) -> None:
    plugin = make_plugin(storage=[obj]) if kind == "storage" else make_plugin(formats=[obj])
    register_plugin("invalid", plugin)
    info = plugin_info("invalid")
    assert isinstance(info.error, imago.PluginLoadError)
    cause = info.error.__cause__
    assert isinstance(cause, imago.InvalidDriverError)
    assert isinstance(cause, TypeError)
    assert message in str(cause)
    assert message in str(info.error)
    assert info.storage_drivers == info.format_drivers == ()
    assert imago.format_driver("raw").name == "raw"


# --- missing drivers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lookup", "name", "distribution"),
    [
        (imago.storage_driver, "foo", "imago-foo"),
        (imago.format_driver, "qed", "imago-qed"),
    ],
)
def test_missing_driver_names_the_distribution(lookup: Callable[[str], type], name: str, distribution: str) -> None:
    with pytest.raises(imago.DriverNotFoundError) as caught:
        lookup(name)
    error = caught.value
    assert isinstance(error, LookupError)
    assert isinstance(error, imago.ImagoError)
    assert error.name == name
    assert error.distribution == distribution
    assert f"install the distribution {distribution!r}" in str(error)
    assert error.__cause__ is None


def test_missing_known_driver_names_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    # An installed distribution declares the driver in its metadata, but its plugin cannot load.
    write_distribution(
        tmp_path,
        "imago-formats-extra",
        "1.0",
        {"extra": "imago_formats_extra_not_there"},
        {},
        {"imago.format_drivers": {"parallels": "imago_formats_extra_not_there:Parallels"}},
    )
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(imago.DriverNotFoundError, match="install the distribution 'imago-formats-extra'"):
        imago.format_driver("parallels")


def test_installed_driver_of_the_other_kind_is_not_found() -> None:
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("raw")
    assert caught.value.kind == "storage"
    assert "no storage driver named 'raw'" in str(caught.value)


# --- lazy, idempotent loading ----------------------------------------------------------------


def test_loading_is_lazy_and_idempotent() -> None:
    real = imago.plugin.manager._entry_points
    imago.plugin.manager.reset()
    try:
        with mock.patch.object(imago.plugin.manager, "_entry_points", wraps=real) as scan:
            assert scan.call_count == 0
            imago.storage_drivers()
            imago.format_driver("raw")
            imago.plugins()
            with pytest.raises(imago.DriverNotFoundError):
                imago.storage_driver("nope")
            assert scan.call_count == 1

            imago.plugin.manager.reset()
            assert scan.call_count == 1  # reset only forgets; the scan waits for a look-up
            assert "null" in imago.storage_drivers()
            assert scan.call_count == 2
            imago.storage_driver("null")
            assert scan.call_count == 2
    finally:
        imago.plugin.manager.reset()


def test_hooks_run_once_and_again_after_changes(register_plugin: Callable[[str, object], None]) -> None:
    calls: list[str] = []

    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[[Any], None]) -> None:
        calls.append("storage")
        register(storage_class("counted"))

    register_plugin("counted", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    assert calls == []  # registering is lazy too
    for _ in range(3):
        assert imago.storage_driver("counted").name == "counted"
        imago.plugins()
    assert calls == ["storage"]

    register_plugin("other", make_plugin(storage=[storage_class("other")]))
    assert imago.storage_driver("other").name == "other"
    assert imago.storage_driver("counted").name == "counted"
    assert calls == ["storage", "storage"]

    imago.unregister_plugin("other")
    with pytest.raises(imago.DriverNotFoundError):
        imago.storage_driver("other")
    assert [info.name for info in imago.plugins()].count("other") == 0


def test_plugins_are_not_imported_before_first_lookup(run_python: RunPython) -> None:
    report = run_script(
        run_python,
        """
        import json
        import sys
        import imago
        before = sorted(m for m in sys.modules if m.startswith(("imago_file", "imago_null", "imago_raw")))
        imago.format_drivers()
        after = sorted(m for m in sys.modules if m.startswith(("imago_file", "imago_null", "imago_raw")))
        print(json.dumps({"before": before, "after": after}))
        """,
        [],
    )
    assert report["before"] == []
    assert {"imago_file.plugin", "imago_null.plugin", "imago_raw.plugin"} <= set(report["after"])


def test_plugin_calling_sys_exit_on_registration_is_isolated(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_register_storage_drivers(register: Callable[..., None]) -> None:
        raise SystemExit(3)

    register_plugin("exits", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    info = {p.name: p for p in imago.plugins()}["exits"]
    assert info.error is not None
    assert "SystemExit" in str(info.error)
    assert imago.storage_driver("file") is not None


def test_three_plugins_with_one_name_are_all_listed(register_plugin: Callable[[str, object], None]) -> None:
    for _ in range(3):
        register_plugin("same", types.SimpleNamespace())
    names = [p.name for p in imago.plugins()]
    assert [n for n in names if n.startswith("same")] == ["same", "same#2", "same#3"]


# --- hooks imago does not specify ------------------------------------------------------------


def misspelled_plugin() -> types.SimpleNamespace:
    """A plugin with one good hook and one misspelled hook (``..._format_driver``, singular)."""

    @imago.hookimpl
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        register(storage_class("misspelled"))

    @imago.hookimpl
    def imago_register_format_driver(register: imago.FormatRegistrar) -> None:
        raise AssertionError("must not be called")

    return types.SimpleNamespace(
        imago_register_storage_drivers=imago_register_storage_drivers,
        imago_register_format_driver=imago_register_format_driver,
    )


def test_misspelled_hook_is_a_load_error(register_plugin: Callable[[str, object], None]) -> None:
    register_plugin("misspelled", misspelled_plugin())
    info = plugin_info("misspelled")
    assert isinstance(info.error, imago.PluginLoadError)
    assert isinstance(info.error.__cause__, pluggy.PluginValidationError)
    assert "unknown hook 'imago_register_format_driver'" in info.error.reason
    assert "did you mean 'imago_register_format_drivers'?" in info.error.reason
    # Nothing of the plugin counts, not even its correctly spelled hook.
    assert info.storage_drivers == ()
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("misspelled")
    assert caught.value.__cause__ is info.error
    assert "unknown hook 'imago_register_format_driver'" in str(caught.value)
    assert null_raw_roundtrip() == bytes(1024)


def test_unknown_hook_without_a_close_match(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_frobnicate() -> None:
        raise AssertionError("must not be called")

    register_plugin("frob", types.SimpleNamespace(imago_frobnicate=imago_frobnicate))
    error = plugin_info("frob").error
    assert error is not None
    assert "unknown hook 'imago_frobnicate'" in error.reason
    assert "did you mean" not in error.reason


def test_optional_unknown_hook_is_allowed(register_plugin: Callable[[str, object], None]) -> None:
    # pluggy's way for a plugin to implement a hook a newer imago may specify.
    @imago.hookimpl(optionalhook=True)
    def imago_register_future_things(register: object) -> None:
        raise AssertionError("must not be called")

    plugin = make_plugin(storage=[storage_class("forward")])
    plugin.imago_register_future_things = imago_register_future_things
    register_plugin("forward", plugin)
    assert plugin_info("forward").error is None
    assert imago.storage_driver("forward").name == "forward"


def test_hook_without_the_marker_is_a_load_error(register_plugin: Callable[[str, object], None]) -> None:
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        raise AssertionError("must not be called")

    register_plugin("unmarked", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    error = plugin_info("unmarked").error
    assert isinstance(error, imago.PluginLoadError)
    assert "'imago_register_storage_drivers' is not marked with @imago.hookimpl" in error.reason


MISSPELLED_HOOK_SOURCE = """
    import imago

    class Parallels(imago.FormatDriver):
        name = "parallels"

    @imago.hookimpl
    def imago_register_format_driver(register):
        register(Parallels)
"""


def test_misspelled_hook_through_an_entry_point(tmp_path: Path, run_python: RunPython) -> None:
    write_distribution(
        tmp_path,
        "imago-parallels-example",
        "0.1",
        {"parallels-example": "imago_parallels_example"},
        {"imago_parallels_example": MISSPELLED_HOOK_SOURCE},
        {"imago.format_drivers": {"parallels": "imago_parallels_example:Parallels"}},
    )
    report = run_script(
        run_python,
        """
        import json
        import imago

        info = {info.name: info for info in imago.plugins()}["parallels-example"]
        try:
            imago.format_driver("parallels")
        except imago.DriverNotFoundError as error:
            lookup = {
                "distribution": error.distribution,
                "message": str(error),
                "cause_is_load_error": error.__cause__ is info.error,
            }
        print(json.dumps({
            "reason": info.error.reason,
            "cause": type(info.error.__cause__).__name__,
            "format_drivers": list(info.format_drivers),
            "lookup": lookup,
            "raw": imago.format_driver("raw").__name__,
        }))
        """,
        [tmp_path],
    )
    assert report["cause"] == "PluginValidationError"
    assert "unknown hook 'imago_register_format_driver'" in report["reason"]
    assert report["format_drivers"] == []
    assert report["lookup"]["distribution"] == "imago-parallels-example"
    assert report["lookup"]["cause_is_load_error"] is True
    assert "unknown hook 'imago_register_format_driver'" in report["lookup"]["message"]
    assert report["raw"] == "Raw"

    listed = run_python(["-m", "imago.cli", "plugins"], pythonpath=[tmp_path])
    assert listed.returncode == 1
    lines = listed.stdout.splitlines()
    error_line = lines[lines.index("parallels-example (imago-parallels-example 0.1)") + 1].strip()
    assert error_line.startswith("ERROR: PluginValidationError: unknown hook 'imago_register_format_driver'")
    assert "did you mean 'imago_register_format_drivers'?" in error_line

    as_json = run_python(["-m", "imago.cli", "plugins", "--output", "json"], pythonpath=[tmp_path])
    assert as_json.returncode == 1
    entries = {entry["name"]: entry for entry in json.loads(as_json.stdout)}
    assert "unknown hook 'imago_register_format_driver'" in entries["parallels-example"]["error"]
    assert entries["raw"]["error"] is None


# --- the registrars --------------------------------------------------------------------------


def test_hooks_receive_typed_registrars(register_plugin: Callable[[str, object], None]) -> None:
    received: dict[str, object] = {}

    @imago.hookimpl
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        received["storage"] = register
        register.register(storage_class("typed-storage"))

    @imago.hookimpl
    def imago_register_format_drivers(register: imago.FormatRegistrar) -> None:
        received["format"] = register
        register.register(format_class("typed-format"))

    @imago.hookimpl
    def imago_register_cli_commands(register: imago.CliRegistrar) -> None:
        received["cli"] = register
        register.command(name="typed", help="typed", configure=lambda parser: None, run=lambda args: 0)

    register_plugin(
        "typed",
        types.SimpleNamespace(
            imago_register_storage_drivers=imago_register_storage_drivers,
            imago_register_format_drivers=imago_register_format_drivers,
            imago_register_cli_commands=imago_register_cli_commands,
        ),
    )
    info = plugin_info("typed")
    assert info.error is None
    assert (info.storage_drivers, info.format_drivers, info.cli_commands) == (
        ("typed-storage",),
        ("typed-format",),
        ("typed",),
    )
    assert isinstance(received["storage"], imago.StorageRegistrar)
    assert isinstance(received["format"], imago.FormatRegistrar)
    assert isinstance(received["cli"], imago.CliRegistrar)
    for registrar in received.values():
        assert registrar.plugin == "typed"  # type: ignore[attr-defined]
        assert registrar.closed  # type: ignore[attr-defined]
        assert "closed" in repr(registrar)
    assert list(received["storage"].registered) == ["typed-storage"]  # type: ignore[attr-defined]


def test_registering_after_the_hook_returned_is_refused(register_plugin: Callable[[str, object], None]) -> None:
    kept: list[imago.StorageRegistrar] = []

    @imago.hookimpl
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        kept.append(register)
        register(storage_class("early"))

    register_plugin("late", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    assert imago.storage_driver("early").name == "early"
    with pytest.raises(imago.PluginError, match="after its hook returned"):
        kept[0](storage_class("late"))
    with pytest.raises(imago.PluginError, match="after its hook returned"):
        kept[0].register(storage_class("later"))
    assert kept[0].registered.keys() == {"early"}
    with pytest.raises(imago.DriverNotFoundError):
        imago.storage_driver("late")
    assert plugin_info("late").storage_drivers == ("early",)


def test_cli_registrar_refuses_commands_after_the_hook_returned(register_plugin: Callable[[str, object], None]) -> None:
    kept: list[imago.CliRegistrar] = []

    @imago.hookimpl
    def imago_register_cli_commands(register: imago.CliRegistrar) -> None:
        kept.append(register)

    register_plugin("sneaky", types.SimpleNamespace(imago_register_cli_commands=imago_register_cli_commands))
    assert plugin_info("sneaky").error is None
    with pytest.raises(imago.PluginError, match="after its hook returned"):
        kept[0].command(name="sneaky", help="", configure=print, run=print)
    assert "sneaky" not in imago.plugin.manager.cli_commands()


def test_swallowed_registration_error_still_fails_the_plugin(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        register(storage_class("kept"))
        with contextlib.suppress(imago.InvalidDriverError):  # hiding the mistake must not help
            register(storage_class(""))

    register_plugin("hider", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    info = plugin_info("hider")
    assert isinstance(info.error, imago.PluginLoadError)
    assert isinstance(info.error.__cause__, imago.InvalidDriverError)
    assert "has no name" in info.error.reason
    assert info.storage_drivers == ()
    with pytest.raises(imago.DriverNotFoundError):
        imago.storage_driver("kept")


def test_swallowed_duplicate_is_still_reported(register_plugin: Callable[[str, object], None]) -> None:
    @imago.hookimpl
    def imago_register_storage_drivers(register: imago.StorageRegistrar) -> None:
        with contextlib.suppress(imago.DuplicateDriverError):
            register(storage_class("null"))

    register_plugin("hides-dup", types.SimpleNamespace(imago_register_storage_drivers=imago_register_storage_drivers))
    assert isinstance(plugin_info("hides-dup").error, imago.PluginLoadError)
    with pytest.raises(imago.DuplicateDriverError) as caught:
        imago.storage_driver("null")
    assert caught.value.plugins == ("null", "hides-dup")


@pytest.mark.parametrize(
    "registrar_class", [imago.StorageRegistrar, imago.FormatRegistrar, imago.CliRegistrar], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("plugin", ["", None, 3])
def test_registrar_needs_a_plugin_name(registrar_class: type[Any], plugin: Any) -> None:
    with pytest.raises(TypeError, match="plugin's name"):
        registrar_class(plugin)


def test_registrar_used_directly() -> None:
    registrar = imago.StorageRegistrar("direct", taken={"file": "file"})
    cls = storage_class("direct")
    registrar(cls)
    assert registrar.registered == {"direct": cls}
    registrar.registered.clear()  # a copy: the registrar's own table is unchanged
    assert registrar.registered == {"direct": cls}
    with pytest.raises(imago.DuplicateDriverError) as caught:
        registrar.register(storage_class("file"))
    assert caught.value.plugins == ("file", "direct")
    assert registrar.error is caught.value
    assert not registrar.closed
    registrar.close()
    assert registrar.closed
    with pytest.raises(imago.PluginError):
        registrar(storage_class("after"))
    assert registrar.error is caught.value  # the first error stays the one reported


@pytest.mark.parametrize("obj", [storage_class("s"), "raw", None, 42, imago.Capability.RESIZE])
def test_format_registrar_rejects_non_format_drivers(obj: Any) -> None:
    with pytest.raises(imago.InvalidDriverError, match="must be a subclass of FormatDriver"):
        imago.FormatRegistrar("p").register(obj)


# --- capabilities are checked at registration ------------------------------------------------


async def _resize(self: Any, new_size: int, prealloc: Any = None) -> None:
    pass


async def _check(self: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("capabilities", "methods", "message"),
    [
        pytest.param(
            frozenset({imago.Capability.RESIZE}),
            {},
            "claims the capability 'resize' but does not implement resize",
            id="resize-missing",
        ),
        pytest.param(
            frozenset({imago.Capability.SNAPSHOTS}),
            {"create_snapshot": _check, "snapshots": ()},
            "claims the capability 'snapshots' but does not implement apply_snapshot, delete_snapshot, read_snapshot",
            id="snapshots-partly",
        ),
        pytest.param(
            frozenset({imago.Capability.COMPRESSED_WRITES}),
            {"cluster_size": 65536},
            "claims the capability 'compressed-writes' but does not implement write_compressed",
            id="compressed-without-writer",
        ),
        pytest.param(
            frozenset({"resize"}), {"resize": _resize}, "'resize' in capabilities is not a Capability", id="str"
        ),
        pytest.param(imago.Capability.RESIZE, {"resize": _resize}, "capabilities must be a frozenset", id="not-a-set"),
        pytest.param("resize", {"resize": _resize}, "capabilities must be a frozenset", id="a-string"),
    ],
)
def test_format_driver_must_implement_its_capabilities(
    register_plugin: Callable[[str, object], None], capabilities: Any, methods: dict[str, Any], message: str
) -> None:
    cls = type("Claims", (imago.FormatDriver,), {"name": "claims", "capabilities": capabilities, **methods})
    register_plugin("claims", make_plugin(formats=[cls]))
    info = plugin_info("claims")
    assert isinstance(info.error, imago.PluginLoadError)
    assert isinstance(info.error.__cause__, imago.InvalidDriverError)
    assert message in str(info.error.__cause__)
    assert info.format_drivers == ()
    with pytest.raises(imago.DriverNotFoundError):
        imago.format_driver("claims")


def test_format_driver_implementing_its_capabilities_registers(register_plugin: Callable[[str, object], None]) -> None:
    capabilities = frozenset({imago.Capability.RESIZE, imago.Capability.CHECK})
    cls = type(
        "Able",
        (imago.FormatDriver,),
        {"name": "able", "capabilities": capabilities, "resize": _resize, "check": _check},
    )
    register_plugin("able", make_plugin(formats=[cls]))
    assert plugin_info("able").error is None
    assert imago.format_driver("able").supports(imago.Capability.RESIZE)


# --- which distribution a missing driver names -----------------------------------------------


@pytest.mark.parametrize(
    ("lookup", "asked", "installed", "distribution"),
    [
        (imago.format_driver, "QCOW2", "qcow2", "imago-qcow2"),
        (imago.format_driver, "Raw", "raw", "imago-raw"),
        (imago.storage_driver, "FILE", "file", "imago-file"),
        (imago.storage_driver, "nUlL", "null", "imago-null"),
    ],
)
def test_name_differing_only_in_case(
    lookup: Callable[[str], type], asked: str, installed: str, distribution: str
) -> None:
    with pytest.raises(imago.DriverNotFoundError) as caught:
        lookup(asked)
    error = caught.value
    assert (error.name, error.suggestion, error.distribution) == (asked, installed, distribution)
    assert f"did you mean {installed!r}?" in str(error)
    assert f"'{distribution}'" in str(error)
    assert f"imago-{asked}" not in str(error)


def test_unknown_upper_case_name_follows_the_lower_case_convention() -> None:
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.format_driver("QED")
    assert caught.value.distribution == "imago-qed"
    assert caught.value.suggestion is None
    assert "install the distribution 'imago-qed'" in str(caught.value)


def test_case_hint_for_an_in_process_plugin(register_plugin: Callable[[str, object], None]) -> None:
    register_plugin("mixed", make_plugin(storage=[storage_class("MiXed")]))
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("mixed")
    # No distribution to name: the convention, lower-cased, for the driver that exists.
    assert (caught.value.suggestion, caught.value.distribution) == ("MiXed", "imago-mixed")


def test_case_hint_for_a_declared_driver_of_a_broken_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    write_distribution(
        tmp_path,
        "imago-vendor-formats",
        "3.0",
        {"vendor": "imago_vendor_formats"},
        {"imago_vendor_formats": IMPORT_FAILS_SOURCE},
        {
            "imago.format_drivers": {
                "parallels": "imago_vendor_formats:Parallels",
                "cloop": "imago_vendor_formats:Cloop",
            }
        },
    )
    monkeypatch.syspath_prepend(tmp_path)
    vendor = plugin_info("vendor")
    assert vendor.error is not None

    with pytest.raises(imago.DriverNotFoundError) as exact:
        imago.format_driver("cloop")
    assert exact.value.distribution == "imago-vendor-formats"
    assert exact.value.__cause__ is vendor.error
    assert "this plugin cannot be imported" in str(exact.value)

    with pytest.raises(imago.DriverNotFoundError) as folded:
        imago.format_driver("PARALLELS")
    assert (folded.value.suggestion, folded.value.distribution) == ("parallels", "imago-vendor-formats")
    assert folded.value.__cause__ is vendor.error

    # Declarations are per kind: no storage driver "parallels" is declared.
    with pytest.raises(imago.DriverNotFoundError) as other_kind:
        imago.storage_driver("parallels")
    assert other_kind.value.distribution == "imago-parallels"


def test_declared_driver_a_healthy_plugin_does_not_register(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    write_distribution(
        tmp_path,
        "imago-promises",
        "1.0",
        {"promises": "imago_promises"},
        {"imago_promises": STORAGE_PLUGIN_SOURCE.format(cls="S3", driver="s3")},
        {"imago.storage_drivers": {"s3": "imago_promises:S3", "gcs": "imago_promises:Gcs"}},
    )
    monkeypatch.syspath_prepend(tmp_path)
    assert imago.storage_driver("s3").__name__ == "S3"
    with pytest.raises(imago.DriverNotFoundError) as caught:
        imago.storage_driver("gcs")
    assert caught.value.distribution == "imago-promises"
    assert "declares it, but its plugin 'promises' did not register it" in str(caught.value)
    assert caught.value.__cause__ is None
