"""Batched access to bcc tables, with a per-entry fallback when the kernel
refuses a batch (older kernels, map types without batch ops).

bcc's own items_update_batch wants ctypes arrays built element by element; these
take ctypes Key/Leaf objects for hash maps and numpy arrays for u32 ARRAY maps
(Maglev tables are millions of slots), one syscall per batch.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import mmap
import os
from typing import Callable

import numpy as np

from ebpfsvc.abi import slots_per_element


def _lib():
    from bcc.libbcc import lib
    return lib


def update_batch(table, items: list) -> None:
    if not items:
        return
    n = len(items)
    keys = (table.Key * n)(*(k for k, _ in items))
    vals = (table.Leaf * n)(*(v for _, v in items))
    count = ct.c_uint32(n)
    if _lib().bpf_update_batch(table.map_fd, ct.byref(keys), ct.byref(vals), ct.byref(count)) == 0:
        return
    for k, v in items:          # e.g. a kernel without batch ops for this map type
        table[k] = v


def delete_batch(table, keys: list) -> None:
    if not keys:
        return
    n = len(keys)
    arr = (table.Key * n)(*keys)
    count = ct.c_uint32(n)
    if _lib().bpf_delete_batch(table.map_fd, ct.byref(arr), ct.byref(count)) == 0:
        return
    for k in keys:
        try:
            del table[k]
        except KeyError:
            pass                # already gone: the goal is reached


def update_u32_array(table, keys: np.ndarray, vals: np.ndarray) -> None:
    """Entries keys[i] -> vals[i] of an ARRAY map whose values are u32 words: `vals` has a row of
    words per key (a plain vector for one-word values)."""
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    vals = np.ascontiguousarray(vals, dtype=np.uint32)
    count = ct.c_uint32(int(keys.size))
    if _lib().bpf_update_batch(table.map_fd, keys.ctypes.data, vals.ctypes.data, ct.byref(count)) == 0:
        return
    for k, v in zip(keys.tolist(), vals.reshape(keys.size, -1)):
        table[table.Key(k)] = table.Leaf.from_buffer_copy(v.tobytes())


def read_u32_array(table, n: int, words: int = 1) -> np.ndarray:
    """Entries [0, n) of a u32 -> u32 ARRAY map (`words` > 1: values of that many u32s, a row
    each), by batch lookup where possible."""
    out = np.zeros((n, words) if words > 1 else n, dtype=np.uint32)
    if n == 0:
        return out
    chunk = min(n, 1 << 16)
    keys = np.zeros(chunk, dtype=np.uint32)
    vals = np.zeros((chunk, words) if words > 1 else chunk, dtype=np.uint32)
    lib = _lib()
    token = ct.c_uint32(0)
    next_token = ct.c_uint32(0)
    pos = 0
    first = True
    while pos < n:
        count = ct.c_uint32(min(chunk, n - pos))
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(token), ct.byref(next_token),
                                   keys.ctypes.data, vals.ctypes.data, ct.byref(count))
        err = ct.get_errno()
        if res != 0 and err != errno.ENOENT:
            if pos == 0:        # no batch support: read element by element
                rows = out.reshape(n, -1)       # a view: one row of words per entry
                for i in range(n):
                    rows[i] = np.frombuffer(bytes(table[table.Key(i)]), dtype=np.uint32)
                return out
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        got = count.value
        idx = keys[:got]
        sel = idx < n
        out[idx[sel]] = vals[:got][sel]
        pos += got
        if res != 0 or got == 0:   # ENOENT: the end of the map
            break
        token.value = next_token.value
        first = False
    return out


def update_records(table, keys: list, values: list, later: Callable | None = None) -> None:
    """Many entries in one BPF_MAP_UPDATE_BATCH from plain values, packed by numpy in the layout
    of bcc's ctypes Key/Leaf (no ctypes object per entry): a key is an int or a tuple of the Key
    struct's fields, a value a tuple of the Leaf struct's leading fields (the rest, padding, 0),
    or bytes: a whole Leaf of one char array (lb_service_names'), NUL-padded.

    With `later`, the records are packed here and their write is handed to it,
    `later(write_records, table, keys, values)` with the packed arrays (MapWriter's writes
    behind a large apply, datapath/writer.py)."""
    if not keys:
        return
    karr, varr = _records(table.Key, keys), _records(table.Leaf, values)
    if later is not None:
        later(write_records, table, karr, varr)
    else:
        write_records(table, karr, varr)


def write_records(table, karr: np.ndarray, varr: np.ndarray) -> None:
    """update_records' write of its packed keys and values: one syscall (ctypes lets go of the
    GIL meanwhile), or an update per entry where the kernel has no batch op for the map."""
    count = ct.c_uint32(len(karr))
    if _lib().bpf_update_batch(table.map_fd, karr.ctypes.data, varr.ctypes.data, ct.byref(count)) == 0:
        return
    for i in range(len(karr)):  # e.g. a kernel without batch ops for this map type
        table[table.Key.from_buffer_copy(karr[i:i + 1].tobytes())] = table.Leaf.from_buffer_copy(varr[i:i + 1].tobytes())


_DTYPES: dict = {}      # ctypes type -> numpy dtype (numpy derives it in Python: 0.1 ms each time)


def _records(ctype, rows: list) -> np.ndarray:
    dtype = _DTYPES.get(ctype)
    if dtype is None:
        dtype = _DTYPES[ctype] = np.dtype(ctype)
    if type(rows[0]) is bytes:
        # numpy would cut a longer text to the size without a word: refuse it as ctypes does.
        if max(map(len, rows)) > dtype.itemsize:
            raise ValueError(f"a value longer than {dtype.itemsize} bytes")
        return np.array(rows, dtype=f"S{dtype.itemsize}").view(dtype)
    out = np.zeros(len(rows), dtype=dtype)
    if dtype.names is None:
        out[:] = rows
    else:
        # The rows, whole, into a view of the struct's leading fields (numpy packs each tuple in C);
        # the rest (padding) stays 0.
        out.view(_leading(dtype, len(rows[0])))[:] = rows
    return out


@functools.lru_cache(maxsize=64)
def _leading(dtype: np.dtype, n: int) -> np.dtype:
    """`dtype` with only its first `n` fields, at their offsets, of the same size."""
    names = dtype.names[:n]
    return np.dtype({"names": names, "formats": [dtype.fields[k][0] for k in names],
                     "offsets": [dtype.fields[k][1] for k in names], "itemsize": dtype.itemsize})


def zero_percpu_ids(table, idents: list[int], later: Callable | None = None) -> None:
    """zero_percpu for many ids in one BPF_MAP_UPDATE_BATCH (bcc's Leaf of a per-CPU map is the
    kernel's whole value: a slot per possible CPU); with `later`, the keys and zeros are made here
    and their write handed to it, as update_records' is."""
    if not idents:
        return
    keys = np.asarray(idents, dtype=np.uint32)
    zeros = np.zeros(len(idents) * ct.sizeof(table.Leaf), dtype=np.uint8)
    if later is not None:
        later(_write_zeros, table, keys, zeros)
    else:
        _write_zeros(table, keys, zeros)


def _write_zeros(table, keys: np.ndarray, zeros: np.ndarray) -> None:
    count = ct.c_uint32(len(keys))
    if _lib().bpf_update_batch(table.map_fd, keys.ctypes.data, zeros.ctypes.data, ct.byref(count)) == 0:
        return
    for ident in keys.tolist():
        zero_percpu(table, ident)


# ---- lb_maglev: Maglev slots, two to an element (abi.h struct lb_maglev_pair) ------------------

def slot_capacity(table) -> int:
    """Every slot of lb_maglev (a bcc table): max_entries elements of slots_per_element slots."""
    return table.max_entries * slots_per_element(ct.sizeof(table.Leaf))


def read_slots(table, n: int) -> np.ndarray:
    """Slots [0, n) of lb_maglev (a bcc table), by batch lookup of the elements that hold them."""
    per = slots_per_element(ct.sizeof(table.Leaf))
    return read_u32_array(table, -(-n // per), per).reshape(-1)[:n]


def write_slots(table, slots: np.ndarray, at: np.ndarray) -> None:
    """Store slots[at] into lb_maglev (a bcc table), where `slots` holds the map's slots from slot 0
    (the writer's copy of all of them) and `at` slot indices: each element holding one is written
    whole, its other slot from `slots` too (0 past its end)."""
    per = slots_per_element(ct.sizeof(table.Leaf))
    elements = np.unique(np.asarray(at, dtype=np.uint32) // per)
    if not elements.size:
        return
    need = (int(elements[-1]) + 1) * per
    if slots.size < need:
        slots = np.concatenate([slots, np.zeros(need - slots.size, dtype=np.uint32)])
    update_u32_array(table, elements, slots[:need].reshape(-1, per)[elements])


def map_slots(table) -> np.ndarray | None:
    """A writable view of lb_maglev's slots in place (the map was created BPF_F_MMAPABLE), every
    slot of the map, or None when the kernel refuses (a map pinned by an older build without the
    flag): then write_slots serves.  A store to the view is what a packet reads next: no
    syscall, no copy; millions of Maglev slots are written in milliseconds.  The kernel keeps
    array elements 8-byte aligned: with two slots to an element the slots are one dense run of
    u32s; with one (a 4-byte value) slot i is the u32 at byte 8 * i."""
    area = _mapped(table)
    if area is None:
        return None
    n, size, stride = table.max_entries, ct.sizeof(table.Leaf), _stride(table)
    if size == stride:          # no padding: every u32 of the area is a slot
        return np.ndarray((n * size // 4,), dtype=np.uint32, buffer=area)
    return np.ndarray((n,), dtype=np.uint32, buffer=area, strides=(stride,))


def _stride(table) -> int:
    """Bytes from one element of an array map to the next: the kernel keeps them 8-byte aligned."""
    return (ct.sizeof(table.Leaf) + 7) & ~7


def _mapped(table) -> mmap.mmap | None:
    """Every element of an array map created BPF_F_MMAPABLE, mapped writable; None when the kernel
    refuses (a map without the flag) or there is no map (mmap's fd -1 is anonymous memory)."""
    if table.map_fd < 0:
        return None
    try:
        return mmap.mmap(table.map_fd, table.max_entries * _stride(table), mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None


def zero_percpu(table, ident: int) -> None:
    table[table.Key(ident)] = table.Leaf()


_ARRAY, _PERCPU_ARRAY = 2, 6     # BPF_MAP_TYPE_*: slots cannot be deleted
_ARRAY_MAP_TYPES = (_ARRAY, _PERCPU_ARRAY)


def _zero_mapped(table) -> bool:
    """Zero every element of an array map created BPF_F_MMAPABLE (lb_maglev) in place: a memset,
    where a batch update copies every element through the kernel (0.1 ms against 6.5 ms at the
    tests' size). False, and nothing written, when the kernel does not map it."""
    area = _mapped(table)
    if area is None:
        return False
    with area:
        area[:] = bytes(len(area))
    return True


def clear(table) -> None:
    """Put a table back to the state of a freshly created map: every key of a hash-like map
    (hash, LRU, LPM trie) deleted, every slot of an array (per-CPU ones: on every CPU) zeroed.
    A mapped array in place, another array in one syscall, one lookup per key and one batch
    delete for the others."""
    if table.ttype in _ARRAY_MAP_TYPES:
        if table.ttype == _ARRAY and _zero_mapped(table):
            return
        n = table.max_entries
        keys = np.arange(n, dtype=np.uint32)
        # bcc's Leaf of a per-CPU map is the kernel's whole value: one 8-byte aligned slot per possible CPU.
        zeros = np.zeros(n * ct.sizeof(table.Leaf), dtype=np.uint8)
        count = ct.c_uint32(n)
        if _lib().bpf_update_batch(table.map_fd, keys.ctypes.data, zeros.ctypes.data, ct.byref(count)) != 0:
            for k in range(n):
                table[table.Key(k)] = table.Leaf()
        return
    delete_batch(table, list(table.keys()))
