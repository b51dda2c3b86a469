"""ebpfsvc.heap.bulk: the cycle collector paused during bulk work, back after, nesting and threads."""

from __future__ import annotations

import gc
import threading

from ebpfsvc import heap


def test_bulk_pauses_the_collector_and_nests():
    assert gc.isenabled()
    with heap.bulk():
        assert not gc.isenabled()
        with heap.bulk():
            assert not gc.isenabled()
        assert not gc.isenabled()          # the outer section is still running
    assert gc.isenabled()


def test_bulk_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with heap.bulk():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bulk_across_threads_enables_when_the_last_section_ends():
    inside, release = threading.Event(), threading.Event()

    def other():
        with heap.bulk():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with heap.bulk():
        pass
    assert not gc.isenabled()              # the other thread's section still runs
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_bulk_restores_the_collector_when_the_block_raises():
    try:
        with heap.bulk():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()


def test_what_a_bulk_section_made_is_frozen_when_it_ends():
    gc.unfreeze()
    try:
        with heap.bulk():
            made = [[i] for i in range(1000)]
        assert gc.get_freeze_count() >= 1000 and gc.isenabled()
        assert all(not any(o is m for o in gc.get_objects()) for m in made[:3])
    finally:
        gc.unfreeze()


def test_bulk_for_pauses_only_for_more_than_the_bulk_minimum():
    # One threshold for every stage (tracker, desired state, admission): small work, an endpoint
    # change, keeps the collector; a full sync's does not.
    assert gc.isenabled()
    with heap.bulk_for(heap.BULK_MIN):
        assert gc.isenabled()
    with heap.bulk_for(heap.BULK_MIN + 1):
        assert not gc.isenabled()
    assert gc.isenabled()
