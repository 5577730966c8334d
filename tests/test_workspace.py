"""The workspace: every in-repo distribution is installed, tested, linted and type-checked.

The distributions are the directories (``core`` and every ``plugins/*`` with a
``pyproject.toml``); each place that needs them (Makefile, the root's dependencies, pytest,
ruff, mypy) finds them by a glob. These tests fail when a place stops covering one of them.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import subprocess
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

import imago

ROOT = Path(__file__).resolve().parent.parent


def load_hatch_build() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("hatch_build", ROOT / "hatch_build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HATCH_BUILD = load_hatch_build()
DIRECTORIES: list[Path] = HATCH_BUILD.distribution_directories(ROOT)
IDS = [str(directory.relative_to(ROOT)) for directory in DIRECTORIES]


def project(directory: Path) -> dict[str, Any]:
    with (directory / "pyproject.toml").open("rb") as file:
        table: dict[str, Any] = tomllib.load(file)["project"]
        return table


def import_packages(directory: Path) -> list[Path]:
    return sorted(path.parent for path in (directory / "src").glob("*/__init__.py"))


def root_config() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def test_the_directories_are_the_list() -> None:
    expected = [ROOT / "core", *sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))]
    assert expected == DIRECTORIES
    assert {"core", "plugins/file", "plugins/null", "plugins/raw", "plugins/qcow2"} <= set(IDS)
    names = [project(directory)["name"] for directory in DIRECTORIES]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("directory", DIRECTORIES, ids=IDS)
def test_distribution_is_installed_from_its_directory(directory: Path) -> None:
    meta = project(directory)
    dist = importlib.metadata.distribution(meta["name"])
    assert dist.version == meta["version"]
    direct_url = dist.read_text("direct_url.json")
    assert direct_url is not None, f"{meta['name']} is not installed from the tree (run make setup)"
    assert json.loads(direct_url)["url"] == directory.as_uri()
    for package in import_packages(directory):
        spec = importlib.util.find_spec(package.name)
        assert spec is not None
        assert spec.origin is not None
        assert Path(spec.origin).resolve().is_relative_to(package), f"{package.name} is imported from elsewhere"


def test_root_depends_on_every_distribution() -> None:
    assert "dependencies" in root_config()["project"]["dynamic"]
    generated = HATCH_BUILD.workspace_dependencies(ROOT)
    assert generated == [f"{project(d)['name']} @ {d.as_uri()}" for d in DIRECTORIES]
    installed = importlib.metadata.requires("imago-workspace") or []
    installed_names = {re.split(r"[ @;<>=!~\[]", requirement, maxsplit=1)[0] for requirement in installed}
    missing = {project(d)["name"] for d in DIRECTORIES} - installed_names
    assert not missing, f"the installed imago-workspace lacks {missing} (run make setup)"


def test_makefile_lists_every_distribution() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run([make, "-s", "--no-print-directory", "dists"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == IDS


@pytest.mark.parametrize("directory", DIRECTORIES, ids=IDS)
def test_pytest_collects_the_tests(directory: Path, pytestconfig: pytest.Config) -> None:
    # pytest expands each testpaths entry with glob.iglob relative to the root directory.
    testpaths = pytestconfig.getini("testpaths")
    covered = {
        (pytestconfig.rootpath / match).resolve()
        for pattern in testpaths
        for match in glob.glob(pattern, root_dir=pytestconfig.rootpath, recursive=True)
    }
    assert (directory / "tests").is_dir(), f"{directory} has no tests"
    assert directory / "tests" in covered


def test_ruff_knows_every_source_tree(venv_bin: Path) -> None:
    result = subprocess.run(
        [str(venv_bin / "ruff"), "check", "--show-settings", "hatch_build.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"^linter\.src = \[\n(.*?)^\]", result.stdout, re.MULTILINE | re.DOTALL)
    assert match is not None, result.stdout
    sources = {Path(line.strip().strip(",").strip('"')) for line in match.group(1).splitlines()}
    for directory in DIRECTORIES:
        assert directory / "src" in sources


def test_mypy_checks_every_import_package(monkeypatch: pytest.MonkeyPatch) -> None:
    mypy_options = pytest.importorskip("mypy.options")
    config_parser = pytest.importorskip("mypy.config_parser")
    monkeypatch.chdir(ROOT)  # mypy runs from the root and expands its globs there
    options = mypy_options.Options()
    strict: list[bool] = []
    config_parser.parse_config_file(
        options, lambda: strict.append(True), "pyproject.toml", stdout=io.StringIO(), stderr=io.StringIO()
    )
    assert strict == [True]
    checked = {(ROOT / path).resolve() for path in options.files}
    for directory in DIRECTORIES:
        packages = import_packages(directory)
        assert packages, f"{directory} has no import package under src/"
        for package in packages:
            assert package in checked, f"mypy does not check {package}"
            assert (package / "py.typed").is_file()
    assert ROOT / "hatch_build.py" in checked


@pytest.mark.parametrize("directory", [d for d in DIRECTORIES if d.name != "core"], ids=IDS[1:])
def test_plugin_declares_what_it_registers(directory: Path) -> None:
    dist = importlib.metadata.distribution(project(directory)["name"])
    plugins = [ep.name for ep in dist.entry_points.select(group="imago")]
    declares = [ep for kind in ("storage", "format") for ep in dist.entry_points.select(group=f"imago.{kind}_drivers")]
    # A distribution declaring drivers registers them through the group imago; one without drivers
    # yet (imago-nbd holds only its protocol codec so far) has no plugin to load either.
    assert bool(plugins) == bool(declares), f"{dist.name}: entry points in imago {plugins}, drivers declared {declares}"
    infos = [info for info in imago.plugins() if info.distribution == dist.name]
    assert [info.name for info in infos] == plugins
    for info in infos:
        assert info.error is None, str(info.error)
    for kind, registered in (
        ("storage", imago.storage_drivers()),
        ("format", imago.format_drivers()),
    ):
        declared = {ep.name: ep for ep in dist.entry_points.select(group=f"imago.{kind}_drivers")}
        provided = {name for info in infos for name in getattr(info, f"{kind}_drivers")}
        assert set(declared) == provided
        for name, entry_point in declared.items():
            assert entry_point.load() is registered[name]


def write_project(directory: Path, name: object) -> None:
    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(f"[project]\nname = {json.dumps(name)}\nversion = '1'\n")


def test_hook_lists_core_and_plugin_directories(tmp_path: Path) -> None:
    write_project(tmp_path / "core", "imago-core")
    write_project(tmp_path / "plugins" / "zeta", "imago-zeta")
    write_project(tmp_path / "plugins" / "alpha", "imago-alpha-formats")
    (tmp_path / "plugins" / "notes").mkdir()  # no pyproject.toml: not a distribution
    (tmp_path / "plugins" / "README.md").write_text("plugins live here\n")
    assert HATCH_BUILD.workspace_dependencies(tmp_path) == [
        f"imago-core @ {(tmp_path / 'core').as_uri()}",
        f"imago-alpha-formats @ {(tmp_path / 'plugins' / 'alpha').as_uri()}",
        f"imago-zeta @ {(tmp_path / 'plugins' / 'zeta').as_uri()}",
    ]
    metadata: dict[str, Any] = {"name": "imago-workspace"}
    HATCH_BUILD.WorkspaceDependencies(str(tmp_path), {}).update(metadata)
    assert metadata["dependencies"] == HATCH_BUILD.workspace_dependencies(tmp_path)


def test_hook_rejects_a_broken_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HATCH_BUILD.workspace_dependencies(tmp_path)  # no core/
    write_project(tmp_path / "core", 42)
    with pytest.raises(TypeError, match=r"project\.name must be a string"):
        HATCH_BUILD.workspace_dependencies(tmp_path)
