"""The format layer: drivers, mappings, the I/O engine, builders and gates."""

from .access import FormatAccess
from .builder import MAX_CHAIN_DEPTH, FormatCreateBuilder, FormatDriverBuilder
from .driver import FormatDriver
from .gates import (
    DenyImplicitOpenGate,
    ImplicitOpenGate,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    check_local_file_name,
)
from .mapping import Mapping, ShallowMapping

__all__ = [
    "MAX_CHAIN_DEPTH",
    "DenyImplicitOpenGate",
    "FormatAccess",
    "FormatCreateBuilder",
    "FormatDriver",
    "FormatDriverBuilder",
    "ImplicitOpenGate",
    "Mapping",
    "PermissiveImplicitOpenGate",
    "SandboxImplicitOpenGate",
    "ShallowMapping",
    "check_local_file_name",
]
