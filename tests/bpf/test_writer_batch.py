"""The batch helpers (ebpfsvc.datapath.batch) fall back to per-entry operations when the
kernel refuses a batch (no root: a map fd of -1 makes every batch fail)."""

from __future__ import annotations

import ctypes

import numpy as np

from ebpfsvc.datapath import batch


class FakeTable(dict):
    """Enough of a bcc table: Key/Leaf ctypes, a map fd, item access."""

    Key = ctypes.c_uint32
    Leaf = ctypes.c_uint32
    map_fd = -1

    def __setitem__(self, k, v):
        super().__setitem__(k.value, v.value)

    def __delitem__(self, k):
        super().__delitem__(k.value)

    def __getitem__(self, k):
        return self.Leaf(super().__getitem__(k.value))


def test_update_falls_back_per_entry():
    t = FakeTable()
    batch.update_batch(t, [(t.Key(1), t.Leaf(10)), (t.Key(2), t.Leaf(20))])
    assert dict(t) == {1: 10, 2: 20}


def test_delete_falls_back_and_ignores_missing():
    t = FakeTable({1: 10, 2: 20})
    batch.delete_batch(t, [t.Key(1), t.Key(3)])
    assert dict(t) == {2: 20}


def test_array_update_and_read_fall_back():
    t = FakeTable()
    batch.update_u32_array(t, np.array([5, 6, 7], dtype=np.uint32), np.array([50, 60, 70], dtype=np.uint32))
    assert dict(t) == {5: 50, 6: 60, 7: 70}
    t.update({i: 0 for i in range(5)})
    assert batch.read_u32_array(t, 8).tolist() == [0, 0, 0, 0, 0, 50, 60, 70]


def test_empty_batches_touch_nothing():
    t = FakeTable()
    batch.update_batch(t, [])
    batch.delete_batch(t, [])
    assert batch.read_u32_array(t, 0).size == 0 and dict(t) == {}


def test_records_and_zeroed_ids_fall_back_per_entry():
    t = FakeTable()
    batch.update_records(t, [1, 2], [10, 20])
    assert dict(t) == {1: 10, 2: 20}
    batch.zero_percpu_ids(t, [2, 3])
    assert dict(t) == {1: 10, 2: 0, 3: 0}
    batch.update_records(t, [], [])
    assert dict(t) == {1: 10, 2: 0, 3: 0}
