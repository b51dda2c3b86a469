"""Batched access to bcc tables, with a per-entry fallback when the kernel
refuses a batch (older kernels, map types without batch ops).

bcc's own items_update_batch wants ctypes arrays built element by element; these
take ctypes Key/Leaf objects for hash maps and numpy arrays for u32 ARRAY maps
(Maglev tables are millions of slots), one syscall per batch.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

import numpy as np


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
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    vals = np.ascontiguousarray(vals, dtype=np.uint32)
    count = ct.c_uint32(int(keys.size))
    if _lib().bpf_update_batch(table.map_fd, keys.ctypes.data, vals.ctypes.data, ct.byref(count)) == 0:
        return
    for k, v in zip(keys.tolist(), vals.tolist()):
        table[table.Key(k)] = table.Leaf(v)


def read_u32_array(table, n: int) -> np.ndarray:
    """Entries [0, n) of a u32 -> u32 ARRAY map, by batch lookup where possible."""
    out = np.zeros(n, dtype=np.uint32)
    if n == 0:
        return out
    chunk = min(n, 1 << 16)
    keys = np.zeros(chunk, dtype=np.uint32)
    vals = np.zeros(chunk, dtype=np.uint32)
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
                for i in range(n):
                    out[i] = table[table.Key(i)].value
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


def zero_percpu(table, ident: int) -> None:
    table[table.Key(ident)] = table.Leaf()


_ARRAY_MAP_TYPES = (2, 6)       # BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY: slots cannot be deleted


def clear(table) -> None:
    """Put a table back to the state of a freshly created map: every key of a hash-like map
    (hash, LRU, LPM trie) deleted, every slot of an array (per-CPU ones: on every CPU) zeroed.
    One syscall for an array, one lookup per key and one batch delete for the others."""
    if table.ttype in _ARRAY_MAP_TYPES:
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
