"""imago-raw: the raw format, where the disk is the file, byte for byte."""

from .driver import Raw

__all__ = ["Raw"]
