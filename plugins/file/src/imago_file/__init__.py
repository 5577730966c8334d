"""imago-file: local files and block devices as imago storage."""

from .storage import File

__all__ = ["File"]
