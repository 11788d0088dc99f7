"""``pagedllm.core.heap``: the start's heap frozen out of the collector's scans, and collections timed."""

from __future__ import annotations

import gc
import weakref

from pagedllm.core.heap import GcPauses, freeze_heap, frozen_heap


class Node:
    """An object that can sit in a reference cycle and be watched through a weak reference."""

    def __init__(self) -> None:
        self.me = self


def test_freeze_heap_moves_the_live_objects_out_of_reach() -> None:
    try:
        assert freeze_heap() == gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_frozen_heap_keeps_cycles_until_it_ends() -> None:
    node = Node()
    watch = weakref.ref(node)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del node  # a cycle: only the collector can free it, and it no longer scans frozen objects
        gc.collect()
        assert watch() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert watch() is None


def test_frozen_heap_disabled_freezes_nothing() -> None:
    with frozen_heap(enabled=False):
        assert gc.get_freeze_count() == 0


def test_gc_pauses_counts_and_times_collections() -> None:
    with GcPauses() as pauses:
        gc.collect()
        gc.collect(0)
    assert pauses.count[2] == 1 and pauses.count[0] >= 1
    assert pauses.seconds[2] > 0.0
    assert pauses.summary().startswith("1 full (")
    assert pauses._callback not in gc.callbacks
