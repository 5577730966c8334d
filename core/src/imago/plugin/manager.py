"""The plugin manager: entry-point loading and the driver registry.

Loading is lazy (first look-up) and idempotent. Each plugin is loaded and asked to register
on its own, with its own :class:`pluggy.PluginManager`, so one broken plugin records an error
and leaves the others working; its error is raised (chained) when one of its drivers is asked
for. A plugin is broken when it cannot be imported, when a hook raises or registers something
invalid, and when it implements a hook imago does not specify (loading ends with pluggy's
``check_pending()``).

When a driver is missing, the error names the distribution to install. That name comes from
the plugins' own metadata, never from a table in the core: a distribution that declares the
driver (entry-point groups ``imago.storage_drivers`` / ``imago.format_drivers``), the
distribution of the installed driver whose name differs only in case, or else the
convention ``imago-<name>``.

The installed distributions' entry points are read from their metadata directories directly,
without :mod:`importlib_metadata` (whose import costs more than a command line tool may spend on
starting), whenever every place distributions can come from is a plain directory; otherwise
(zip files on :data:`sys.path`, eggs, finders of other distributions) through
:mod:`importlib_metadata`. Looking a driver up by name does not load every plugin: only the
plugins of the distributions that declare the driver are loaded. Anything else (listing drivers
or plugins, a driver nobody declares, a declared plugin that fails or clashes, plugins
registered in-process) loads every plugin; a plugin loaded for a single driver is then loaded
again with the others.
"""

from __future__ import annotations

import _thread  # threading's lock, without importing threading (start-up time)
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from .._record import Record, init
from ..errors import DriverNotFoundError, DuplicateDriverError, PluginLoadError
from ..format.driver import FormatDriver
from ..storage import Storage
from . import hookspecs
from .registrars import CORE_DISTRIBUTION, CliCommand, CliRegistrar, FormatRegistrar, StorageRegistrar

if TYPE_CHECKING:
    import importlib_metadata
else:

    def __getattr__(name: str) -> Any:
        # importlib_metadata takes tens of milliseconds to import: it is imported only when every
        # plugin is loaded (and is then available as this module's attribute, as it was before).
        if name == "importlib_metadata":
            return importlib.import_module(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "storage_driver_for_uri",
    "storage_drivers",
    "unregister_plugin",
]

T = TypeVar("T")


# Driver kind -> the entry-point group in which distributions declare drivers of that kind.
_DECLARATION_GROUPS = {"storage": hookspecs.STORAGE_DRIVERS_GROUP, "format": hookspecs.FORMAT_DRIVERS_GROUP}

# The hooks imago specifies, for "did you mean" hints and the unmarked-hook check.
_HOOK_NAMES = tuple(
    sorted(name for name, value in vars(hookspecs).items() if hasattr(value, f"{hookspecs.PROJECT_NAME}_spec"))
)


class PluginInfo(Record, kw_only=True):
    """What ``imago plugins`` shows about one plugin."""

    __slots__ = ("cli_commands", "distribution", "error", "format_drivers", "name", "storage_drivers", "version")

    name: str
    distribution: str | None
    version: str | None
    storage_drivers: tuple[str, ...]
    format_drivers: tuple[str, ...]
    cli_commands: tuple[str, ...]
    error: PluginLoadError | None

    def __init__(
        self,
        *,
        name: str,
        distribution: str | None,
        version: str | None,
        storage_drivers: tuple[str, ...] = (),
        format_drivers: tuple[str, ...] = (),
        cli_commands: tuple[str, ...] = (),
        error: PluginLoadError | None = None,
    ) -> None:
        init(self, "name", name)
        init(self, "distribution", distribution)
        init(self, "version", version)
        init(self, "storage_drivers", storage_drivers)
        init(self, "format_drivers", format_drivers)
        init(self, "cli_commands", cli_commands)
        init(self, "error", error)


class _Source:
    """A plugin to load: its label, where it comes from, and what its distribution declares."""

    __slots__ = ("declared", "distribution", "load", "name", "version")

    def __init__(
        self,
        *,
        name: str,
        distribution: str | None,
        version: str | None,
        load: Callable[[], object],
        declared: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.name = name
        self.distribution = distribution
        self.version = version
        self.load = load
        # Driver kind -> names the distribution declares in its metadata.
        self.declared: Mapping[str, tuple[str, ...]] = {} if declared is None else declared


class _Registry:
    __slots__ = ("cli", "declared", "duplicates", "format", "plugins", "storage")

    def __init__(self) -> None:
        self.storage: dict[str, tuple[type[Storage], str]] = {}
        self.format: dict[str, tuple[type[FormatDriver], str]] = {}
        self.cli: dict[str, CliCommand] = {}
        # A driver name claimed twice: the error to raise when it is looked up.
        self.duplicates: dict[tuple[str, str], DuplicateDriverError] = {}
        self.plugins: dict[str, PluginInfo] = {}
        # (kind, driver name) -> labels of the plugins whose distribution declares it.
        self.declared: dict[tuple[str, str], list[str]] = {}


class _Manager:
    def __init__(self) -> None:
        self._lock = _thread.RLock()
        self._registry: _Registry | None = None
        self._extra: list[tuple[str, object]] = []
        # Drivers of the plugins loaded one by one, for the distributions declaring them.
        self._partial = _Registry()
        self._declarations: dict[tuple[str, str], list[_Source]] | None = None
        self._loaded: set[int] = set()  # ids of the declaration sources in self._partial

    def registry(self) -> _Registry:
        registry = self._registry
        if registry is None:
            with self._lock:
                if self._registry is None:
                    self._registry = self._load()
                registry = self._registry
        return registry

    def declared(self, kind: str, name: str) -> type[Any] | None:
        """The driver *name* from the plugins of the distributions declaring it; ``None`` if that does not settle it.

        ``None`` (look in the full registry) when everything is loaded already, when plugins were
        registered in-process, when nobody declares the driver, and when a declaring plugin
        failed, clashed with another or did not register it: the full load reports all of that.
        """
        if self._registry is not None:
            return None
        with self._lock:
            if self._registry is not None or self._extra:
                return None
            if self._declarations is None:
                readable = _read_sources()
                self._declarations = {} if readable is None else _scan_declarations(readable)
            sources = self._declarations.get((kind, name), ())
            partial = self._partial
            for source in sources:
                if id(source) not in self._loaded:
                    self._loaded.add(id(source))
                    _add_plugin(partial, source)
            if not sources or partial.duplicates or any(info.error for info in partial.plugins.values()):
                return None
            entry = (partial.storage if kind == "storage" else partial.format).get(name)
            return None if entry is None else entry[0]

    def reset(self) -> None:
        with self._lock:
            self._registry = None
            self._partial = _Registry()
            self._declarations = None
            self._loaded = set()

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
        sources = _entry_points()
        sources += [_Source(name=name, distribution=None, version=None, load=_constant(p)) for name, p in self._extra]
        for source in sources:
            _add_plugin(registry, source)
        return registry


def _add_plugin(registry: _Registry, source: _Source) -> None:
    """Load the plugin *source* into *registry*, under a label no other plugin there has."""
    label, copy = source.name, 1
    while label in registry.plugins:  # the same entry-point name from several sources
        copy += 1
        distribution = source.distribution
        label = f"{source.name}@{distribution}" if copy == 2 and distribution else f"{source.name}#{copy}"
    for kind, names in source.declared.items():
        for name in names:
            registry.declared.setdefault((kind, name), []).append(label)
    registry.plugins[label] = _load_one(registry, label, source)


# --- the entry points, read without importlib_metadata ------------------------------------------

_METADATA_SUFFIXES = (".dist-info", ".egg-info")
_SECTION = re.compile(r"\[\s*([^\]]+?)\s*\]")
# ``module``, ``module:attr.attr``, optionally followed by ``[extras]``.
_TARGET = re.compile(r"([\w.]+)\s*(?::\s*([\w.]+))?\s*(?:\[.*\])?")


def _scan_declarations(sources: Iterable[_Source]) -> dict[tuple[str, str], list[_Source]]:
    """(kind, driver name) -> the plugins of the distributions that declare the driver."""
    found: dict[tuple[str, str], list[_Source]] = {}
    for source in sources:
        for kind, names in source.declared.items():
            for driver in names:
                found.setdefault((kind, driver), []).append(source)
    return found


def _entry_points() -> list[_Source]:
    """Every plugin of the group ``imago``, in :data:`sys.path` order.

    Read from the metadata directories directly when :func:`_read_sources` understands every
    place distributions can come from; through :mod:`importlib_metadata` otherwise.
    """
    sources = _read_sources()
    if sources is not None:
        return sources
    import importlib_metadata

    return [_entry_point_source(ep) for ep in importlib_metadata.entry_points(group=hookspecs.PROJECT_NAME)]


def _read_sources() -> list[_Source] | None:
    """The plugins of the distributions on :data:`sys.path`, read without :mod:`importlib_metadata`.

    Reads the ``entry_points.txt`` of each ``.dist-info``/``.egg-info`` directory in the
    :data:`sys.path` directories; the first distribution of a (normalised) name wins, as in
    :mod:`importlib_metadata`, whose import costs more than a command line tool may spend on
    starting. ``None`` when distributions may come from elsewhere: a :data:`sys.path` entry
    that is a file (a zip) or not a string, an ``.egg`` inside a directory, or a finder on
    :data:`sys.meta_path` that knows distributions of its own.
    """
    if not _standard_finders():
        return None
    sources: list[_Source] = []
    seen: set[str] = set()
    for entry in sys.path:
        directory = _metadata_directories(entry)
        if directory is None:
            return None
        for path, distribution in directory:
            if distribution in seen:
                continue
            seen.add(distribution)
            groups = _read_entry_points(path)
            plugins = groups.get(hookspecs.PROJECT_NAME)
            if not plugins:
                continue
            declared = {kind: tuple(sorted(groups.get(group, {}))) for kind, group in _DECLARATION_GROUPS.items()}
            name, version = _read_name_and_version(path)
            for plugin, target in plugins.items():
                sources.append(
                    _Source(name=plugin, distribution=name, version=version, load=_loader(target), declared=declared)
                )
    return sources


def _standard_finders() -> bool:
    """Whether only the standard path finders on :data:`sys.meta_path` find distributions."""
    from importlib.machinery import PathFinder

    for finder in sys.meta_path:
        if getattr(finder, "find_distributions", None) is None or finder is PathFinder:
            continue
        module = finder.__module__ if isinstance(finder, type) else type(finder).__module__
        if module != "importlib_metadata":  # its own finder reads the same directories
            return False
    return True


def _metadata_directories(entry: object) -> list[tuple[str, str]] | None:
    """(metadata directory, normalised distribution name) of each distribution in the :data:`sys.path` *entry*.

    Empty for a missing directory; ``None`` for anything else this reader cannot read.
    """
    if not isinstance(entry, str):
        return None
    base = entry or "."
    try:
        with os.scandir(base) as children:
            names = sorted(child.name for child in children)
    except FileNotFoundError:
        return []
    except OSError:  # a zip file, a file, a directory we may not list
        return None if os.path.exists(base) else []
    found = []
    for name in names:
        if name.endswith(".egg"):  # an old-style egg: importlib_metadata looks inside
            return None
        if name.endswith(_METADATA_SUFFIXES):
            distribution = re.sub(r"[-_.]+", "_", name.rpartition(".")[0].partition("-")[0]).lower()
            found.append((os.path.join(base, name), distribution))
    return found


def _read_entry_points(directory: str) -> dict[str, dict[str, str]]:
    """The groups of ``entry_points.txt`` in *directory*: group -> entry-point name -> target."""
    groups: dict[str, dict[str, str]] = {}
    try:
        with open(os.path.join(directory, "entry_points.txt"), encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeError):
        return groups
    group: dict[str, str] | None = None
    for line in lines:
        line = line.strip()
        section = _SECTION.fullmatch(line)
        if section:
            group = groups.setdefault(section.group(1), {})
        elif group is not None and "=" in line and not line.startswith(("#", ";")):
            name, _, target = line.partition("=")
            group.setdefault(name.strip(), target.strip())
    return groups


def _read_name_and_version(directory: str) -> tuple[str | None, str | None]:
    """The ``Name`` and ``Version`` of the distribution whose metadata directory is *directory*."""
    for file_name in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(directory, file_name), encoding="utf-8") as file:
                return _name_and_version(file)
        except (OSError, UnicodeError):
            continue
    return None, None


def _name_and_version(lines: Iterable[str]) -> tuple[str | None, str | None]:
    """The ``Name`` and ``Version`` headers of a metadata file (its first lines, RFC 822 style).

    Read here rather than through :attr:`importlib_metadata.Distribution.metadata`, whose email
    parser costs more to import than a command line tool may spend on starting.
    """
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():  # the end of the headers
            break
        if not line[0].isspace():  # not the continuation of a long header
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    return fields.get("name"), fields.get("version")


def _loader(target: str) -> Callable[[], object]:
    """What loads the entry point *target* (``module:attr``), as ``EntryPoint.load`` would."""

    def load() -> object:
        match = _TARGET.fullmatch(target)
        if match is None:
            raise ValueError(f"entry point {target!r} is not 'module' or 'module:attribute'")
        module, attributes = match.group(1, 2)
        value: object = importlib.import_module(module)
        for attribute in attributes.split(".") if attributes else ():
            value = getattr(value, attribute)
        return value

    return load


def _entry_point_source(entry_point: importlib_metadata.EntryPoint) -> _Source:
    dist = entry_point.dist
    if dist is None:
        return _Source(name=entry_point.name, distribution=None, version=None, load=entry_point.load)
    declared = {
        kind: tuple(sorted({ep.name for ep in dist.entry_points.select(group=group)}))
        for kind, group in _DECLARATION_GROUPS.items()
    }
    name, version = _name_and_version((dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").splitlines())
    if name is None:  # no metadata file this reader understands: importlib_metadata's own reading
        name, version = dist.metadata["Name"], dist.version
    return _Source(name=entry_point.name, distribution=name, version=version, load=entry_point.load, declared=declared)


def _load_one(registry: _Registry, name: str, source: _Source) -> PluginInfo:
    """Load one plugin and run its hooks; what it registers counts only if all of that succeeds."""
    storage = StorageRegistrar(name, taken={n: owner for n, (_, owner) in registry.storage.items()})
    formats = FormatRegistrar(name, taken={n: owner for n, (_, owner) in registry.format.items()})
    taken_commands = {n: command.plugin for n, command in registry.cli.items()}
    cli = CliRegistrar(name, taken=taken_commands)
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    error: PluginLoadError | None = None
    try:
        plugin = source.load()
        pm.register(plugin, name=name)
        _check_hooks(pm, plugin)
        _call_each(pm.hook.imago_register_storage_drivers, storage)
        _call_each(pm.hook.imago_register_format_drivers, formats)
        if pm.hook.imago_register_cli_commands.get_hookimpls():  # the core's names, only when needed
            core_commands = dict.fromkeys(_core_cli_commands(), CORE_DISTRIBUTION)
            cli = CliRegistrar(name, taken=core_commands | taken_commands)
        _call_each(pm.hook.imago_register_cli_commands, cli)
    except DuplicateDriverError as duplicate:
        registry.duplicates[(duplicate.kind, duplicate.name)] = duplicate
        error = PluginLoadError(name, source.distribution, str(duplicate))
        error.__cause__ = duplicate
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() on import is broken too
        error = PluginLoadError(name, source.distribution, f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
    finally:
        for registrar in (storage, formats, cli):
            registrar.close()
    if error is not None:
        return PluginInfo(name=name, distribution=source.distribution, version=source.version, error=error)
    registry.storage.update({n: (cls, name) for n, cls in storage.registered.items()})
    registry.format.update({n: (cls, name) for n, cls in formats.registered.items()})
    registry.cli.update(cli.registered)
    return PluginInfo(
        name=name,
        distribution=source.distribution,
        version=source.version,
        storage_drivers=tuple(storage.registered),
        format_drivers=tuple(formats.registered),
        cli_commands=tuple(cli.registered),
    )


def _core_cli_commands() -> list[str]:
    """The subcommands the core's CLI defines itself: a plugin may not take their names."""
    from ..cli import COMMANDS  # the CLI's own table (imported late: it brings argparse along)

    return list(COMMANDS)


def _check_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """Reject hooks that would silently never run: misspelled ones, and unmarked ones."""
    for hook_name in _HOOK_NAMES:
        if callable(getattr(plugin, hook_name, None)) and pm.parse_hookimpl_opts(plugin, hook_name) is None:
            raise pluggy.PluginValidationError(
                plugin, f"{hook_name!r} is not marked with @imago.hookimpl, so it would never be called"
            )
    for caller in pm.get_hookcallers(plugin) or ():
        if not caller.has_spec() and not all(impl.optionalhook for impl in caller.get_hookimpls()):
            import difflib

            close = difflib.get_close_matches(caller.name, _HOOK_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise pluggy.PluginValidationError(
                plugin, f"unknown hook {caller.name!r}: imago specifies no such hook{hint}"
            )
    pm.check_pending()


def _constant(value: object) -> Callable[[], object]:
    return lambda: value


def _call_each(hook: pluggy.HookCaller, registrar: StorageRegistrar | FormatRegistrar | CliRegistrar) -> None:
    # Called implementation by implementation (not through pluggy's multi-call) so that the
    # first error propagates with its own traceback; each gets only the arguments it declares.
    for impl in hook.get_hookimpls():
        impl.function(*[{"register": registrar}[arg] for arg in impl.argnames])
    registrar.close()
    if registrar.error is not None:  # the hook caught its registration error; it still counts
        raise registrar.error


_manager = _Manager()


def _lookup(kind: str, name: str, table: dict[str, tuple[T, str]]) -> T:
    registry = _manager.registry()
    duplicate = registry.duplicates.get((kind, name))
    if duplicate is not None:
        raise duplicate
    entry = table.get(name)
    if entry is not None:
        return entry[0]
    raise _not_found(registry, kind, name, table)


def _not_found(registry: _Registry, kind: str, name: str, table: Mapping[str, tuple[Any, str]]) -> DriverNotFoundError:
    """The error for a missing driver, naming the distribution to install and what went wrong."""
    broken = [info for info in registry.plugins.values() if info.error is not None]
    declaring = [registry.plugins[label] for label in registry.declared.get((kind, name), ())]
    if declaring:  # its distribution is installed and declares it, but did not deliver it
        info = next((info for info in declaring if info.error is not None), declaring[0])
        return _provider_failed(kind, name, info)
    # No declaration: a broken plugin named like the driver, or like its conventional distribution.
    distribution = _conventional_distribution(name)
    same_name = [info for info in broken if distribution == info.distribution or info.name == name]
    if same_name:
        return _provider_failed(kind, name, same_name[0])
    # A driver whose name differs only in case, installed or declared by a distribution.
    folded = name.casefold()
    similar = [(other, plugin) for other, (_, plugin) in sorted(table.items()) if other.casefold() == folded]
    similar += [
        (other, labels[0])
        for (declared_kind, other), labels in sorted(registry.declared.items())
        if declared_kind == kind and other.casefold() == folded
    ]
    if similar:
        other, label = similar[0]
        info = registry.plugins[label]
        provider = info.distribution or _conventional_distribution(other)
        error = DriverNotFoundError(kind, name, provider, str(info.error or ""), suggestion=other)
        error.__cause__ = info.error
        return error
    detail = "plugins that failed to load: " + ", ".join(info.name for info in broken) if broken else ""
    error = DriverNotFoundError(kind, name, distribution, detail)
    error.__cause__ = broken[0].error if broken else None
    return error


def _provider_failed(kind: str, name: str, info: PluginInfo) -> DriverNotFoundError:
    """The error for a driver whose plugin is installed but failed to load (or to register it)."""
    distribution = info.distribution or _conventional_distribution(name)
    if info.error is None:
        detail = f"the distribution {distribution!r} declares it, but its plugin {info.name!r} did not register it"
        return DriverNotFoundError(kind, name, distribution, detail)
    error = DriverNotFoundError(kind, name, distribution, str(info.error))
    error.__cause__ = info.error
    return error


def _conventional_distribution(name: str) -> str:
    """The distribution name the convention gives a driver: ``imago-<name>``, lower-cased."""
    return f"imago-{name.lower()}"


def storage_driver(name: str) -> type[Storage]:
    """The storage driver class registered as *name* (``file``, ``null``, ...).

    Raises :class:`~imago.DriverNotFoundError` naming the distribution to install (chained to
    the load error of the plugin that should have provided it, if any) and
    :class:`~imago.DuplicateDriverError` if two plugins claim *name*.
    """
    found = _manager.declared("storage", name)
    return found if found is not None else _lookup("storage", name, _manager.registry().storage)


def storage_driver_for_uri(scheme: str) -> type[Storage] | None:
    """The storage driver that opens URIs of *scheme* (:attr:`~imago.Storage.uri_schemes`), or ``None``.

    Every plugin is loaded to find it: a URI is named on purpose and rarely. Raises
    :class:`~imago.DuplicateDriverError` if two plugins' drivers claim *scheme*.
    """
    scheme = scheme.lower()
    claims = [(cls, owner) for cls, owner in _manager.registry().storage.values() if scheme in cls.uri_schemes]
    if len(claims) > 1:
        raise DuplicateDriverError("storage", f"{scheme}://", claims[0][1], claims[1][1])
    return claims[0][0] if claims else None


def format_driver(name: str) -> type[FormatDriver]:
    """The format driver class registered as *name* (``raw``, ``qcow2``, ...); errors as :func:`storage_driver`."""
    found = _manager.declared("format", name)
    return found if found is not None else _lookup("format", name, _manager.registry().format)


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

    *plugin* is a module or any object with hook implementations, as an entry point would
    name. Meant for tests and embedding; the registry is rebuilt on the next look-up.
    """
    _manager.add(name, plugin)


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin`."""
    _manager.remove(name)


def reset() -> None:
    """Forget everything loaded; the next look-up scans the entry points again."""
    _manager.reset()
