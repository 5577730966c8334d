"""The plugin manager: entry-point loading and the driver registry.

Loading is lazy (first look-up) and idempotent. Each plugin is loaded and asked to register
on its own, so one broken plugin records an error and leaves the others working; its
error is raised (chained) when one of its drivers is asked for.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import importlib_metadata
import pluggy

from ..errors import DriverNotFoundError, DuplicateDriverError, InvalidDriverError, PluginLoadError
from ..format.driver import FormatDriver
from ..storage import Storage
from . import hookspecs

__all__ = [
    "CliCommand",
    "PluginInfo",
    "cli_commands",
    "format_driver",
    "format_drivers",
    "plugins",
    "register_plugin",
    "reset",
    "storage_driver",
    "storage_drivers",
    "unregister_plugin",
]

T = TypeVar("T")

# Where the in-repo drivers come from, so a missing one names what to install.
_KNOWN_DISTRIBUTIONS = {"file": "imago-file", "null": "imago-null", "raw": "imago-raw", "qcow2": "imago-qcow2"}

# Subcommands the core's CLI defines itself (``imago.cli``); a plugin may not take their names.
_CORE_CLI_COMMANDS = frozenset({"plugins"})


@attrs.frozen(kw_only=True)
class PluginInfo:
    """What ``imago plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    storage_drivers: tuple[str, ...] = ()
    format_drivers: tuple[str, ...] = ()
    cli_commands: tuple[str, ...] = ()
    error: PluginLoadError | None = None


@attrs.frozen(kw_only=True)
class CliCommand:
    """A subcommand registered through ``imago_register_cli_commands``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    plugin: str


@attrs.define
class _Registry:
    storage: dict[str, tuple[type[Storage], str]] = attrs.Factory(dict)
    format: dict[str, tuple[type[FormatDriver], str]] = attrs.Factory(dict)
    cli: dict[str, CliCommand] = attrs.Factory(dict)
    # A driver name claimed twice: the error to raise when it is looked up.
    duplicates: dict[tuple[str, str], DuplicateDriverError] = attrs.Factory(dict)
    plugins: dict[str, PluginInfo] = attrs.Factory(dict)


class _Manager:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._registry: _Registry | None = None
        self._extra: list[tuple[str, object]] = []

    def registry(self) -> _Registry:
        registry = self._registry
        if registry is None:
            with self._lock:
                if self._registry is None:
                    self._registry = self._load()
                registry = self._registry
        return registry

    def reset(self) -> None:
        with self._lock:
            self._registry = None

    def add(self, name: str, plugin: object) -> None:
        with self._lock:
            self._extra.append((name, plugin))
            self._registry = None

    def remove(self, name: str) -> None:
        with self._lock:
            self._extra = [(n, p) for n, p in self._extra if n != name]
            self._registry = None

    def _load(self) -> _Registry:
        registry = _Registry()
        sources: list[tuple[str, str | None, str | None, Callable[[], object]]] = []
        for entry_point in importlib_metadata.entry_points(group=hookspecs.PROJECT_NAME):
            dist = entry_point.dist
            sources.append(
                (
                    entry_point.name,
                    dist.metadata["Name"] if dist is not None else None,
                    dist.version if dist is not None else None,
                    entry_point.load,
                )
            )
        for name, plugin in self._extra:
            sources.append((name, None, None, _constant(plugin)))
        for name, distribution, version, load in sources:
            label, copy = name, 1
            while label in registry.plugins:  # the same entry-point name from several sources
                copy += 1
                label = f"{name}@{distribution}" if copy == 2 and distribution else f"{name}#{copy}"
            registry.plugins[label] = self._load_one(registry, label, distribution, version, load)
        return registry

    def _load_one(
        self,
        registry: _Registry,
        name: str,
        distribution: str | None,
        version: str | None,
        load: Callable[[], object],
    ) -> PluginInfo:
        found: dict[str, list[str]] = {"storage": [], "format": [], "cli": []}
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        staged = _Registry()

        def register_class(kind: str, base: type[Any], table: dict[str, Any]) -> Callable[[Any], None]:
            def register(cls: Any) -> None:
                if not isinstance(cls, type) or not issubclass(cls, base):
                    raise InvalidDriverError(f"{kind} driver must be a subclass of {base.__name__}, got {cls!r}")
                driver_name = getattr(cls, "name", "")
                if not isinstance(driver_name, str) or not driver_name:
                    raise InvalidDriverError(f"{kind} driver {cls.__qualname__} has no name")
                if driver_name in table or driver_name in found[kind]:
                    previous = table[driver_name][1] if driver_name in table else name
                    raise DuplicateDriverError(kind, driver_name, previous, name)
                found[kind].append(driver_name)
                getattr(staged, kind)[driver_name] = (cls, name)

            return register

        plugin_name = name

        def register_cli(name: str, help: str, configure: Any, run: Any) -> None:
            if not isinstance(name, str) or not name:
                raise InvalidDriverError(f"CLI command must have a non-empty name, got {name!r}")
            if name in _CORE_CLI_COMMANDS:
                raise DuplicateDriverError("CLI command", name, "imago-core", plugin_name)
            if name in registry.cli or name in found["cli"]:
                previous = registry.cli[name].plugin if name in registry.cli else plugin_name
                raise DuplicateDriverError("CLI command", name, previous, plugin_name)
            found["cli"].append(name)
            staged.cli[name] = CliCommand(name=name, help=help, configure=configure, run=run, plugin=plugin_name)

        error: PluginLoadError | None = None
        try:
            module = load()
            pm.register(module, name=name)
            hooks = pm.hook
            _call_each(hooks.imago_register_storage_drivers, register_class("storage", Storage, registry.storage))
            _call_each(hooks.imago_register_format_drivers, register_class("format", FormatDriver, registry.format))
            _call_each(hooks.imago_register_cli_commands, register_cli)
        except DuplicateDriverError as duplicate:
            registry.duplicates[(duplicate.kind, duplicate.name)] = duplicate
            error = PluginLoadError(name, distribution, str(duplicate))
            error.__cause__ = duplicate
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() on import is broken too
            error = PluginLoadError(name, distribution, f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if error is None:
            registry.storage.update(staged.storage)
            registry.format.update(staged.format)
            registry.cli.update(staged.cli)
        return PluginInfo(
            name=name,
            distribution=distribution,
            version=version,
            storage_drivers=tuple(found["storage"]) if error is None else (),
            format_drivers=tuple(found["format"]) if error is None else (),
            cli_commands=tuple(found["cli"]) if error is None else (),
            error=error,
        )


def _constant(value: object) -> Callable[[], object]:
    return lambda: value


def _call_each(hook: pluggy.HookCaller, register: Callable[..., None]) -> None:
    # Called implementation by implementation (not through pluggy's multi-call) so that the
    # first error propagates with its own traceback; each gets only the arguments it declares.
    for impl in hook.get_hookimpls():
        impl.function(*[{"register": register}[arg] for arg in impl.argnames])


_manager = _Manager()


def _lookup(kind: str, name: str, table: dict[str, tuple[T, str]]) -> T:
    registry = _manager.registry()
    duplicate = registry.duplicates.get((kind, name))
    if duplicate is not None:
        raise duplicate
    entry = table.get(name)
    if entry is not None:
        return entry[0]
    distribution = _KNOWN_DISTRIBUTIONS.get(name, f"imago-{name}")
    broken = [info.error for info in registry.plugins.values() if info.error is not None]
    same_name = [e for e in broken if e.plugin == name or e.distribution == distribution]
    if same_name:
        raise DriverNotFoundError(kind, name, distribution, str(same_name[0])) from same_name[0]
    detail = ""
    if broken:
        detail = "plugins that failed to load: " + ", ".join(e.plugin for e in broken)
    raise DriverNotFoundError(kind, name, distribution, detail) from (broken[0] if broken else None)


def storage_driver(name: str) -> type[Storage]:
    """The storage driver class registered as *name* (``file``, ``null``, ...)."""
    return _lookup("storage", name, _manager.registry().storage)


def format_driver(name: str) -> type[FormatDriver]:
    """The format driver class registered as *name* (``raw``, ``qcow2``, ...)."""
    return _lookup("format", name, _manager.registry().format)


def storage_drivers() -> dict[str, type[Storage]]:
    """All registered storage drivers by name."""
    return {name: cls for name, (cls, _) in _manager.registry().storage.items()}


def format_drivers() -> dict[str, type[FormatDriver]]:
    """All registered format drivers by name."""
    return {name: cls for name, (cls, _) in _manager.registry().format.items()}


def cli_commands() -> dict[str, CliCommand]:
    """All CLI subcommands registered by plugins."""
    return dict(_manager.registry().cli)


def plugins() -> list[PluginInfo]:
    """Every plugin found, with its drivers or its load error."""
    return list(_manager.registry().plugins.values())


def register_plugin(name: str, plugin: object) -> None:
    """Add a plugin object by hand (besides those found through entry points).

    Meant for tests and embedding; the registry is rebuilt on the next look-up.
    """
    _manager.add(name, plugin)


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin`."""
    _manager.remove(name)


def reset() -> None:
    """Forget everything loaded; the next look-up scans the entry points again."""
    _manager.reset()
