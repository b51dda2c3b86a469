"""Resizing without loss: the entries of pinned maps carried into maps of a new size.

bcc reuses a pinned map of any shape, so the loader recreates the pins when a map's size or layout
no longer matches the program (loader.stale_pins).  Recreated empty, a node would lose its
conntrack, affinity and SNAT state (established flows re-balanced, UDP flows moved) and renumber
its ids.  With `loader.load(..., migrate=True)` (the agent's) the entries are read from the old
pins first (`save`) and written into the new maps (`restore`) before anything uses them:

- every hash and LRU map whose key and value sizes did not change: frontends, backends, service
  names (so ids are never renumbered), conntrack, affinity and its membership pairs, SNAT, source
  ranges, the status of Services not programmed;
- lb_maglev, the slots the frontends own.

Not carried: per-CPU counters (they start again from 0), fragment tracking (seconds long), and a map
whose key or value layout changed (a new datapath version: logged; that map starts empty).  A map
made smaller than what it holds keeps what fits (LRU maps evict the oldest, as they do anyway), and
a frontend whose Maglev range no longer fits is dropped: the next full apply writes it again.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ebpfsvc.abi import slots_per_element
from ebpfsvc.datapath.batch import slot_capacity, update_batch, write_slots

log = logging.getLogger(__name__)

_HASH, _LPM_TRIE = 1, 11           # BPF_MAP_TYPE_*: full maps refuse inserts (LRU ones evict)

# Derived or short-lived: not worth carrying (counters restart at 0, fragments last seconds).
# lb_sock_path: the fast-exit marks of the socket path's sockets; without them those take the full TC path.
NOT_CARRIED = frozenset({"lb_frontend_stats", "lb_backend_stats", "lb_drops", "lb_sock_stats", "lb_sock_path", "frag4",
                         "frag6"})
# Frontend maps of both families: their entries own the ranges of the one lb_maglev.
_FRONTEND_MAPS = ("lb4_frontends", "lb6_frontends")


@dataclass
class Saved:
    """What the old pins held: raw entries per map, with their key and value sizes."""

    entries: dict[str, tuple[int, int, list[tuple[bytes, bytes]]]] = field(default_factory=dict)
    maglev: np.ndarray | None = None


def save(pin_dir: Path, names) -> Saved:
    """Read every carried map pinned in `pin_dir` (read-only, before the pins are removed)."""
    from ebpfsvc.datapath.bpfsys import PinnedMap

    out = Saved()
    for name in names:
        path = Path(pin_dir) / name
        if name in NOT_CARRIED or not path.exists():
            continue
        try:
            with PinnedMap.open(path) as m:
                if name == "lb_maglev":
                    continue            # read below, only the slots the frontends own
                out.entries[name] = (m.info.key_size, m.info.value_size, m.items())
        except OSError as err:
            log.warning("cannot read %s to carry it over: %s", path, err)
    fes = [v for name in _FRONTEND_MAPS if name in out.entries for _, v in out.entries[name][2]]
    maglev = Path(pin_dir) / "lb_maglev"
    if fes and maglev.exists():
        from ebpfsvc import abi
        high = 0
        for v in fes:
            val = abi.ffi.from_buffer("struct lb4_service *", v)
            high = max(high, val.maglev_offset + val.maglev_size)
        with PinnedMap.open(maglev) as m:
            # Slots of the old map's layout: one to an element (a build before struct lb_maglev_pair)
            # or two.
            per = slots_per_element(m.info.value_size)
            high = min(high, m.info.max_entries * per)
            out.maglev = np.asarray(m.read_slots(0, high), dtype=np.uint32) if high else None
    return out


def restore(maps, saved: Saved) -> dict[str, int]:
    """Write `saved` into the new maps (bcc tables); returns entries carried per map."""
    from ebpfsvc import abi

    carried: dict[str, int] = {}
    slots = slot_capacity(maps["lb_maglev"]) if "lb_maglev" in maps else 0
    for name, (key_size, value_size, items) in saved.entries.items():
        table = maps.get(name)
        if table is None:
            continue
        leaf = getattr(table, "sLeaf", table.Leaf)
        if (ctypes.sizeof(table.Key), ctypes.sizeof(leaf)) != (key_size, value_size):
            log.warning("%s: entries of %d/%d bytes, the new map's are %d/%d: not carried (a new layout)",
                        name, key_size, value_size, ctypes.sizeof(table.Key), ctypes.sizeof(leaf))
            continue
        if name in _FRONTEND_MAPS:      # a frontend whose table no longer fits is written again later
            items = [(k, v) for k, v in items if _range_end(abi, v) <= slots]
        if table.ttype in (_HASH, _LPM_TRIE) and len(items) > table.max_entries:   # what fits
            items = items[: table.max_entries]
        batch = [(table.Key.from_buffer_copy(k), table.Leaf.from_buffer_copy(v)) for k, v in items]
        if table.ttype == _LPM_TRIE:     # no batch operations on LPM tries
            for k, v in batch:
                table[k] = v
        else:
            update_batch(table, batch)
        carried[name] = len(batch)
    if saved.maglev is not None and slots:
        n = min(len(saved.maglev), slots)
        write_slots(maps["lb_maglev"], saved.maglev[:n], np.arange(n, dtype=np.uint32))
        carried["lb_maglev"] = n
    log.info("carried over to the resized maps: %s",
             ", ".join(f"{name} {n}" for name, n in sorted(carried.items())) or "nothing")
    return carried


def _range_end(abi, value: bytes) -> int:
    s = abi.ffi.from_buffer("struct lb4_service *", value)
    return s.maglev_offset + s.maglev_size
