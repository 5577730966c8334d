"""Fault plans: which storage calls fail and how, shared by a test and the storages it drives.

A :class:`Fault` is an immutable rule ("the 3rd write fails with EIO", "every read touching
``[0, 512)`` is short"); a :class:`FaultPlan` holds the rules, counts the calls the storage sees
and remembers the faults it injected. The test keeps a reference to the plan and inspects or
changes it between (or, through :attr:`FaultPlan.observer`, during) the calls.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from imago import InvalidOptionError, Record

__all__ = ["ANY", "EFFECTS", "OPERATIONS", "Call", "Fault", "FaultPlan", "InjectedError"]

#: The storage calls a plan counts and can fail.
OPERATIONS = ("read", "write", "write_zeroes", "discard", "flush", "sync", "resize")
#: A fault's ``op`` matching every call, whatever its kind.
ANY = "any"
#: What a fault does: raise an ``OSError``, or (reads only) deliver fewer bytes than asked.
EFFECTS = ("error", "short-read")

_set = object.__setattr__


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidOptionError(name, f"must be a positive integer, got {value!r}")
    return value


def _non_negative(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidOptionError(name, f"must be a non-negative integer, got {value!r}")
    return value


def _offset_range(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidOptionError("offset_range", f"must be a (start, end) pair of byte offsets, got {value!r}")
    start = _non_negative("offset_range", value[0])
    end = _non_negative("offset_range", value[1])
    if end <= start:
        raise InvalidOptionError("offset_range", f"must be a non-empty range (start < end), got {value!r}")
    return start, end


def _unknown_keys(what: str, given: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(sorted(known))
        raise InvalidOptionError(what, f"unknown key(s) {', '.join(map(repr, unknown))} (known: {names})")


class Call(Record, kw_only=True):
    """One storage call as a plan sees it, before it runs."""

    __slots__ = ("index", "length", "nth", "offset", "op")

    #: The operation (one of :data:`OPERATIONS`).
    op: str
    #: 1-based number of this call among all calls the plan counted.
    index: int
    #: 1-based number of this call among the calls of its operation.
    nth: int
    #: The byte range it touches (``0, 0`` for flushes and syncs; a resize touches the bytes
    #: between the old and the new size).
    offset: int
    length: int

    def __init__(self, *, op: str, index: int, nth: int, offset: int, length: int) -> None:
        _set(self, "op", op)
        _set(self, "index", index)
        _set(self, "nth", nth)
        _set(self, "offset", offset)
        _set(self, "length", length)


class Fault(Record, kw_only=True):
    """A rule: which calls fail, and how.

    A fault *matches* calls of its operation ``op`` (``"any"``: every call) that touch its
    ``offset_range`` (when one is given; flushes and syncs touch no range, so they never match
    one). Of the calls it matches, those numbered ``nth`` to ``nth + times - 1`` (1-based;
    ``times=None``: every one from ``nth`` on) fail: with ``effect="error"`` an
    :class:`InjectedError` (``errno`` EIO unless given) is raised before anything is done; with
    ``effect="short-read"`` (reads only) only the first ``short_length`` bytes are read and the
    rest reads as zero, as if the file ended there.
    """

    __slots__ = ("effect", "errno", "nth", "offset_range", "op", "short_length", "times")

    op: str
    nth: int
    times: int | None
    offset_range: tuple[int, int] | None
    effect: str
    errno: int
    short_length: int

    def __init__(
        self,
        *,
        op: str,
        nth: int = 1,
        times: int | None = 1,
        offset_range: tuple[int, int] | None = None,
        effect: str = "error",
        errno: int = errno_codes.EIO,
        short_length: int = 0,
    ) -> None:
        if op != ANY and op not in OPERATIONS:
            raise InvalidOptionError("op", f"unknown operation {op!r} (choose from {', '.join((ANY, *OPERATIONS))})")
        if effect not in EFFECTS:
            raise InvalidOptionError("effect", f"unknown effect {effect!r} (choose from {', '.join(EFFECTS)})")
        if effect == "short-read" and op != "read":
            raise InvalidOptionError("effect", f"a short read is a fault of reads, not of {op!r}")
        _set(self, "op", op)
        _set(self, "nth", _positive("nth", nth))
        _set(self, "times", None if times is None else _positive("times", times))
        _set(self, "offset_range", _offset_range(offset_range))
        _set(self, "effect", effect)
        _set(self, "errno", _positive("errno", errno))
        _set(self, "short_length", _non_negative("short_length", short_length))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> Fault:
        """A fault from a mapping of its fields (``{"op": "write", "nth": 3}``); unknown keys are errors."""
        if not isinstance(options, Mapping):
            raise InvalidOptionError("faults", f"each fault must be a Fault or a mapping, got {options!r}")
        _unknown_keys("faults", options, cls._record_fields)
        if "op" not in options:
            raise InvalidOptionError("op", "a fault must name its operation")
        return cls(**options)

    def matches(self, call: Call) -> bool:
        """Whether *call* is of this fault's kind and touches its range."""
        if self.op not in (ANY, call.op):
            return False
        if self.offset_range is None:
            return True
        start, end = self.offset_range
        return call.length > 0 and call.offset < end and start < call.offset + call.length

    def fires(self, hit: int) -> bool:
        """Whether the *hit*-th matching call (1-based) fails."""
        return hit >= self.nth and (self.times is None or hit < self.nth + self.times)


class InjectedError(OSError):
    """The error a fault raised: an ``OSError`` (errno EIO by default) naming the call."""

    def __init__(self, fault: Fault, call: Call, filename: str | None) -> None:
        where = f" at offset {call.offset}, {call.length} bytes" if call.length else ""
        message = f"injected fault: {call.op} #{call.nth} (call {call.index}){where}: {os.strerror(fault.errno)}"
        super().__init__(fault.errno, message, filename)
        self.fault = fault
        self.call = call


class FaultPlan(Record, kw_only=True, frozen=False, uncompared=("observer",)):
    """The faults to inject, the switch for the volatile write cache, and what happened so far.

    ``write_cache``: writes stay in a volatile cache until a flush or sync makes them durable
    (what :meth:`FaultyStorage.power_loss <imago_faults.FaultyStorage.power_loss>` drops);
    ``write_back_early`` (0 to 1) is the chance that, after each cached write, the "disk" writes
    one pending write back on its own (``seed`` seeds that choice). ``observer`` is called with
    each :class:`Call` before it runs (and before a fault fires): tests use it to act at chosen
    points. ``calls`` counts the calls by operation (and ``"any"``: all of them), ``injected``
    lists the faults raised or short reads made.
    """

    __slots__ = ("calls", "faults", "hits", "injected", "observer", "seed", "write_back_early", "write_cache")

    faults: list[Fault]
    write_cache: bool
    write_back_early: float
    seed: int
    observer: Callable[[Call], None] | None
    calls: Counter[str]
    hits: list[int]
    injected: list[InjectedError | Call]

    def __init__(
        self,
        *,
        faults: Iterable[Fault | Mapping[str, Any]] = (),
        write_cache: bool = False,
        write_back_early: float = 0.0,
        seed: int = 0,
        observer: Callable[[Call], None] | None = None,
        calls: Counter[str] | None = None,
        hits: list[int] | None = None,
        injected: list[InjectedError | Call] | None = None,
    ) -> None:
        if isinstance(faults, (str, bytes, Mapping)) or not isinstance(faults, Iterable):
            raise InvalidOptionError("faults", f"must be a list of faults, got {faults!r}")
        if not isinstance(write_cache, bool):
            raise InvalidOptionError("write_cache", f"must be True or False, got {write_cache!r}")
        if (
            not isinstance(write_back_early, (int, float))
            or isinstance(write_back_early, bool)
            or not 0 <= write_back_early <= 1
        ):
            raise InvalidOptionError("write_back_early", f"must be a probability from 0 to 1, got {write_back_early!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidOptionError("seed", f"must be an integer, got {seed!r}")
        if observer is not None and not callable(observer):
            raise InvalidOptionError("observer", f"must be callable, got {observer!r}")
        self.faults = [fault if isinstance(fault, Fault) else Fault.from_mapping(fault) for fault in faults]
        self.write_cache = write_cache
        self.write_back_early = float(write_back_early)
        self.seed = seed
        self.observer = observer
        self.calls = Counter() if calls is None else calls
        self.hits = [0] * len(self.faults) if hits is None else hits
        self.injected = [] if injected is None else injected

    @classmethod
    def parse(cls, value: FaultPlan | Mapping[str, Any] | None) -> FaultPlan:
        """A plan from itself, from a mapping of its fields, or an empty plan for ``None``."""
        if value is None:
            return cls()
        if isinstance(value, FaultPlan):
            return value
        if not isinstance(value, Mapping):
            raise InvalidOptionError("plan", f"must be a FaultPlan or a mapping, got {type(value).__name__}")
        _unknown_keys("plan", value, ("faults", "write_cache", "write_back_early", "seed", "observer"))
        return cls(**value)

    def add(self, fault: Fault | Mapping[str, Any]) -> Fault:
        """Add a rule (counting its matching calls from now on); returns it."""
        rule = fault if isinstance(fault, Fault) else Fault.from_mapping(fault)
        self.faults.append(rule)
        self.hits.append(0)
        return rule

    def clear(self) -> None:
        """Remove every rule (the counters stay)."""
        self.faults.clear()
        self.hits.clear()

    def count(self, op: str, offset: int = 0, length: int = 0) -> tuple[Call, Fault | None]:
        """Count a call about to run; the call, and the fault it must suffer (``None``: none).

        The observer sees the call first. Storages call this; tests need not.
        """
        self.calls[op] += 1
        self.calls[ANY] += 1
        call = Call(op=op, index=self.calls[ANY], nth=self.calls[op], offset=offset, length=length)
        if self.observer is not None:
            self.observer(call)
        fired = None
        for index, fault in enumerate(self.faults):
            if fault.matches(call):
                self.hits[index] += 1
                if fired is None and fault.fires(self.hits[index]):
                    fired = fault
        return call, fired
