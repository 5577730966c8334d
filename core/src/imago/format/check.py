"""Consistency checks: what ``qemu-img check`` reports, as values.

A driver claiming :attr:`Capability.CHECK` implements ``check(fix)`` and returns a
:class:`CheckResult`; :meth:`FormatAccess.check` is the generic entry point. The result carries
qemu-img's counts under its field names (:meth:`CheckResult.to_json`) and every finding with
where it is (:class:`CheckFinding`), so that tools and tests compare imago's check with
``qemu-img check`` field by field.
"""

from __future__ import annotations

import enum
from typing import Any

from .._record import Record, init

__all__ = ["CheckFinding", "CheckResult", "FindingKind", "RepairMode"]


class RepairMode(enum.Enum):
    """What a check may repair: ``qemu-img check -r leaks`` or ``-r all``."""

    #: Free clusters whose refcount is higher than their references.
    LEAKS = "leaks"
    #: Leaks, refcounts lower than the references, wrong COPIED flags; rebuild the refcount
    #: structure when it is itself damaged.
    ALL = "all"

    @classmethod
    def parse(cls, value: RepairMode | str | None) -> RepairMode | None:
        """*value* as a mode (``None``: check only); raises ``ValueError`` for unknown names."""
        if value is None or isinstance(value, RepairMode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"repair mode must be 'leaks' or 'all', got {value!r}") from None


class FindingKind(enum.Enum):
    """The class of a finding; decides which count it adds to."""

    #: A refcount higher than the references (``Leaked cluster N ...``): counts as a leak.
    LEAK = "leak"
    #: Anything that may lose or corrupt data (refcount too low, COPIED wrong, references past
    #: the end of the file, unaligned or overlapping structures, ...): counts as a corruption.
    CORRUPTION = "corruption"
    #: Something the check could not inspect (a read error, a table it could not load).
    CHECK_ERROR = "check-error"


class CheckFinding(Record, kw_only=True):
    """One thing a check found wrong, and where."""

    __slots__ = ("cluster", "fixed", "kind", "message", "offset", "refcount", "references")

    kind: FindingKind
    #: The line ``qemu-img check`` prints for it (``Leaked cluster 5 refcount=2 reference=1``).
    message: str
    #: The host cluster index it is about, if it is about one.
    cluster: int | None
    #: The host (file) offset it is about, if any.
    offset: int | None
    #: The stored refcount, when the finding compares refcounts.
    refcount: int | None
    #: The references counted, when the finding compares refcounts.
    references: int | None
    #: Whether a repair fixed it.
    fixed: bool

    def __init__(
        self,
        *,
        kind: FindingKind,
        message: str,
        cluster: int | None = None,
        offset: int | None = None,
        refcount: int | None = None,
        references: int | None = None,
        fixed: bool = False,
    ) -> None:
        init(self, "kind", kind)
        init(self, "message", message)
        init(self, "cluster", cluster)
        init(self, "offset", offset)
        init(self, "refcount", refcount)
        init(self, "references", references)
        init(self, "fixed", fixed)

    def __str__(self) -> str:
        return self.message


class CheckResult(Record, kw_only=True):
    """The outcome of a check (and repair) of one image, as ``qemu-img check`` reports it.

    With a repair, the counts are those of the check run after the repair (as qemu-img's
    "Double checking the fixed image now..."), ``corruptions_fixed``/``leaks_fixed`` what the
    repair fixed and :attr:`repaired` the findings the repair pass saw.
    """

    __slots__ = (
        "allocated_clusters",
        "check_errors",
        "compressed_clusters",
        "corruptions",
        "corruptions_fixed",
        "failure",
        "filename",
        "findings",
        "format",
        "fragmented_clusters",
        "image_end_offset",
        "leaks",
        "leaks_fixed",
        "repaired",
        "total_clusters",
    )

    filename: str | None
    format: str
    corruptions: int
    leaks: int
    check_errors: int
    corruptions_fixed: int
    leaks_fixed: int
    #: First byte after the last cluster in use (qemu-img's ``image-end-offset``).
    image_end_offset: int | None
    total_clusters: int | None
    allocated_clusters: int | None
    fragmented_clusters: int | None
    compressed_clusters: int | None
    #: What the (last) check found, in the order found.
    findings: tuple[CheckFinding, ...]
    #: What the repair pass found (and fixed, where ``fixed``); empty without a repair.
    repaired: tuple[CheckFinding, ...]
    #: Why the check stopped before it completed (qemu-img's ``Check failed: <reason>``), or
    #: ``None``; the counts are then those gathered before it stopped.
    failure: str | None

    def __init__(
        self,
        *,
        filename: str | None,
        format: str,
        corruptions: int = 0,
        leaks: int = 0,
        check_errors: int = 0,
        corruptions_fixed: int = 0,
        leaks_fixed: int = 0,
        image_end_offset: int | None = None,
        total_clusters: int | None = None,
        allocated_clusters: int | None = None,
        fragmented_clusters: int | None = None,
        compressed_clusters: int | None = None,
        findings: tuple[CheckFinding, ...] = (),
        repaired: tuple[CheckFinding, ...] = (),
        failure: str | None = None,
    ) -> None:
        init(self, "filename", filename)
        init(self, "format", format)
        init(self, "corruptions", corruptions)
        init(self, "leaks", leaks)
        init(self, "check_errors", check_errors)
        init(self, "corruptions_fixed", corruptions_fixed)
        init(self, "leaks_fixed", leaks_fixed)
        init(self, "image_end_offset", image_end_offset)
        init(self, "total_clusters", total_clusters)
        init(self, "allocated_clusters", allocated_clusters)
        init(self, "fragmented_clusters", fragmented_clusters)
        init(self, "compressed_clusters", compressed_clusters)
        init(self, "findings", findings)
        init(self, "repaired", repaired)
        init(self, "failure", failure)

    @property
    def clean(self) -> bool:
        """The check completed and found no corruptions, leaks or check errors."""
        return self.failure is None and not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_status(self) -> int:
        """``qemu-img check``'s exit status: 0 clean, 1 not completed, 2 corruptions, 3 leaks."""
        if self.check_errors or self.failure is not None:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The result under ``qemu-img check --output=json``'s field names and order.

        As qemu-img does, ``filename``, ``format`` and ``check-errors`` are always there and the
        other counts only when not zero (or unknown).
        """
        # qemu-img prints a QDict, whose keys come out in hash-bucket order, not in the order
        # the fields were set: this is that order for these twelve names (QEMU 7.2).
        fields = (
            ("image-end-offset", self.image_end_offset),
            ("compressed-clusters", self.compressed_clusters),
            ("total-clusters", self.total_clusters),
            ("corruptions", self.corruptions),
            ("corruptions-fixed", self.corruptions_fixed),
            ("check-errors", self.check_errors),
            ("leaks", self.leaks),
            ("leaks-fixed", self.leaks_fixed),
            ("allocated-clusters", self.allocated_clusters),
            ("filename", self.filename),
            ("format", self.format),
            ("fragmented-clusters", self.fragmented_clusters),
        )
        always = ("check-errors", "filename", "format")
        return {
            key: (value or 0) if key == "check-errors" else value for key, value in fields if value or key in always
        }
