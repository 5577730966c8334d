"""Cluster compression: deflate (zlib) and zstd, as qcow2 stores them.

zstd writes at level 1 with one reused compressor per thread. Deflate uses the fastest
implementation installed: ISA-L (``isal``), then zlib-ng
(``zlib_ng``), then the standard library's zlib. Each writes raw deflate with a 12-bit (4 KiB)
window, the window QEMU inflates with, so what imago writes stays readable by QEMU; each reads
any window up to 32 KiB.
"""

from __future__ import annotations

import sys
import threading
import zlib
from typing import Any, cast

from imago import CorruptImageError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

__all__ = ["DEFLATE", "compress_cluster", "decompress_cluster"]


def _deflate_module() -> tuple[Any, int, tuple[type[Exception], ...]]:
    """The fastest deflate module installed, the level to compress with, and its error types."""
    try:
        from isal import isal_zlib

        # ISA-L's level 1: about ten times zlib's default speed, close to its ratio.
        return isal_zlib, 1, (cast(type[Exception], isal_zlib.error), zlib.error)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        return zlib_ng, 1, (cast(type[Exception], zlib_ng.error), zlib.error)
    except ImportError:
        pass
    return zlib, zlib.Z_DEFAULT_COMPRESSION, (zlib.error,)


#: The deflate module in use (``isal.isal_zlib``, ``zlib_ng.zlib_ng`` or ``zlib``).
DEFLATE, _LEVEL, _DEFLATE_ERRORS = _deflate_module()


#: zstd's level: 1, its fastest ordinary level (QEMU uses 3), for speed at a slightly lower ratio.
ZSTD_LEVEL = 1
# One zstd compressor per thread, reused for every cluster (a new one per cluster costs its set-up).
_zstd_compressors = threading.local()


def _errors() -> tuple[type[Exception], ...]:
    """The exceptions a damaged cluster raises in the codecs in use."""
    return (*_DEFLATE_ERRORS, zstd.ZstdError)


def decompress_cluster(
    data: bytes | memoryview, cluster_size: int, compression_type: int, where: str, offset: int
) -> bytes:
    """Decompress one cluster; the output must be exactly *cluster_size* bytes.

    *where* (the file name) and *offset* (the host offset of the data) go into errors.
    Releases the GIL while inflating, so clusters decompress in parallel on threads.
    """
    try:
        if compression_type == 0:
            # Raw deflate; a 15-bit window accepts the 12-bit window QEMU writes with.
            inflater = DEFLATE.decompressobj(-15)
            out: bytes = inflater.decompress(data, cluster_size)
            more = inflater.decompress(inflater.unconsumed_tail, 1) if len(out) == cluster_size else b""
        else:
            # Like QEMU, consecutive frames are decompressed until the cluster is full.
            out = b""
            more = b""
            rest: bytes | memoryview = data
            while rest and len(out) < cluster_size:
                decompressor = zstd.ZstdDecompressor()
                out += decompressor.decompress(rest, max_length=cluster_size - len(out))
                if not decompressor.eof:
                    if len(out) == cluster_size and not decompressor.needs_input:
                        more = decompressor.decompress(b"", max_length=1)
                    break
                rest = decompressor.unused_data
    except _errors() as error:
        raise CorruptImageError(where, offset, f"compressed cluster cannot be decompressed: {error}") from None
    if more:
        raise CorruptImageError(where, offset, "compressed cluster decompresses to more than a cluster")
    if len(out) != cluster_size:
        raise CorruptImageError(
            where, offset, f"compressed cluster decompresses to {len(out)} bytes instead of {cluster_size}"
        )
    return out


def compress_cluster(data: bytes | memoryview, compression_type: int) -> bytes:
    """Compress one cluster as qcow2 stores it (raw deflate with a 12-bit window, or a zstd frame).

    Releases the GIL while compressing, so clusters compress in parallel on threads.
    """
    if compression_type == 0:
        deflater = DEFLATE.compressobj(_LEVEL, zlib.DEFLATED, -12)
        packed: bytes = deflater.compress(data) + deflater.flush()
        return packed
    compressor = getattr(_zstd_compressors, "compressor", None)
    if compressor is None:
        compressor = _zstd_compressors.compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL)
    frame: bytes = compressor.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)
    return frame
