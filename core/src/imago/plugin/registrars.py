"""The registrars a plugin's hooks receive: typed, validating collectors of what it provides.

Each hook of :mod:`imago.plugin.hookspecs` is called with one registrar as its ``register``
argument: a :class:`StorageRegistrar`, a :class:`FormatRegistrar` or a :class:`CliRegistrar`.
A registrar checks every registration at once (an :class:`~imago.InvalidDriverError` or a
:class:`~imago.DuplicateDriverError` naming what is wrong), keeps what it accepted for the
plugin manager, and is closed when the hook returns: registering later is an error, so a
plugin cannot keep the registrar and add drivers behind the manager's back.

Registrars are callable, so a hook written as ``register(cls)`` (or, for subcommands,
``register(name, help, configure, run)``) works as well as the typed methods
:meth:`StorageRegistrar.register` and :meth:`CliRegistrar.command`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NoReturn, TypeVar

from .._record import Record, init
from ..errors import DuplicateDriverError, InvalidDriverError, PluginError
from ..format.capabilities import Capability
from ..format.driver import FormatDriver
from ..storage import Storage, uri_scheme

if TYPE_CHECKING:  # argparse is for the command line tool: a library user loading plugins need not import it
    import argparse

__all__ = [
    "CORE_DISTRIBUTION",
    "CliCommand",
    "CliConfigure",
    "CliRegistrar",
    "CliRun",
    "FormatRegistrar",
    "StorageRegistrar",
]

#: Adds a subcommand's arguments to its parser.
CliConfigure = Callable[["argparse.ArgumentParser"], None]
#: Runs a subcommand; returns the exit status (``None`` meaning 0).
CliRun = Callable[["argparse.Namespace"], Any]

#: The owner named when a plugin claims a name the core itself uses (a core subcommand).
CORE_DISTRIBUTION = "imago-core"

D = TypeVar("D")
R = TypeVar("R")


class CliCommand(Record, kw_only=True):
    """A subcommand registered through ``imago_register_cli_commands``."""

    __slots__ = ("configure", "help", "name", "plugin", "run")

    name: str
    help: str
    configure: CliConfigure
    run: CliRun
    plugin: str

    def __init__(self, *, name: str, help: str, configure: CliConfigure, run: CliRun, plugin: str) -> None:
        init(self, "name", name)
        init(self, "help", help)
        init(self, "configure", configure)
        init(self, "run", run)
        init(self, "plugin", plugin)


class _Registrar(Generic[R]):
    """What every registrar shares: the owning plugin, the names taken, closing, the first error."""

    #: The kind of thing registered, as :class:`~imago.DuplicateDriverError` names it.
    kind: ClassVar[str]
    #: What is registered, as messages name it ("storage driver", "CLI command").
    what: ClassVar[str]

    def __init__(self, plugin: str, *, taken: Mapping[str, str] | None = None) -> None:
        """A registrar collecting for *plugin*; *taken* maps names already claimed to their owner.

        The plugin manager creates registrars; plugins only receive them.
        """
        if not isinstance(plugin, str) or not plugin:
            raise TypeError(f"a registrar needs the plugin's name, got {plugin!r}")
        self._plugin = plugin
        self._taken = dict(taken or {})
        self._registered: dict[str, R] = {}
        self._closed = False
        self._error: PluginError | None = None

    @property
    def plugin(self) -> str:
        """The name of the plugin registering through this registrar."""
        return self._plugin

    @property
    def registered(self) -> dict[str, R]:
        """What was accepted so far, by name, in registration order."""
        return dict(self._registered)

    @property
    def closed(self) -> bool:
        """Whether the hook has returned; a closed registrar refuses registrations."""
        return self._closed

    @property
    def error(self) -> PluginError | None:
        """The first registration error, even if the hook caught it; loading fails with it."""
        return self._error

    def close(self) -> None:
        """Refuse further registrations (the plugin manager calls this when the hook returns)."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise PluginError(
                f"plugin {self._plugin!r} registered a {self.what} after its hook returned; "
                "register while the hook runs"
            )

    def _fail(self, error: PluginError) -> NoReturn:
        """Raise *error*, remembering the first one as :attr:`error`."""
        if self._error is None:
            self._error = error
        raise error

    def _accept(self, name: object, value: R, problem: str | None = None) -> None:
        """Keep *value* under *name*, unless *name* is empty or taken, or there is a *problem*."""
        if not isinstance(name, str) or not name:
            self._fail(InvalidDriverError(f"{self.what} of plugin {self._plugin!r} has no name, got {name!r}"))
        if problem is not None:
            self._fail(InvalidDriverError(problem))
        if name in self._taken or name in self._registered:
            self._fail(DuplicateDriverError(self.kind, name, self._taken.get(name, self._plugin), self._plugin))
        self._registered[name] = value

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} of plugin {self._plugin!r}, {state}, registered {list(self._registered)}>"


class _DriverRegistrar(_Registrar[type[D]]):
    """A registrar of driver classes of one base class."""

    base: ClassVar[type[Any]]

    def register(self, cls: type[D]) -> None:
        """Register the driver class *cls* under its ``name``.

        Raises :class:`~imago.InvalidDriverError` if *cls* is not a subclass of the base class
        or has no name (or, for formats, lacks what its capabilities need), and
        :class:`~imago.DuplicateDriverError` if the name is taken.
        """
        self._check_open()
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            self._fail(InvalidDriverError(f"{self.what} must be a subclass of {self.base.__name__}, got {cls!r}"))
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            self._fail(InvalidDriverError(f"{self.what} {cls.__qualname__} has no name"))
        self._accept(name, cls, self._problem(cls))

    def __call__(self, cls: type[D]) -> None:
        """Same as :meth:`register`."""
        self.register(cls)

    def _problem(self, cls: type[D]) -> str | None:
        """What is wrong with *cls* beyond base class and name; subclasses add their checks."""
        return None


class StorageRegistrar(_DriverRegistrar[Storage]):
    """Handed to ``imago_register_storage_drivers``: ``register(cls)`` for each storage driver.

    *cls* must subclass :class:`~imago.Storage` and set a non-empty ``name``, unique among
    the storage drivers of every plugin; its ``uri_schemes``, if any, must be a tuple of
    lower-case URI schemes (two drivers claiming one scheme are reported when it is looked up).
    """

    kind = "storage"
    what = "storage driver"
    base = Storage

    def _problem(self, cls: type[Storage]) -> str | None:
        schemes: object = cls.uri_schemes
        if not isinstance(schemes, tuple):
            return f"storage driver {cls.__qualname__}: uri_schemes must be a tuple of strings, got {schemes!r}"
        for scheme in schemes:
            if not isinstance(scheme, str) or uri_scheme(f"{scheme}://") != scheme:
                return f"storage driver {cls.__qualname__}: {scheme!r} in uri_schemes is not a lower-case URI scheme"
        return None


class FormatRegistrar(_DriverRegistrar[FormatDriver]):
    """Handed to ``imago_register_format_drivers``: ``register(cls)`` for each format driver.

    *cls* must subclass :class:`~imago.FormatDriver`, set a non-empty ``name`` unique among
    the format drivers of every plugin, and implement every capability it lists in
    ``capabilities`` (:meth:`~imago.Capability.missing` must find nothing).
    """

    kind = "format"
    what = "format driver"
    base = FormatDriver

    def _problem(self, cls: type[FormatDriver]) -> str | None:
        capabilities: object = cls.capabilities
        if not isinstance(capabilities, Collection) or isinstance(capabilities, str | bytes):
            return f"format driver {cls.__qualname__}: capabilities must be a frozenset, got {capabilities!r}"
        for capability in capabilities:
            if not isinstance(capability, Capability):
                return f"format driver {cls.__qualname__}: {capability!r} in capabilities is not a Capability"
            missing = capability.missing(cls, FormatDriver)
            if missing:
                return (
                    f"format driver {cls.__qualname__} claims the capability {capability.name!r} "
                    f"but does not implement {', '.join(missing)}"
                )
        return None


class CliRegistrar(_Registrar[CliCommand]):
    """Handed to ``imago_register_cli_commands``: one :meth:`command` call per subcommand.

    Names must be unique among all plugins and must not be one of the core's subcommands (``imago.cli.COMMANDS``).
    """

    kind = "CLI command"
    what = "CLI command"

    def command(self, *, name: str, help: str, configure: CliConfigure, run: CliRun) -> None:
        """Add the subcommand *name*, listed with *help*.

        *configure* adds the subcommand's arguments to its :class:`argparse.ArgumentParser`;
        *run* executes it with the parsed :class:`argparse.Namespace` and returns the exit
        status (``None`` meaning 0). Raises :class:`~imago.InvalidDriverError` for a bad name
        or a non-callable, :class:`~imago.DuplicateDriverError` if the name is taken.
        """
        self._check_open()
        command = CliCommand(name=name, help=help, configure=configure, run=run, plugin=self.plugin)
        self._accept(name, command, _command_problem(name, help, configure, run) if isinstance(name, str) else None)

    def __call__(self, name: str, help: str, configure: CliConfigure, run: CliRun) -> None:
        """Same as :meth:`command`, with positional arguments allowed."""
        self.command(name=name, help=help, configure=configure, run=run)


def _command_problem(name: str, help: object, configure: object, run: object) -> str | None:
    if name.startswith("-") or any(c.isspace() for c in name):
        return f"CLI command name {name!r} must not start with '-' or contain white space"
    if not isinstance(help, str):
        return f"CLI command {name!r}: help must be a string, got {help!r}"
    for role, value in (("configure", configure), ("run", run)):
        if not callable(value):
            return f"CLI command {name!r}: {role} must be callable, got {value!r}"
    return None
