"""Compressed clusters (:mod:`imago_qcow2.compressed`) against qemu-img.

Requests that mix clusters that shrink with clusters that do not (written as ordinary
clusters, in runs), compressed data packed across many small requests with narrow refcounts,
and reads of compressed clusters through a read-only open (the storage's memory map) and a
writable one (a copy).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import imago

from . import _qemu

CLUSTER = 4096


def _cluster_kinds(path: Path, size: int) -> list[str]:
    """What ``qemu-img map`` says each cluster of *path* is: compressed, data or zero."""
    kinds = []
    for run in _qemu.qemu_runs(_qemu.qemu_map(path)):
        kinds += [run.kind] * -(-min(run.length, size - run.start) // CLUSTER)
    return kinds


def _mixed(pattern: str, tail: int) -> bytes:
    """One cluster per letter (t: text-like, r: random), the last one cut to *tail* bytes."""
    parts = [
        _qemu.restricted_bytes(CLUSTER, seed, 4) if letter == "t" else _qemu.random_bytes(CLUSTER, seed)
        for seed, letter in enumerate(pattern)
    ]
    parts[-1] = parts[-1][:tail]
    return b"".join(parts)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize(("pattern", "tail"), [("trrtrttrrrt", CLUSTER // 2), ("rtrrtttrttr", CLUSTER - 512)])
def test_mixed_request_is_stored_as_qemu_img_stores_it(
    tmp_path: Path, compression: str, pattern: str, tail: int
) -> None:
    # One request: clusters that do not shrink become ordinary clusters (runs of them written
    # together), the others compressed; the short last cluster at the end of the disk too
    # (padded with zeroes, it may shrink where a whole cluster of the same data would not).
    data = _mixed(pattern, tail)
    raw = tmp_path / "source.raw"
    raw.write_bytes(data)
    mine, theirs = tmp_path / "imago.qcow2", tmp_path / "qemu.qcow2"
    imago.create(mine, format="qcow2", size=len(data), cluster_size=CLUSTER, compression_type=compression)
    with imago.open(mine, format="qcow2", write=True) as image:
        image.write_compressed(data, 0)
    _qemu.qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER},compression_type={compression}",
        raw, theirs,
    )  # fmt: skip
    kinds = _cluster_kinds(mine, len(data))
    assert kinds == _cluster_kinds(theirs, len(data))
    assert kinds[:-1] == ["compressed" if letter == "t" else "data" for letter in pattern[:-1]]
    _qemu.qemu_img("compare", "-q", raw, mine)
    _qemu.check(mine)  # clean, and imago's own check agrees


@pytest.mark.parametrize("refcount_bits", [2, 16])
def test_small_requests_pack_across_requests(tmp_path: Path, refcount_bits: int) -> None:
    # One cluster per request, some of them not shrinking: the compressed data of consecutive
    # requests shares host clusters (straddling into the next one where it is free) as long
    # as the refcounts can count the references.
    clusters = 48
    path = tmp_path / "small.qcow2"
    imago.create(path, format="qcow2", size=clusters * CLUSTER, cluster_size=CLUSTER, refcount_bits=refcount_bits)
    data = bytearray()
    with imago.open(path, format="qcow2", write=True) as image:
        for index in range(clusters):
            if index % 7 == 3:
                chunk = _qemu.random_bytes(CLUSTER, index)
            else:
                chunk = _qemu.restricted_bytes(CLUSTER, index, 1 + index % 3)  # about 1/8 to 3/8
            image.write_compressed(chunk, index * CLUSTER)
            data += chunk
    report = _qemu.check(path)  # refcounts exact: no leak, no overcount
    assert report["compressed-clusters"] == clusters - len(range(3, clusters, 7))
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    _qemu.qemu_img("compare", "-q", raw, path)
    host_clusters = report["image-end-offset"] // CLUSTER - 5  # less header, refcount table and block, L1, L2
    if refcount_bits == 16:
        assert host_clusters < clusters // 2


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("write", [False, True])
def test_reads_of_compressed_clusters(tmp_path: Path, compression: str, write: bool) -> None:
    # Read-only opens decompress straight from the storage's memory map, writable ones from a
    # copy: both read what qemu-img wrote, whole or in pieces across cluster boundaries.
    data = _mixed("ttrtttrt", CLUSTER)
    raw = tmp_path / "source.raw"
    raw.write_bytes(data)
    path = tmp_path / "qemu.qcow2"
    _qemu.qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER},compression_type={compression}",
        raw, path,
    )  # fmt: skip
    with imago.open(path, format="qcow2", write=write) as image:
        whole = bytearray(len(data))
        image.read(whole, 0)
        assert whole == data
        for offset, length in ((100, 50), (CLUSTER - 10, 30), (CLUSTER + 1, 3 * CLUSTER), (0, 5 * CLUSTER + 7)):
            piece = bytearray(length)
            image.read(piece, offset)
            assert piece == data[offset : offset + length], (offset, length)


def test_damaged_cluster_fails_the_read_after_every_cluster_is_done(tmp_path: Path) -> None:
    # A read-only image's compressed data is decompressed straight from a memory map, on all
    # cores. When one cluster is damaged, the read fails only once no thread looks at the map
    # any more: the file may then be truncated at once (pages past the end of a mapped file
    # would kill the process with SIGBUS).
    cluster = 64 << 10
    clusters = 64
    raw = tmp_path / "source.raw"
    raw.write_bytes(_qemu.restricted_bytes(clusters * cluster, 1, 4))
    path = tmp_path / "damaged.qcow2"
    _qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    image = bytearray(path.read_bytes())
    l1 = int.from_bytes(image[40:48], "big")
    l2 = int.from_bytes(image[l1 : l1 + 8], "big") & 0x00FF_FFFF_FFFF_FE00
    descriptor = int.from_bytes(image[l2 : l2 + 8], "big")
    assert descriptor >> 62 & 1  # compressed
    host = descriptor & ((1 << (62 - (16 - 8))) - 1)
    image[host : host + 16] = b"\xff" * 16  # deflate block type 3: invalid
    path.write_bytes(image)
    with imago.open(path, format="qcow2") as disk:
        whole = bytearray(clusters * cluster)
        with pytest.raises(imago.CorruptImageError, match="cannot be decompressed"):
            disk.read(whole, 0)
        os.truncate(path, 0)
        time.sleep(0.05)  # (a thread still decompressing would fault here)
