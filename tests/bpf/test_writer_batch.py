"""The batch helpers (ebpfsvc.datapath.batch) fall back to per-entry operations when the
kernel refuses a batch (no root: a map fd of -1 makes every batch fail)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ebpfsvc.datapath import batch, loader


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


def test_clear_falls_back_to_zeroing_every_array_slot():
    t = FakeTable({0: 5, 2: 7})
    t.ttype, t.max_entries = 2, 3        # BPF_MAP_TYPE_ARRAY
    batch.clear(t)
    assert dict(t) == {0: 0, 1: 0, 2: 0}


@pytest.mark.root
def test_clear_puts_every_datapath_map_back_as_created(datapath):
    """One entry in every map of the datapath (hash, LRU, LPM trie, array, per-CPU array), with
    every byte of key and value set where the type allows; after clear() hash-like maps are empty
    and every array slot reads zero on every CPU."""
    for name in loader.MAPS:
        table = datapath.maps[name]
        key, leaf = table.Key(), table.Leaf()
        ctypes.memset(ctypes.addressof(leaf), 0x5A, ctypes.sizeof(leaf))
        if table.ttype in (2, 6):        # arrays: the last slot
            key = table.Key(table.max_entries - 1)
        elif name == "lb4_source_ranges":
            key.prefixlen, key.frontend_id, key.address = 64, 7, 0x0A000000
        elif name == "lb6_source_ranges":      # an LPM key's prefix length must fit the key
            key.prefixlen, key.frontend_id = 32 + 64, 7
            key.address[:] = (0x02000120, 0, 0, 0)
        else:
            ctypes.memset(ctypes.addressof(key), 0x5A, ctypes.sizeof(key))
        table[key] = leaf
        assert bytes(table[key]) == bytes(leaf), name
    for name in loader.MAPS:
        batch.clear(datapath.maps[name])
    for name in loader.MAPS:
        table = datapath.maps[name]
        if table.ttype in (2, 6):
            assert all(not any(bytes(v)) for _, v in table.items()), f"{name}: a slot is not zero"
            assert len(list(table.keys())) == table.max_entries
        else:
            assert list(table.keys()) == [], f"{name}: entries left"


def test_records_and_zeroed_ids_fall_back_per_entry():
    t = FakeTable()
    batch.update_records(t, [1, 2], [10, 20])
    assert dict(t) == {1: 10, 2: 20}
    batch.zero_percpu_ids(t, [2, 3])
    assert dict(t) == {1: 10, 2: 0, 3: 0}
    batch.update_records(t, [], [])
    assert dict(t) == {1: 10, 2: 0, 3: 0}


def test_records_of_a_char_array_leaf_are_ctypes_bytes():
    """lb_service_names' values go as bytes: NUL-padded as a ctypes Leaf is, and a text longer
    than the field refused, as ctypes refuses it (numpy alone would cut it short)."""
    class Name(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char * 16)]

    texts = [b"ns/a:http/TCP", b"", b"x" * 16]
    packed = batch._records(Name, texts)
    assert packed.tobytes() == b"".join(bytes(Name(t)) for t in texts)
    with pytest.raises(ValueError):
        batch._records(Name, [b"ns/a", b"x" * 17])
    with pytest.raises(ValueError):
        Name(b"x" * 17)
