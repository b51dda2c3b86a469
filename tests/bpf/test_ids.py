"""Id and slot-range allocation (pure Python: no root needed)."""

from __future__ import annotations

import pytest

from ebpfsvc.datapath.ids import IdAllocator, IdExhausted, SlotRanges


def test_fresh_ids_before_released_ones():
    ids = IdAllocator(5)
    a, b = ids.allocate(), ids.allocate()
    assert (a, b) == (1, 2)
    ids.release(a)
    assert ids.allocate() == 3          # a released id waits while fresh ones remain
    assert ids.allocate() == 4
    assert ids.allocate() == 1          # then the oldest released
    with pytest.raises(IdExhausted):
        ids.allocate()


def test_ids_rebuilt_from_use():
    ids = IdAllocator(10, [2, 5])
    assert [ids.allocate() for _ in range(4)] == [6, 7, 8, 9]
    assert [ids.allocate() for _ in range(3)] == [1, 3, 4]   # holes left by a previous run


def test_many_ids_at_once_are_the_ids_one_at_a_time():
    for limit, used, releases, count in ((10, [2, 5], [], 7), (10, [2, 5], [7, 6], 6), (6, [], [3], 3), (4, [], [], 0)):
        one, many = IdAllocator(limit, used), IdAllocator(limit, used)
        if releases:
            assert [one.allocate() for _ in range(3)] == many.allocate_many(3)
        for ident in releases:
            one.release(ident)
            many.release(ident)
        assert many.allocate_many(count) == [one.allocate() for _ in range(count)]
        assert many.allocate_many(0) == [] and many._next == one._next and list(many._released) == list(one._released)
    full = IdAllocator(4, [1])
    with pytest.raises(IdExhausted):
        full.allocate_many(3)
    assert full.allocate_many(2) == [2, 3]     # nothing was taken by the refused call


def test_ids_out_of_range_rejected():
    with pytest.raises(ValueError):
        IdAllocator(4, [4])


def test_ranges_first_fit_and_merge():
    r = SlotRanges(100)
    a, b, c = r.allocate(30), r.allocate(30), r.allocate(30)
    assert (a, b, c) == (0, 30, 60) and r.free_slots == 10
    r.release(b, 30)
    with pytest.raises(IdExhausted):
        r.allocate(40)
    r.release(a, 30)                     # merges with b's run: 60 contiguous
    assert r.allocate(55) == 0
    r.release(0, 55)
    r.release(c, 30)
    assert r.free_slots == 100 and r.allocate(100) == 0


def test_ranges_rebuilt_from_use():
    r = SlotRanges(50, [(10, 5), (30, 10)])
    assert r.free_slots == 35
    assert r.allocate(15) == 15          # the gap between the two used ranges
    with pytest.raises(ValueError):
        SlotRanges(50, [(10, 10), (15, 5)])

