"""Cluster compression: deflate (zlib) and zstd, as qcow2 stores them."""

from __future__ import annotations

import sys
import zlib

from imago import CorruptImageError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

__all__ = ["compress_cluster", "decompress_cluster"]


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
            inflater = zlib.decompressobj(-15)
            out = inflater.decompress(data, cluster_size)
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
    except (zlib.error, zstd.ZstdError) as error:
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
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        return deflater.compress(data) + deflater.flush()
    return zstd.compress(data)
