"""``Record``: the base of imago's small value classes, cheap to import.

A record class lists its fields in ``__slots__``, declares their types (the annotations give the
fields' order) and writes its ``__init__`` by hand (frozen records set their fields with
:data:`init`); this base derives the rest from them, at run time and without generating code:
``__eq__`` (same class, equal fields), ``__hash__`` (frozen records only; mutable ones are
unhashable), ``__repr__`` (``Name(field=value, ...)``), ``__match_args__``, pickling and
copying, ``__replace__`` (:func:`copy.replace`, and :func:`evolve` here), and for frozen records
a ``__setattr__`` and ``__delattr__`` that raise :class:`attrs.exceptions.FrozenInstanceError`.
Class keywords: ``frozen`` (default true), ``kw_only`` (no positional ``match`` patterns),
``uncompared`` (fields left out of equality and hash) and ``hidden`` (left out of the repr); a
subclass inherits its base's settings and fields.

The classes behave as the attrs classes they replace (importing attrs and building its
classes costs a command line tool more than it may spend on starting): :func:`attrs.evolve`,
:func:`attrs.fields` and :func:`attrs.asdict` still work on them, through an
``__attrs_attrs__`` built (with attrs imported) only when something asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

__all__ = ["Record", "evolve", "init"]

if TYPE_CHECKING:  # a bound named by a string costs a compile() at import
    R = TypeVar("R", bound="Record")

#: Sets a field of a frozen record in its ``__init__`` (``init(self, "name", value)``).
init = object.__setattr__


def _frozen_error() -> AttributeError:
    """The error attrs raises for assignments to frozen instances (imported only when one is attempted)."""
    try:
        from attrs.exceptions import FrozenInstanceError
    except ImportError:  # pragma: no cover - attrs is a dependency of the core
        return AttributeError("can't set attribute")
    return FrozenInstanceError()


def _key_getter(names: tuple[str, ...]) -> Any:
    """A function returning the tuple of the fields *names* of a record."""
    if len(names) == 1:
        name = names[0]
        return lambda record: (getattr(record, name),)
    return attrgetter(*names) if names else lambda record: ()


def _comparisons(cls: type[Any], key: Any) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., int]]:
    """``__eq__``, ``__ne__`` and ``__hash__`` of *cls* over the fields *key* returns.

    Closures over *key*, made per class: no look-up but the fields themselves on each call.
    """

    def eq(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return key(self) == key(other)

    def ne(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return key(self) != key(other)

    def hash_(self: Any) -> int:
        return hash((cls, key(self)))

    for function, name in ((eq, "__eq__"), (ne, "__ne__"), (hash_, "__hash__")):
        function.__name__, function.__qualname__ = name, f"{cls.__qualname__}.{name}"
    return eq, ne, hash_


class _AttrsFields:
    """The ``__attrs_attrs__`` of a record class: attrs' description of its fields, made on demand."""

    def __init__(self) -> None:
        self._made: dict[type[Any], Any] = {}

    def __get__(self, instance: object, owner: type[Record]) -> Any:
        made = self._made.get(owner)
        if made is None:
            import attrs

            compared = set(owner._record_compared)
            fields = {
                name: attrs.field(kw_only=owner._record_kw_only, eq=name in compared, repr=name in owner._record_shown)
                for name in owner._record_fields
            }
            made = self._made[owner] = attrs.fields(attrs.make_class(owner.__name__, fields))
        return made


class Record:
    """Base of the value classes: equality, hash, repr and immutability from ``__slots__``."""

    __slots__ = ()

    _record_fields: ClassVar[tuple[str, ...]] = ()
    _record_compared: ClassVar[tuple[str, ...]] = ()
    _record_shown: ClassVar[tuple[str, ...]] = ()
    _record_frozen: ClassVar[bool] = True
    _record_kw_only: ClassVar[bool] = False
    _record_uncompared: ClassVar[tuple[str, ...]] = ()
    _record_hidden: ClassVar[tuple[str, ...]] = ()
    _record_key: ClassVar[Any] = staticmethod(lambda record: ())
    __match_args__: ClassVar[tuple[str, ...]] = ()

    __attrs_attrs__ = _AttrsFields()

    def __init_subclass__(
        cls,
        *,
        frozen: bool | None = None,
        kw_only: bool | None = None,
        uncompared: tuple[str, ...] = (),
        hidden: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        fields: list[str] = []
        for klass in reversed(cls.__mro__):
            slots = klass.__dict__.get("__slots__", ())
            slots = [name for name in ((slots,) if isinstance(slots, str) else slots) if not name.startswith("__")]
            # The fields in the order their annotations declare them (the slots are sorted), then any other slots.
            annotations = klass.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect costs start-up time)
            for name in (*(name for name in annotations if name in slots), *slots):
                if name not in fields:
                    fields.append(name)
        if frozen is not None:
            cls._record_frozen = frozen
        if kw_only is not None:
            cls._record_kw_only = kw_only
        cls._record_uncompared = (*cls._record_uncompared, *uncompared)
        cls._record_hidden = (*cls._record_hidden, *hidden)
        cls._record_fields = tuple(fields)
        cls._record_compared = tuple(name for name in fields if name not in cls._record_uncompared)
        cls._record_shown = tuple(name for name in fields if name not in cls._record_hidden)
        cls._record_key = staticmethod(_key_getter(cls._record_compared))
        if "__eq__" not in cls.__dict__:  # (a class defining its own equality keeps it, and its hash)
            cls.__eq__, cls.__ne__, cls.__hash__ = _comparisons(cls, cls._record_key)  # type: ignore[method-assign]
        cls.__match_args__ = () if cls._record_kw_only else cls._record_fields  # type: ignore[misc]
        if not cls._record_frozen:
            cls.__setattr__ = object.__setattr__  # type: ignore[method-assign,assignment]
            cls.__delattr__ = object.__delattr__  # type: ignore[method-assign]
            cls.__hash__ = None  # type: ignore[method-assign,assignment]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        key = self._record_key
        return bool(key(self) == key(other))

    def __ne__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        key = self._record_key
        return bool(key(self) != key(other))

    def __hash__(self) -> int:
        return hash((self.__class__, *self._record_key(self)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name, None)!r}" for name in self._record_shown)
        return f"{self.__class__.__qualname__.rsplit('>.', 1)[-1]}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise _frozen_error()

    def __delattr__(self, name: str) -> None:
        raise _frozen_error()

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._record_fields if hasattr(self, name)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def __replace__(self, **changes: Any) -> Self:
        return evolve(self, **changes)


def evolve(record: R, **changes: Any) -> R:
    """A copy of *record* with the fields in *changes* replaced, checked as its ``__init__`` checks them."""
    values = {name: getattr(record, name) for name in record._record_fields}
    values.update(changes)
    return record.__class__(**values)
