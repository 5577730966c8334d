"""MemoryBudget and MetadataCache(budget=...): one cap over every cache of a chain, whole tables held."""

from __future__ import annotations

import gc
from typing import Any

import pytest

import imago
from imago import InvalidOptionError, MemoryBudget, MetadataCache, ResourceLimitError, runtime
from imago.budget import DEFAULT_CACHE_SIZE, DEFAULT_MEMORY_LIMIT, MIN_CACHE_SIZE

ENTRY = MIN_CACHE_SIZE // 4  # a budget of MIN_CACHE_SIZE holds four entries


class Entry:
    """A cached value (weak-referenceable, as the cache's hand-back needs)."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.version = 0


class Store:
    """What caches load from and write to, counting both."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.name = f"store{id(self):x}"
        self.log = log
        self.loads: list[int] = []
        self.written: dict[int, int] = {}

    async def load(self, key: int) -> Entry:
        self.loads.append(key)
        entry = Entry(key)
        entry.version = self.written.get(key, 0)
        return entry

    async def write(self, key: int, entry: Entry) -> None:
        self.written[key] = entry.version
        self.log.append((self.name, key))


def make_cache(
    budget: MemoryBudget, store: Store, *, capacity: int | None = None, entry_size: int = ENTRY
) -> MetadataCache[int, Entry]:
    return MetadataCache(capacity, store.load, store.write, budget=budget, entry_size=entry_size, name=store.name)


def run(coro: Any) -> Any:
    return runtime.run_sync(coro)


# --- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0, MIN_CACHE_SIZE - 1, True, 1.5, "32M", None])
def test_cache_size_refused(value: object) -> None:
    with pytest.raises(InvalidOptionError) as info:
        MemoryBudget(cache_size=value)  # type: ignore[arg-type]
    assert info.value.option == "cache_size"


@pytest.mark.parametrize("value", [-5, 0, False, 2.0])
def test_memory_limit_refused(value: object) -> None:
    with pytest.raises(InvalidOptionError) as info:
        MemoryBudget(memory_limit=value)  # type: ignore[arg-type]
    assert info.value.option == "memory_limit"


def test_defaults() -> None:
    budget = MemoryBudget()
    assert (
        (budget.cache_size, budget.memory_limit) == (DEFAULT_CACHE_SIZE, DEFAULT_MEMORY_LIMIT) == (32 << 20, 512 << 20)
    )
    assert (budget.cached, budget.held, budget.peak_cached) == (0, 0, 0)


def test_builder_options_validated_and_shared_down_the_chain(tmp_path: Any) -> None:
    raw = imago.format_driver("raw")
    top = raw.builder_path(tmp_path / "top.img")
    for option, value in [("cache_size", -1), ("cache_size", 1000), ("memory_limit", 0), ("memory_limit", "1G")]:
        with pytest.raises(InvalidOptionError) as info:
            getattr(top, option)(value)
        assert info.value.option == option
    top.cache_size(1 << 20).memory_limit(5 << 20)
    assert (top.budget.cache_size, top.budget.memory_limit) == (1 << 20, 5 << 20)
    below = raw.builder_path(tmp_path / "base.img").below(top)
    deeper = raw.builder_path(tmp_path / "base2.img").below(below)
    assert below.budget is top.budget is deeper.budget
    # Set again: a new budget with the new values.
    top.cache_size(2 << 20)
    assert top.budget.cache_size == 2 << 20
    assert top.budget is not below.budget
    assert raw.builder_path(tmp_path / "other.img").budget.cache_size == DEFAULT_CACHE_SIZE


def test_open_refuses_bad_options(tmp_path: Any) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(InvalidOptionError, match="cache_size"):
        imago.open(path, "raw", cache_size=-1)
    with pytest.raises(InvalidOptionError, match="memory_limit"):
        imago.open(path, "raw", memory_limit=0)
    with imago.open(path, "raw", cache_size=1 << 20, memory_limit=1 << 20) as disk:
        buf = bytearray(b"x" * 16)
        disk.read(buf, 0)
        assert buf == bytes(16)


# --- whole tables -----------------------------------------------------------------------------------


def test_hold_and_release() -> None:
    budget = MemoryBudget(memory_limit=1000)
    budget.hold("a.qcow2", "its L1 table", 600)
    with pytest.raises(ResourceLimitError) as info:
        budget.hold("b.qcow2", "its L1 table", 401)
    error = info.value
    assert (error.filename, error.what, error.nbytes, error.held, error.limit) == (
        "b.qcow2",
        "its L1 table",
        401,
        600,
        1000,
    )
    assert "b.qcow2" in str(error)
    assert "its L1 table" in str(error)
    assert "401" in str(error)
    assert isinstance(error, imago.ImagoError)
    assert budget.held == 600  # nothing granted by the refusal
    budget.hold("b.qcow2", "its L1 table", 400)
    budget.release(1000)
    assert budget.held == 0
    with pytest.raises(ValueError, match="cannot release"):
        budget.release(1)
    with pytest.raises(ValueError, match="negative"):
        budget.hold("c", "x", -1)


# --- caches in a budget -----------------------------------------------------------------------------


def test_cache_needs_capacity_or_budget() -> None:
    store = Store([])
    with pytest.raises(ValueError, match="needs a capacity"):
        MetadataCache(None, store.load)
    with pytest.raises(ValueError, match="entry size"):
        MetadataCache(None, store.load, budget=MemoryBudget())
    with pytest.raises(InvalidOptionError) as info:
        make_cache(MemoryBudget(cache_size=MIN_CACHE_SIZE), store, entry_size=MIN_CACHE_SIZE // 2 + 1)
    assert info.value.option == "cache_size"
    assert store.name in str(info.value)


def test_caches_share_one_cap_least_recently_used_first() -> None:
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)  # four entries: three loaded, room for one put
    one, two = Store([]), Store([])
    first, second = make_cache(budget, one), make_cache(budget, two)

    async def work() -> None:
        for key in range(3):
            await first.get(key)
        assert budget.headroom == ENTRY
        assert budget.cached == 3 * ENTRY
        await first.get(0)  # used: evicted last
        await second.get(0)  # evicts first's key 1, the least recently used
        assert list(first._entries) == [2, 0]
        assert 1 not in first
        assert one.loads == [0, 1, 2]
        assert two.loads == [0]
        for key in range(100):  # a scan through both caches: never more than the cap
            await (second if key % 3 else first).get(key)
            assert budget.cached + budget.headroom <= budget.cache_size
            assert first.nbytes + second.nbytes == budget.cached
        assert len(first) + len(second) == 3

    run(work())
    assert budget.peak_cached == 3 * ENTRY


def test_dirty_entries_written_back_in_dependency_order() -> None:
    """Evicting an L2-like entry flushes the refcount-like cache it depends on first."""
    log: list[tuple[str, int]] = []
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)
    blocks_store, tables_store = Store(log), Store(log)
    blocks_store.name, tables_store.name = "blocks", "tables"
    blocks = make_cache(budget, blocks_store)
    tables = make_cache(budget, tables_store)
    tables.depends_on(blocks)

    async def work() -> None:
        table = await tables.get(1)
        table.version = 1
        tables.mark_dirty(1)
        block = await blocks.get(7)
        block.version = 1
        blocks.mark_dirty(7)
        await tables.get(2)
        assert log == []
        # Full: loading evicts the oldest, table 1, written after the block it depends on.
        await tables.get(3)
        assert log == [("blocks", 7), ("tables", 1)]
        assert 1 not in tables
        assert 7 in blocks
        assert not blocks.dirty
        assert budget.cached <= budget.cache_size

    run(work())
    assert blocks_store.written == {7: 1}
    assert tables_store.written == {1: 1}


def test_tiny_budget_two_entries() -> None:
    """A budget of two entries keeps one loaded (and room for one put); dirty ones still written."""
    log: list[tuple[str, int]] = []
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)
    store = Store(log)
    cache = make_cache(budget, store, entry_size=MIN_CACHE_SIZE // 2)

    async def work() -> None:
        for key in range(10):
            entry = await cache.get(key)
            entry.version = key + 1
            cache.mark_dirty(key)
            assert len(cache) == 1
            assert budget.cached <= budget.cache_size
        await cache.flush()

    run(work())
    assert store.written == {key: key + 1 for key in range(10)}
    assert budget.peak_cached == MIN_CACHE_SIZE // 2


def test_evicted_entry_still_held_is_handed_back() -> None:
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)
    store = Store([])
    cache = make_cache(budget, store)

    async def work() -> None:
        held = await cache.get(0)
        for key in range(1, 5):  # evicts 0 (clean) while we hold it
            await cache.get(key)
        assert 0 not in cache
        held.version = 5  # changed while evicted ...
        cache.mark_dirty(0)  # ... and taken back
        assert cache.peek(0) is held
        assert cache.is_dirty(0)
        assert await cache.get(0) is held
        for key in range(1, 5):  # evicted again, dirty: written back
            await cache.get(key)
        assert store.written == {0: 5}
        assert await cache.get(0) is held  # not read again while we hold it
        assert budget.cached <= budget.cache_size

    run(work())
    assert store.loads.count(0) == 1


def test_evicted_entry_gone_when_nobody_holds_it() -> None:
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)
    store = Store([])
    cache = make_cache(budget, store)

    async def work() -> None:
        await cache.get(0)
        for key in range(1, 5):
            await cache.get(key)
        gc.collect()
        with pytest.raises(KeyError):
            cache.mark_dirty(0)
        await cache.get(0)

    run(work())
    assert store.loads.count(0) == 2


def test_discard_forgets_a_held_entry() -> None:
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)
    store = Store([])
    cache = make_cache(budget, store)

    async def work() -> None:
        held = await cache.get(0)
        for key in range(1, 5):
            await cache.get(key)
        cache.discard(0)  # (the cluster was freed: what was read from it is stale)
        assert await cache.get(0) is not held
        cache.clear()
        assert (len(cache), cache.nbytes, budget.cached) == (0, 0, 0)

    run(work())


def test_put_makes_room_from_clean_entries_and_flush_restores_the_cap() -> None:
    budget = MemoryBudget(cache_size=MIN_CACHE_SIZE)  # four entries, one of them room for a put
    store = Store([])
    cache = make_cache(budget, store)

    async def work() -> None:
        for key in range(3):
            await cache.get(key)
        cache.mark_dirty(2)
        cache.put(10, Entry(10), dirty=True)  # fits; the oldest clean entry (0) goes, for the next put
        assert list(cache._entries) == [1, 2, 10]
        assert budget.cached == 3 * ENTRY
        cache.mark_dirty(1)
        cache.put(11, Entry(11), dirty=True)  # the room taken: at the cap, nothing clean to drop
        assert budget.cached == budget.cache_size
        cache.put(12, Entry(12), dirty=True)  # over until written back
        assert budget.cached > budget.cache_size
        await cache.flush()
        assert budget.cached + budget.headroom <= budget.cache_size
        assert set(store.written) == {1, 2, 10, 11, 12}
        cache.put(13, Entry(13))  # clean: the oldest clean entry makes room
        assert budget.cached + budget.headroom <= budget.cache_size

    run(work())


def test_capacity_alone_still_works() -> None:
    store = Store([])
    cache: MetadataCache[int, Entry] = MetadataCache(2, store.load, store.write)

    async def work() -> None:
        first = await cache.get(0)
        first.version = 3
        cache.mark_dirty(0)
        await cache.get(1)
        await cache.get(2)  # evicts 0, written back
        assert len(cache) == 2
        assert store.written == {0: 3}
        assert cache.nbytes == 0
        assert cache.budget is None

    run(work())
