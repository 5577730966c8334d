import random

from imago.format.extents import Extent, ExtentCache
from imago_null import Null

STORAGE = Null(1 << 40)


def extent(start: int, end: int, delta: int = 0) -> Extent:
    return Extent(start, end, STORAGE, delta)


def test_find_inside_and_outside() -> None:
    cache = ExtentCache(0)
    cache.add(extent(100, 200, 5))
    assert cache.find(100, 100) == extent(100, 200, 5)
    assert cache.find(150, 10) == extent(100, 200, 5)
    assert cache.find(99, 1) is None
    assert cache.find(150, 51) is None
    assert cache.find(200, 1) is None


def test_a_run_seen_from_lower_offsets_replaces_the_entries_it_covers() -> None:
    cache = ExtentCache(0)
    cache.add(extent(500, 1000))
    cache.add(extent(300, 1000))
    cache.add(extent(100, 1000))
    assert cache.extents == [extent(100, 1000)]
    cache.add(extent(400, 1000))  # contained: nothing changes
    assert cache.extents == [extent(100, 1000)]


def test_disjoint_extents_are_kept_sorted() -> None:
    cache = ExtentCache(0)
    for start in (5000, 1000, 3000):
        cache.add(extent(start, start + 500, start))
    assert cache.starts == [1000, 3000, 5000]
    assert cache.find(3100, 10) == extent(3000, 3500, 3000)
    assert cache.find(2000, 10) is None


def test_the_cache_starts_over_when_full() -> None:
    cache = ExtentCache(0)
    for index in range(64):
        cache.add(extent(index * 10, index * 10 + 5))
    assert len(cache.extents) == 64
    cache.add(extent(10000, 10005))
    assert cache.extents == [extent(10000, 10005)]


def test_random_extents_never_answer_wrongly() -> None:
    rng = random.Random(3)
    cache = ExtentCache(0)
    added: list[Extent] = []
    for _ in range(2000):
        start = rng.randrange(100000)
        new = extent(start, start + rng.randrange(1, 5000), rng.randrange(1 << 20))
        # Overlapping extents must agree on the mapping: derive delta from the position's "run".
        new = new._replace(delta=0)
        cache.add(new)
        added.append(new)
        offset, length = rng.randrange(100000), rng.randrange(1, 100)
        found = cache.find(offset, length)
        if found is not None:
            assert found.start <= offset
            assert offset + length <= found.end
            assert found in added
