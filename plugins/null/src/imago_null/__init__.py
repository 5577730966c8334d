"""imago-null: a storage of fixed size that reads zeroes and drops writes."""

from .storage import Null

__all__ = ["Null"]
