"""The map writer: makes the (pinned) BPF maps equal to a desired LBState.

    writer = MapWriter(datapath.maps)     # reads what the maps hold now
    stats = writer.apply(state)           # writes only the difference

Ids are small and dense so per-CPU stats arrays can be indexed by them, and
stable across agent restarts without a state file: service ids live in
lb_service_names (id -> name), backend ids are the keys of lb4_backends
(one per address, port, protocol), frontend ids and Maglev ranges are fields of
the lb4_frontends entries. A new MapWriter rebuilds all of it from the maps, so
an unchanged LBState after a restart writes nothing.

Incremental: apply() looks only at the frontends whose Frontend object (then value) changed since
the last apply -- the caller may name them (an LBDelta from DesiredStateBuilder), else the writer
compares the two states by identity -- and keeps reference counts (frontends per backend, per
backend flag, per service name, per address marker), so the backends and names nobody uses any
more are found without a scan.  One endpoint change at 10,000 Services costs the entries it
affects.  The first apply after a (re)load, and apply(state, full=True) (the agent's periodic
resync), recompute everything from the state and also remove what nothing wants any more,
e.g. entries a previous agent run left behind.

Both families: an IPv6 frontend or backend goes to the lb6_* twin of its map (its address, in the
keys compared here, is the tuple of four words of a __be32[4] field, where an IPv4 one is an int);
service, frontend and backend ids, lb_maglev's ranges and the stats arrays are one space for both.

Write order, so that no packet ever sees a reference to something missing:
backends and service names first, then Maglev tables (each changed table
into a NEW range of lb_maglev), then frontend entries (the single write that
switches a frontend to its new table); deletes go the other way: frontends,
then their old ranges are released, then backends and names nobody uses.  A large apply (a full
sync) has its writes up to the switch made on a thread behind it (_Behind), in that same order;
the deletes wait for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import logging
import queue
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, NamedTuple
from urllib.parse import quote

import numpy as np

from ebpfsvc import abi, heap, maglev
# Module-level names, looked up at each call: tests probe every write by patching them.
from ebpfsvc.datapath.batch import delete_batch as _delete_batch
from ebpfsvc.datapath.batch import map_slots as _map_slots
from ebpfsvc.datapath.batch import read_slots as _read_slots
from ebpfsvc.datapath.batch import slot_capacity
from ebpfsvc.datapath.batch import update_batch as _update_batch
from ebpfsvc.datapath.batch import update_records as _update_records
from ebpfsvc.datapath.batch import write_slots as _write_slots
from ebpfsvc.datapath.batch import zero_percpu_ids as _zero_percpu_ids
from ebpfsvc.datapath.affinitymatch import AffinityMatch
from ebpfsvc.datapath.ids import IdAllocator, IdExhausted, SlotRanges
from ebpfsvc.lbmodel import (LOCAL, NOT_READY, TERMINATING, Algorithm, Backend, BackendRows, Frontend,
                             FrontendKey, FrontendKind, LBState, Protocol, ServicePortName, backend_rows)

log = logging.getLogger(__name__)

_NAME_MAX = 127      # lb_service_name.name is 128 bytes, NUL-terminated

_KIND_FLAGS = {
    FrontendKind.CLUSTER_IP: 0,
    FrontendKind.NODE_PORT: abi.LB_SVC_F_NODEPORT,
    FrontendKind.EXTERNAL_IP: abi.LB_SVC_F_EXTERNAL_IP,
    FrontendKind.LOAD_BALANCER: abi.LB_SVC_F_LOADBALANCER,
}


@dataclass
class ApplyStats:
    """What one apply() wrote: entries written or deleted per map (0s = no-op)."""

    backends_written: int = 0
    backends_deleted: int = 0
    # Of backends_written: entries that replaced a backend's previous one (its flags changed: not
    # ready, terminating, local), not new backends. With backends_deleted, what may leave a
    # connection on a backend that no longer keeps it (the socket path's reset pass, agent.py).
    backends_changed: int = 0
    services_written: int = 0
    services_deleted: int = 0
    tables_written: int = 0       # Maglev tables written into a new range
    slots_written: int = 0        # lb_maglev entries written
    frontends_written: int = 0    # lb4_frontends entries written (incl. address markers)
    frontends_deleted: int = 0
    stats_zeroed: int = 0         # per-CPU stats slots reset for a (re)allocated id
    ranges_written: int = 0       # lb4_source_ranges entries written (loadBalancerSourceRanges)
    ranges_deleted: int = 0
    # Services whose writes the kernel refused (apply(isolate=True)): (namespace, name) -> (the map,
    # what failed).  They keep their last good entries (or stay out, if new).
    failed: dict = field(default_factory=dict, compare=False)

    @property
    def writes(self) -> int:
        """Every map entry written or deleted."""
        return sum(getattr(self, f.name) for f in fields(self)
                   if f.name not in ("tables_written", "backends_changed", "failed"))

    def add(self, other: "ApplyStats") -> None:
        for f in fields(self):
            if f.name != "failed":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __bool__(self) -> bool:
        return self.writes > 0


def service_name(spn: ServicePortName) -> str:
    """Name stored in lb_service_names: "namespace/name:port/PROTO" (hashed when too long).

    A service's identity is its ServicePortName (namespace, name, port name, protocol); this text is
    that key's encoding in the map, and it must be one-to-one: each part is percent-escaped except
    for the characters Kubernetes names consist of, so a separator inside a part ("h-coll:x", or a
    name that slipped past validation) can never make two keys one text, one id, one affinity
    entry.  Valid names are unchanged by the escaping, so ids pinned by earlier versions stay.
    The text is ASCII whatever the names hold (a lone surrogate included): it can always be written.
    """
    ns, name, port, protocol = spn
    # (One check of the three parts at once: valid names, every one of a full sync's, pass it.)
    if not _UNRESERVED.fullmatch(f"{ns}{name}{port}"):
        ns, name, port = (part if _UNRESERVED.fullmatch(part) else quote(part.encode("utf-8", "surrogatepass"), safe="")
                          for part in (ns, name, port))
    protocol = _PROTOCOL_TEXT[protocol]
    text = f"{ns}/{name}:{port}/{protocol}" if port else f"{ns}/{name}/{protocol}"
    if len(text) > _NAME_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        text = text[: _NAME_MAX - 17] + "#" + digest
    return text


# What quote() leaves as it is (RFC 3986's unreserved characters): a valid Kubernetes name is
# all of them, and checking costs a tenth of quoting (a full sync names 10,000 service ports).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
_PROTOCOL_TEXT = {p: p.value for p in Protocol}         # an Enum's .value is a property: a call each


class MapWriteError(OSError):
    """A map write the kernel refused (or no id or slot left for it), naming the map."""

    def __init__(self, map_name: str, cause: BaseException):
        text = getattr(cause, "strerror", None) or str(cause)
        # bcc's per-entry fallback raises a bare Exception("Could not update table: <strerror>").
        super().__init__(getattr(cause, "errno", None), text.removeprefix("Could not update table: "))
        self.map_name = map_name

    def __str__(self) -> str:
        return f"{self.map_name}: {self.strerror}"


@contextlib.contextmanager
def _writing(map_name: str):
    """Name the map in a failure of the writes inside: an OSError, an id or slot range
    exhausted, or bcc's bare Exception for a refused update (anything else is a bug, left alone)."""
    try:
        yield
    except MapWriteError:
        raise
    except IdExhausted as err:      # keeps its type (callers without isolation catch it), gains the map
        err.map_name = getattr(err, "map_name", map_name)
        raise
    except OSError as err:
        raise MapWriteError(map_name, err) from err
    except Exception as err:
        if type(err) is not Exception:
            raise
        raise MapWriteError(map_name, err) from err


# What apply(isolate=True) pins on the Services whose changes raise it: the kernel refused a write
# (MapWriteError), no id or slot range was left (IdExhausted), or a frontend could not be turned
# into entries (ValueError).
_ISOLABLE = (MapWriteError, IdExhausted, ValueError)
# Services that may fail one by one in one apply before the rest wait for the next try: each costs
# a full apply (the writer re-reads the maps and rewrites the last good state).
_ISOLATE_MAX = 16
# Frontends from which an apply's batch writes are made behind it, on a thread (_Behind): below
# that, an apply writes a few entries, which a thread would only delay (an endpoint change).
_BEHIND_MIN = 1000


class _Behind:
    """A large apply's batch writes, made on a thread of their own in the order they were asked
    while the apply goes on: ctypes lets go of the GIL for the syscall, and a full sync's writes
    take 40-50 ms of kernel time at 10,000 Services x 10 (lb4_backends' 100,000 entries, their
    zeroed stats).  The caller packs the records (numpy, which holds the GIL); this thread only
    makes the syscalls.  The first write that fails stops every one after it, so a frontend is
    never switched to backends or names that were not written (the write order of the module
    docstring holds); join() raises it, naming its map as _writing does."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ebpfsvc-map-writes", daemon=True)
        self._thread.start()

    def later(self, map_name: str) -> Callable:
        """What batch.update_records and zero_percpu_ids hand their write to, for `map_name`."""
        return lambda write, *args: self._jobs.put((map_name, write, args))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._failed is not None:
                continue
            map_name, write, args = job
            try:
                with _writing(map_name):
                    write(*args)
            except BaseException as err:        # raised by join(), in the apply's thread
                self._failed = err

    def join(self) -> None:
        """Wait for every write asked so far; raise the first that failed."""
        self._jobs.put(None)
        self._thread.join()
        if self._failed is not None:
            raise self._failed


def _failure(err: Exception, existing: bool) -> str:
    """A failed Service's detail, for the log line, the metric and `service list`."""
    name = getattr(err, "map_name", "")
    text = f"{name}: {err}" if name and not isinstance(err, MapWriteError) else str(err)
    return f"{text}; " + ("its last good version stays" if existing else "not programmed")


# Map keys the writer compares, raw as stored (address and port in wire order, abi.be32/be16; an
# IPv6 address as abi.be128's four words, so the address's type tells the family: _is6).
FeKey = tuple  # lb4_frontends / lb6_frontends key: (address, port, proto, scope)
BeKey = tuple  # what identifies a backend entry: (address, port, proto)


def _is6(address) -> bool:
    """Is a stored address (an FeKey's or BeKey's first field) IPv6?"""
    return type(address) is tuple


class FrontendEntry(NamedTuple):
    """An lb4_frontends or lb6_frontends value as stored (struct lb4_service)."""

    service_id: int
    frontend_id: int
    maglev_offset: int      # the frontend's table: slots [offset, offset + size) of lb_maglev
    maglev_size: int        # 0: no table (no usable backend)
    backend_count: int
    affinity_timeout: int
    flags: int              # LB_SVC_F_*


class BackendEntry(NamedTuple):
    """An lb4_backends value as stored (struct lb4_backend), or lb6_backends' (struct lb6_backend)."""

    address: int
    port: int
    proto: int
    flags: int              # LB_BE_F_*

    @property
    def key(self) -> BeKey:
        return (self.address, self.port, self.proto)


class _TableSource(NamedTuple):
    """What a Maglev table was built from: rebuilt only when one of these changes."""

    names: tuple            # backend names, sorted (maglev hashes them)
    ids: tuple              # their backend ids, the values the slots hold
    size: int


# An address marker (port 0): the datapath's "is this one of our addresses" entry.
_MARKER = FrontendEntry(0, 0, 0, 0, 0, 0, abi.LB_SVC_F_ADDRESS)

# Incremental applies sort the changed frontends (deterministic id allocation) up to this many;
# past it they go in the state's order, which costs no comparisons.
_SORT_CHANGED_MAX = 1024


class _FeWant(NamedTuple):
    """One frontend in map terms: what its entries need, and what it holds references on."""

    fe: Frontend
    key: FeKey
    marker: FeKey                   # the address marker (port 0) it needs
    name: str                       # its service name in lb_service_names
    backend_keys: tuple             # its backends' BeKeys (one each: its rows have one per name),
    backend_flags: tuple            # and the LB_BE_F_* it wants each with
    table_names: tuple              # the backends its Maglev table is built from: names, sorted,
    table_keys: tuple               # and their BeKeys
    table_size: int                 # maglev.table_size(len(table_names))


class _Touched(NamedTuple):
    """The entries whose reference counts moved in an apply: only these can need a write or a delete."""

    backends: dict                  # BeKey -> anything (a dict: insertion-ordered, deterministic ids)
    names: set                      # service names
    frontends: dict                 # FeKey -> None (entries and address markers)


@dataclass(slots=True)
class _Planned:
    """One wanted frontend in phase 3: its id, table source, current entry and, once its table
    was written into a new range, that range's offset."""

    key: FeKey
    want: _FeWant
    frontend_id: int
    table: _TableSource
    old: FrontendEntry | None
    new_offset: int | None = None


class _BackendWrites(NamedTuple):
    """Phase 1's work, computed before anything of it is written."""

    ids: list                       # the ids to write, and
    entries: list                   # their entries: BackendEntry's fields, as plain tuples
    fresh: list                     # ids new to the maps (their stats zeroed first)
    stale: list                     # ids nothing references any more (deleted in phase 4)
    changed: int                    # entries of ids already in the maps that change


class _Prepared(NamedTuple):
    """MapWriter.prepare's work, for the apply that follows it."""

    wants: dict                     # id(Frontend) -> its _FeWant
    offsets: dict                   # id(Frontend) -> where its table starts in `positions`
    positions: Callable             # maglev.start_positions' wait: the tables, of positions


class _FrontendPlan(NamedTuple):
    """Phase 3's work list, computed before anything of it is written."""

    entries: list                   # _Planned per wanted frontend
    rebuild: list                   # indices into `entries` whose Maglev table must be (re)built
    markers: list                   # (key, _MARKER) address markers to write
    stale: list                     # FeKeys nothing wants any more
    src_add: set                    # loadBalancerSourceRanges entries to add,
    src_drop: set                   # and to drop once no frontend enforces them


class MapWriter:
    """Diff-and-apply writer over a loaded datapath's maps (ebpfsvc.datapath.loader.Datapath.maps)."""

    def __init__(self, maps: Mapping[str, Any]):
        self.frontends_map = maps["lb4_frontends"]
        self.backends_map = maps["lb4_backends"]
        # The IPv6 twins (None: a datapath without them; an IPv6 frontend is then refused).
        self.frontends6_map = maps.get("lb6_frontends")
        self.backends6_map = maps.get("lb6_backends")
        self.src_ranges6_map = maps.get("lb6_source_ranges")
        self.maglev_map = maps["lb_maglev"]
        self.names_map = maps["lb_service_names"]
        self.fe_stats_map = maps["lb_frontend_stats"]
        self.be_stats_map = maps["lb_backend_stats"]
        self.sock_stats_map = maps.get("lb_sock_stats")   # the socket path's translations per frontend id
        self.src_ranges_map = maps.get("lb4_source_ranges")   # loadBalancerSourceRanges (LPM trie)
        self.affinity_match_map = maps.get("lb4_affinity_match")   # affinity's membership check
        self._maps = maps
        # lb_maglev's slots in place (None: written by batch syscalls, with a copy kept here).
        self._slots_view = _map_slots(self.maglev_map)
        self._load()

    # ---- state read back from the maps -------------------------------------------------

    def _load(self) -> None:
        self._svc_id: dict[str, int] = {}
        for k, v in self.names_map.items():
            self._svc_id[v.name.decode(errors="replace")] = k.value
        # id -> its entry as written: a BackendEntry, or (written since the start) a plain tuple of
        # its fields, which equals it: a full sync writes 100,000, one tuple made for each.
        self._be_val: dict[int, tuple] = {}
        self._be_id: dict[BeKey, int] = {}
        for k, v in self.backends_map.items():
            self._be_val[k.value] = BackendEntry(v.address, v.port, v.proto, v.flags)
            self._be_id[(v.address, v.port, v.proto)] = k.value
        if self.backends6_map is not None:
            for k, v in self.backends6_map.items():
                entry = BackendEntry(tuple(v.address), v.port, v.proto, v.flags)
                self._be_val[k.value] = entry
                self._be_id[entry.key] = k.value
        self._fe: dict[FeKey, FrontendEntry] = {}
        for m in (self.frontends_map, self.frontends6_map):
            for k, v in (m.items() if m is not None else ()):
                address = tuple(k.address) if m is self.frontends6_map else k.address
                self._fe[(address, k.port, k.proto, k.scope)] = FrontendEntry(
                    v.service_id, v.frontend_id, v.maglev_offset, v.maglev_size,
                    v.backend_count, v.affinity_timeout, v.flags)

        capacity = slot_capacity(self.maglev_map)
        ranges = [(v.maglev_offset, v.maglev_size) for v in self._fe.values() if v.maglev_size > 0]
        self._ranges = SlotRanges(capacity, ranges)
        # The slots as they are now, to compare a frontend's table with what a state wants: the
        # map itself when it is mapped, else a copy (zeros beyond what frontends use: calloc'ed
        # pages cost no memory until written).
        if self._slots_view is not None:
            self._slots = self._slots_view
        else:
            high = max((off + size for off, size in ranges), default=0)
            self._slots = np.zeros(capacity, dtype=np.uint32)
            self._slots[:high] = _read_slots(self.maglev_map, high)
        # What each table was last built from: skips rebuilding a table whose inputs did not change.
        self._table_src: dict[FeKey, _TableSource] = {}

        self._svc_ids = IdAllocator(self.names_map.max_entries, self._svc_id.values())
        self._be_ids = IdAllocator(self.be_stats_map.max_entries, self._be_val)
        self._fe_ids = IdAllocator(self.fe_stats_map.max_entries,
                                   (v.frontend_id for v in self._fe.values() if v.frontend_id))
        self._reset_refs()          # the next apply is a full one
        # (frontend id, LPM prefix length, address) of every loadBalancerSourceRanges entry.
        self._src_ranges: set[tuple[int, int, int]] = set()
        if self.src_ranges_map is not None:
            for k in self.src_ranges_map.keys():
                self._src_ranges.add((k.frontend_id, k.prefixlen, k.address))
        if self.src_ranges6_map is not None:
            for k in self.src_ranges6_map.keys():
                self._src_ranges.add((k.frontend_id, k.prefixlen, tuple(k.address)))
        self._affinity_match = (AffinityMatch(self.affinity_match_map)
                                if self.affinity_match_map is not None else None)
        self._prepared: _Prepared | None = None
        self._behind: _Behind | None = None         # a large apply's writes, while it runs

    # ---- the public operation --------------------------------------------------------

    def prepare(self, state: LBState) -> None:
        """Begin what the first apply() of `state` takes longest over, before it is called: every
        frontend's derivation, and its Maglev table, filled on the other cores
        (maglev.start_positions: the backends' ids do not exist yet) while the caller admits the
        state and apply() works out the ids and entries.  Only before the first apply since the
        maps were read (a starting agent, which builds every table then); apply() takes what it
        finds of its own frontends and derives the rest, and anything wrong here is apply()'s to
        find and name.  Agent.sync and the control-plane bench call it after desired state."""
        self._prepared = None
        if self._state is not None:
            return
        with heap.bulk():       # (long-lived: apply keeps them)
            try:
                fes = list(state.frontends.values())
                # The tables first (each frontend's as _frontend_want chooses it), so that they
                # fill while the wants are derived too.
                tables = [(fe, names, maglev.table_size(len(names)))
                          for fe in fes if (names := _table_names(backend_rows(fe.backends)))]
                offsets, at = {}, 0
                for fe, _, size in tables:
                    offsets[id(fe)] = at
                    at += size
                if at < maglev.PARALLEL_SLOTS:
                    return      # (a few tables: apply builds them at once)
                positions = maglev.start_positions([(names, size) for _, names, size in tables])
                wants = {id(fe): _frontend_want(fe) for fe in fes}
            except Exception:
                return
            self._prepared = _Prepared(wants, offsets, positions)

    def apply(self, state: LBState, *, full: bool = False, delta=None, isolate: bool = False) -> ApplyStats:
        """Make the maps hold exactly `state`; return what was written.

        Looks at the frontends that changed since the last apply only: the keys of `delta`
        (an ebpfsvc.desired.LBDelta, used when its `base` is the state applied last), else
        those whose Frontend object differs.  `full` (and the first apply after a (re)load)
        recomputes everything from the state and deletes whatever nothing wants.

        If a write fails (a map is full, the kernel refuses), the writer re-reads the maps, so
        its view matches what was actually written and the next apply() diffs from there (in
        full); the write order guarantees that a partial apply never leaves a frontend pointing
        at missing backends or slots.  Then, without `isolate`, the exception propagates.  With
        `isolate` (the agent), one Service's failure costs that Service only: the maps go back
        to the last good state and the changes are written again Service by Service
        (_apply_per_service); the Services that still fail keep their last good entries (or
        stay out, if new) and are returned in ApplyStats.failed.
        """
        full = full or self._state is None
        last_good = self._state
        try:
            # A full apply derives every frontend's entries at once: no cycle collection meanwhile.
            with heap.bulk() if full else contextlib.nullcontext():
                stats = self._apply(state, full, delta)
                if self._affinity_match is not None:     # after the ids exist (datapath/affinitymatch.py)
                    with _writing("lb4_affinity_match"):
                        self._affinity_match.sync(state, self, full=full, delta=delta)
            return stats
        except _ISOLABLE as err:
            if not isolate:
                self._load()
                raise
            with heap.bulk():       # (the maps are re-read first)
                return self._apply_per_service(state, last_good, err)
        except Exception:
            self._load()
            raise
        finally:
            self._prepared = None       # (taken by the first _write_changes, or of no more use)

    def _apply_per_service(self, state: LBState, last_good: LBState | None, first: Exception) -> ApplyStats:
        """After a failed batch (the maps re-read): the last good state again, then each Service whose
        frontends differ from it, one at a time and in name order (the same on every node).  A Service
        whose writes fail is put back to where it was (re-read, last good state again) and reported;
        past _ISOLATE_MAX of them the rest wait for the next try, so a failure that is not one
        Service's (every write refused) costs a bounded number of full applies, and one that hits
        the last good state itself propagates as before."""
        stats = ApplyStats()
        good = dict(last_good.frontends if last_good is not None else self._pinned())
        self._restore(good, first, stats)
        log.warning("a batch write failed (%s): writing the changes Service by Service", first)
        want: dict[tuple[str, str], dict[FrontendKey, Frontend]] = {}
        for key, fe in state.frontends.items():
            want.setdefault((fe.service.namespace, fe.service.name), {})[key] = fe
        have: dict[tuple[str, str], dict[FrontendKey, Frontend]] = {}
        for key, fe in good.items():
            have.setdefault((fe.service.namespace, fe.service.name), {})[key] = fe
        for svc in sorted(k for k in want.keys() | have.keys() if want.get(k, {}) != have.get(k, {})):
            if len(stats.failed) >= _ISOLATE_MAX:
                stats.failed[svc] = ("", f"not tried: {_ISOLATE_MAX} Services failed before it")
                continue
            new = want.get(svc, {})
            # Its frontends as they are now (a key another Service took over in this loop is not its
            # own any more), and what will be at its new keys.
            touched = [k for k, fe in have.get(svc, {}).items() if good.get(k) is fe] + list(new)
            old = [good[k] for k in dict.fromkeys(touched) if k in good]
            step = ApplyStats()
            try:
                self._write_changes(old, list(new.values()), False, step)
            except _ISOLABLE as err:
                stats.failed[svc] = (getattr(err, "map_name", ""), _failure(err, svc in have))
                self._restore(good, first, stats)
                continue
            stats.add(step)
            for k in touched:
                good.pop(k, None)
            good.update(new)
        self._state = LBState(good)
        if self._affinity_match is not None:
            try:
                with _writing("lb4_affinity_match"):
                    self._affinity_match.sync(self._state, self, full=True)
            except Exception:
                self._load()
                raise
        return stats

    def _restore(self, good: dict, first: Exception, stats: ApplyStats) -> None:
        """The maps (re-read) made to hold `good` again, in full; if even that fails, the failure is
        not one Service's: the first one propagates."""
        self._load()
        try:
            stats.add(self._apply(LBState(dict(good)), True, None))
        except _ISOLABLE:
            self._load()
            raise first from None

    def _pinned(self) -> dict[FrontendKey, Frontend]:
        """The frontends the maps serve (no state applied yet by this writer: right after a start)."""
        from ebpfsvc.datapath.pinned import pinned_frontends

        return {fe.key: fe for fes in pinned_frontends(self._maps).values() for fe in fes}

    def _reset_refs(self) -> None:
        self._state: LBState | None = None             # the state applied last; None: next apply is full
        self._want: dict[FeKey, _FeWant] = {}
        # Frontends per backend, and of those the ones that want it terminating / local (plain
        # ints: no container per backend for the garbage collector to walk).
        self._be_refs: dict[BeKey, int] = {}
        self._be_terminating: dict[BeKey, int] = {}
        self._be_local: dict[BeKey, int] = {}
        # Not ready only when every frontend listing it says so: one Service may publish a
        # not-ready address (publishNotReadyAddresses) that another one holds back.
        self._be_not_ready: dict[BeKey, int] = {}
        self._svc_refs: dict[str, int] = {}
        self._marker_refs: dict[FeKey, int] = {}
        # An IPv6 frontend was counted since the counts were reset: only then can a backend to
        # write be IPv6 (a frontend's backends are of its family), and the writes need a split.
        self._ipv6_wanted = False
        self._fe_src: dict[FeKey, set[tuple[int, int, int]]] = {}   # source-range entries per frontend
        # id(Frontend) -> its _FeWant, for every frontend in _want: what a Frontend needs never
        # changes (it is frozen), so a full apply re-derives only new objects (the _FeWant holds
        # its Frontend, so the id cannot be reused while it is here).
        self._by_fe: dict[int, _FeWant] = {}

    def _changes(self, state: LBState, delta) -> tuple[list[Frontend], list[Frontend]]:
        """(old, new) Frontend objects of the frontends that differ from the last applied state."""
        before, after = self._state.frontends, state.frontends
        if delta is not None and getattr(delta, "base", None) is self._state:
            keys: Iterable[FrontendKey] = delta.keys
            if len(keys) <= _SORT_CHANGED_MAX:
                keys = sorted(keys, key=_family_first)
        elif after == before:        # in C, by identity first: the usual "nothing changed"
            return [], []
        else:
            keys = [k for k, fe in after.items() if before.get(k) is not fe]
            keys += before.keys() - after.keys()
        old, new = [], []
        for key in keys:
            a, b = before.get(key), after.get(key)
            if a is b or (a is not None and b is not None and a == b):
                continue
            if a is not None:
                old.append(a)
            if b is not None:
                new.append(b)
        return old, new

    def _apply(self, state: LBState, full: bool, delta) -> ApplyStats:
        """The phases of the module docstring, in their order (_write_changes); each writes one map (or two)."""
        stats = ApplyStats()
        if full:
            self._reset_refs()
            old: list[Frontend] = []
            new = list(state.frontends.values())
        elif state is self._state:
            return stats
        else:
            old, new = self._changes(state, delta)
        self._write_changes(old, new, full, stats)
        self._state = state
        return stats

    def _write_changes(self, old: list[Frontend], new: list[Frontend], full: bool, stats: ApplyStats) -> None:
        """The `old` frontends replaced by the `new` ones, phase by phase; a failure names its map."""
        prepared, self._prepared = self._prepared, None
        known = self._by_fe if prepared is None else {**prepared.wants, **self._by_fe}
        # Derived before anything changes: a bad frontend raises before any write.
        wants = [w if (w := known.get(id(fe))) is not None and w.fe is fe else _frontend_want(fe) for fe in new]
        touched = self._recount(old, wants, full)
        # Up to the switch, a large apply's writes are made behind it, in their order (_Behind);
        # the deletes after the switch wait for them.
        behind = self._behind = _Behind() if len(wants) >= _BEHIND_MIN else None
        try:
            stale_be, retired, plan = self._write_up_to_switch(prepared, wants, touched, full, stats)
        except BaseException:
            if behind is not None:
                with contextlib.suppress(BaseException):
                    behind.join()           # the maps quiet before apply reads them back (_load)
            raise
        finally:
            self._behind = None
        if behind is not None:
            behind.join()
        # 4. Deletes, in reverse: frontends, their ranges, then unused backends and names.
        with _writing("lb4_frontends"):
            self._delete_frontends(plan, retired, stats)
        with _writing("lb4_backends"):
            self._delete_backends(stale_be, stats)
        with _writing("lb_service_names"):
            self._delete_service_names(touched.names, stats)

    def _write_up_to_switch(self, prepared, wants: list[_FeWant], touched: _Touched, full: bool,
                            stats: ApplyStats) -> tuple[list[int], list, _FrontendPlan]:
        """Phases 1-3 of _write_changes: (the backend ids nothing references any more, the Maglev
        ranges the switch retires, the frontends' plan)."""
        # Backend ids, then the frontends' plan (their ids, which tables to rebuild): the Maglev
        # tables are built from those, in C and on the other cores, while 1. the backends are
        # written (new ids get zeroed stats before anything can count on them) and 2. the service
        # names (their ids are what affinity and CT entries carry).
        with _writing("lb4_backends"):
            backends = self._backend_writes(touched.backends)
        with _writing("lb4_frontends"):
            plan = self._plan_frontends(touched.frontends, full, stats)
        todo = [plan.entries[i] for i in plan.rebuild]
        with _writing("lb_maglev"):
            if prepared is not None and todo and all(id(p.want.fe) in prepared.offsets for p in todo):
                tables = _taken(prepared, todo)         # filled since prepare(): their ids put in
            else:
                tables = maglev.start_tables([(p.table.names, p.table.size, p.table.ids) for p in todo])
        try:
            with _writing("lb4_backends"):
                stale_be = self._write_backends(backends, stats)
            with _writing("lb_service_names"):
                self._write_service_names(touched.names, stats)
        except BaseException:
            with contextlib.suppress(Exception):
                tables()            # the build ends with the apply; the write's failure is the one told
            raise
        # 3. Maglev tables into new ranges, source ranges, then frontend entries (the switch).
        with _writing("lb_maglev"):
            retired = self._write_tables(plan, todo, tables(), stats)
        with _writing("lb4_source_ranges"):
            self._write_source_ranges(plan.src_add, stats)
        with _writing("lb4_frontends"):
            self._switch_frontends(plan, stats)
        return stale_be, retired, plan

    def _batch(self, map_name: str, write: Callable, table, *args) -> None:
        """A batch write to `table` (_update_records, _zero_percpu_ids): made behind a large apply
        (_Behind) while one is under way, else at once."""
        if self._behind is None:
            write(table, *args)
        else:
            write(table, *args, later=self._behind.later(map_name))

    def _recount(self, old: list[Frontend], wants: list[_FeWant], full: bool) -> _Touched:
        """Reference counts: drop the old frontends' references, take the new ones'."""
        if full and not old and not self._want:
            touched = self._count_all(wants)
        else:
            touched = self._recount_each(old, wants)
        if full:
            # Whatever the maps hold is a candidate too: a previous run's leftovers go now.
            touched.backends.update(dict.fromkeys(self._be_id))
            touched.names.update(self._svc_id)
            touched.frontends.update(dict.fromkeys(self._fe))
        return touched

    def _count_all(self, wants: list[_FeWant]) -> _Touched:
        """_recount_each([], wants) from empty counts (a full apply): every count at once, by
        Counter over all the frontends (in C), where _count moves one count at a time."""
        self._want = {w.key: w for w in wants}
        self._by_fe = {id(w.fe): w for w in wants}
        self._ipv6_wanted = any(_is6(k[0]) for k in self._want)
        refs = Counter(itertools.chain.from_iterable(w.backend_keys for w in wants))
        self._be_refs = refs            # (a Counter is a dict: _add and _count read it with get)
        flagged = [(k, f) for w in wants if any(w.backend_flags) for k, f in zip(w.backend_keys, w.backend_flags) if f]
        for flag, counts in ((_BE_TERMINATING, self._be_terminating), (_BE_LOCAL, self._be_local),
                             (_BE_NOT_READY, self._be_not_ready)):
            counts.update(Counter([k for k, f in flagged if f & flag]))
        self._svc_refs = dict(Counter(w.name for w in wants))
        self._marker_refs = dict(Counter(w.marker for w in wants))
        # The same touched entries, in the same order, as one _count after the other.
        # (A copy of the counts, not dict.fromkeys: the same keys without hashing each again.)
        return _Touched(dict(refs), set(self._svc_refs),
                        dict.fromkeys(itertools.chain.from_iterable((w.key, w.marker) for w in wants)))

    def _recount_each(self, old: list[Frontend], wants: list[_FeWant]) -> _Touched:
        touched = _Touched({}, set(), {})
        for fe in old:
            w = self._want.pop(_frontend_key(fe))
            del self._by_fe[id(w.fe)]
            self._count(w, -1, touched.backends, touched.names)
            touched.frontends[w.key] = None
            touched.frontends[w.marker] = None
        for w in wants:
            self._want[w.key] = w
            self._by_fe[id(w.fe)] = w
            if _is6(w.key[0]):
                self._ipv6_wanted = True
            self._count(w, 1, touched.backends, touched.names)
            touched.frontends[w.key] = None
            touched.frontends[w.marker] = None
        return touched

    def _backend_writes(self, touched: dict) -> _BackendWrites:
        """Ids for the backends new to the maps (every one of a first sync), at once; the entries
        that changed, to write; the ids nothing references any more.  Nothing written yet."""
        be_refs, be_id, be_val = self._be_refs, self._be_id, self._be_val
        if be_id:
            held = [k for k in touched if k in be_id]
            new = [k for k in touched if k in be_refs and k not in be_id]
        else:           # empty maps (a first sync): every referenced backend is new
            held, new = [], [k for k in touched if k in be_refs]
        fresh = self._be_ids.allocate_many(len(new))
        be_id.update(zip(new, fresh))
        ids, entries = list(fresh), self._entry_values(new)
        stale = [be_id[k] for k in held if k not in be_refs]
        held = [k for k in held if k in be_refs]
        changed = 0
        for bkey, val in zip(held, self._entry_values(held)):
            ident = be_id[bkey]
            old = be_val.get(ident)
            if old != val:
                ids.append(ident)
                entries.append(val)
                changed += old is not None
        return _BackendWrites(ids, entries, fresh, stale, changed)

    def _write_backends(self, todo: _BackendWrites, stats: ApplyStats) -> list[int]:
        """Write _backend_writes' entries; return the ids nothing references any more."""
        stats.backends_changed += todo.changed
        self._batch("lb4_backends", _zero_percpu_ids, self.be_stats_map, todo.fresh)
        stats.stats_zeroed += len(todo.fresh)
        if not self._ipv6_wanted:       # all IPv4 (the usual case): no split
            self._batch("lb4_backends", _update_records, self.backends_map, todo.ids, todo.entries)
        else:
            four, six = _split(list(zip(todo.ids, todo.entries)), lambda w: w[1][0])
            self._batch("lb4_backends", _update_records, self.backends_map,
                        [i for i, _ in four], [v for _, v in four])
            if six:
                self._batch("lb4_backends", _update_records, self._v6(self.backends6_map),
                            [i for i, _ in six], [v for _, v in six])
        self._be_val.update(zip(todo.ids, todo.entries))
        stats.backends_written += len(todo.ids)
        return todo.stale

    def _entry_values(self, keys: list) -> list[tuple]:
        """Each backend's entry as a plain tuple (a BackendEntry equals it): its key, and the flags
        its frontends want (terminating or local if one of them wants it so, not ready if all do)."""
        terminating, local, not_ready, refs = self._be_terminating, self._be_local, self._be_not_ready, self._be_refs
        if not terminating and not not_ready:
            # (The usual cluster: no backend terminating or not ready, one lookup per backend.)
            return [k + (_LOCAL_FLAGS if k in local else _NO_FLAGS) for k in keys]
        return [k + ((_BE_TERMINATING if k in terminating else 0) | (_BE_LOCAL if k in local else 0)
                     | (_BE_NOT_READY if k in not_ready and not_ready[k] == refs[k] else 0),) for k in keys]

    def _write_service_names(self, touched: set, stats: ApplyStats) -> None:
        names = sorted(n for n in touched if n in self._svc_refs and n not in self._svc_id)
        idents = self._svc_ids.allocate_many(len(names))
        self._svc_id.update(zip(names, idents))
        self._batch("lb_service_names", _update_records, self.names_map, idents, [n.encode() for n in names])
        stats.services_written += len(names)

    def _plan_frontends(self, touched: dict, full: bool, stats: ApplyStats) -> _FrontendPlan:
        """Ids, table sources and source ranges of the touched frontends; nothing written yet
        but the zeroed stats of new frontend ids."""
        plan = _FrontendPlan([], [], [], [], set(), set())
        fresh: list[int] = []
        be_id = self._be_id
        for key in touched:
            w = self._want.get(key)
            if w is None:
                if key in self._marker_refs:
                    if self._fe.get(key) != _MARKER:
                        plan.markers.append((key, _MARKER))
                elif key in self._fe:
                    plan.stale.append(key)
                continue
            old = self._fe.get(key)
            if old is not None and old.frontend_id:
                fid = old.frontend_id
            else:
                fid = self._fe_ids.allocate()
                fresh.append(fid)
            src = tuple.__new__(_TableSource, (w.table_names, tuple(map(be_id.__getitem__, w.table_keys)),
                                               w.table_size))
            if src.size and not (old is not None and old.maglev_size == src.size and self._table_src.get(key) == src):
                plan.rebuild.append(len(plan.entries))
            plan.entries.append(_Planned(key, w, fid, src, old))
            # (Most frontends have no source ranges, and had none.)
            ranges = _source_ranges(w.fe, fid) if w.fe.source_ranges else _NO_RANGES
            was = self._fe_src.get(key, _NO_RANGES)
            if ranges != was:
                plan.src_add.update(ranges - self._src_ranges)
                plan.src_drop.update(was - ranges)
                if ranges:
                    self._fe_src[key] = ranges
                else:
                    del self._fe_src[key]
        self._batch("lb4_frontends", _zero_percpu_ids, self.fe_stats_map, fresh)
        if self.sock_stats_map is not None:
            self._batch("lb4_frontends", _zero_percpu_ids, self.sock_stats_map, fresh)
        stats.stats_zeroed += len(fresh)
        if full:
            want_src = set().union(*self._fe_src.values())
            plan.src_add.clear()
            plan.src_add.update(want_src - self._src_ranges)
            plan.src_drop.update(self._src_ranges - want_src)
        return plan

    def _write_tables(self, plan: _FrontendPlan, todo: list, built: np.ndarray,
                      stats: ApplyStats) -> list[tuple[int, int]]:
        """Write each table rebuilt (`built`: the plan's entries to rebuild, `todo`, back to back)
        that differs from its frontend's current table into a NEW range; return the (offset, size)
        ranges the frontend switch retires."""
        retired: list[tuple[int, int]] = []
        if todo and not any(p.old is not None and p.old.maglev_size for p in todo):
            # Tables of frontends that have none yet (a first sync's): one range for them all.
            try:
                start = self._ranges.allocate(sum(p.table.size for p in todo))
            except IdExhausted:
                pass                # no free run holds them all: table by table, below
            else:
                self._write_new_tables(todo, built, start, stats)
                todo = ()
        slot_keys: list[np.ndarray] = []
        pos = 0
        for p in todo:
            src, old = p.table, p.old
            table = built[pos:pos + src.size]
            pos += src.size
            self._table_src[p.key] = src
            if old is not None and old.maglev_size == src.size and np.array_equal(
                    self._slots[old.maglev_offset:old.maglev_offset + src.size], table):
                continue            # same slots (e.g. only a name changed): keep the range
            offset = self._ranges.allocate(src.size)
            self._slots[offset:offset + src.size] = table
            if self._slots_view is None:
                slot_keys.append(np.arange(offset, offset + src.size, dtype=np.uint32))
            p.new_offset = offset
            stats.tables_written += 1
            stats.slots_written += src.size
            if old is not None and old.maglev_size:
                retired.append((old.maglev_offset, old.maglev_size))
        if slot_keys:
            keys = np.concatenate(slot_keys)
            _write_slots(self.maglev_map, self._slots, keys)
        # Frontends that lose their table (no usable backend left) retire their range too.
        for p in plan.entries:
            if not p.table.size:
                self._table_src.pop(p.key, None)
                if p.old is not None and p.old.maglev_size:
                    retired.append((p.old.maglev_offset, p.old.maglev_size))
        return retired

    def _write_new_tables(self, todo: list, built: np.ndarray, start: int, stats: ApplyStats) -> None:
        """_write_tables' loop for tables of frontends that have none yet, into the one range at
        `start` that holds them all, back to back as they were built: one copy, where the loop
        makes one per table (a first sync's 10,000).  Each still retires on its own: SlotRanges
        keeps the free runs, not the allocations."""
        total = sum(p.table.size for p in todo)
        self._slots[start:start + total] = built[:total]
        for p, offset in zip(todo, itertools.accumulate((p.table.size for p in todo), initial=start)):
            p.new_offset = offset
        if self._slots_view is None:
            _write_slots(self.maglev_map, self._slots, np.arange(start, start + total, dtype=np.uint32))
        self._table_src.update((p.key, p.table) for p in todo)
        stats.tables_written += len(todo)
        stats.slots_written += total

    def _switch_frontends(self, plan: _FrontendPlan, stats: ApplyStats) -> None:
        """The frontend entries and address markers: the single write that switches each frontend
        to its new table (and backends, flags)."""
        fe_writes = list(plan.markers)
        for p in plan.entries:
            if p.new_offset is not None:
                offset = p.new_offset                   # its table in a new range
            elif p.table.size and p.old is not None:
                offset = p.old.maglev_offset            # the table it has
            else:
                offset = 0
            fe = p.want.fe
            val = FrontendEntry(self._svc_id[p.want.name], p.frontend_id, offset, p.table.size,
                                len(p.table.ids), fe.affinity_timeout, _service_flags(fe))
            if p.old != val:
                fe_writes.append((p.key, val))
        four, six = _split(fe_writes, lambda w: w[0][0])
        self._batch("lb4_frontends", _update_records, self.frontends_map, [k for k, _ in four], [v for _, v in four])
        if six:
            self._batch("lb4_frontends", _update_records, self._v6(self.frontends6_map),
                        [k for k, _ in six], [v for _, v in six])
        self._fe.update(fe_writes)
        stats.frontends_written += len(fe_writes)

    def _delete_frontends(self, plan: _FrontendPlan, retired: list, stats: ApplyStats) -> None:
        """Frontends nothing wants, then the Maglev ranges and source ranges they used."""
        four, six = _split(plan.stale, lambda k: k[0])
        _delete_batch(self.frontends_map, [self.frontends_map.Key(*k) for k in four])
        if six:
            _delete_batch(self.frontends6_map, [self.frontends6_map.Key(*k) for k in six])
        src_drop = plan.src_drop
        for key in plan.stale:
            val = self._fe.pop(key)
            if val.maglev_size:
                retired.append((val.maglev_offset, val.maglev_size))
            if val.frontend_id:
                self._fe_ids.release(val.frontend_id)
            self._table_src.pop(key, None)
            src_drop |= self._fe_src.pop(key, set())
        stats.frontends_deleted += len(plan.stale)
        for off, size in retired:
            self._ranges.release(off, size)
        # Ranges no frontend enforces any more: only now that the frontends stopped using them.
        self._prune_source_ranges(src_drop & self._src_ranges, stats)

    def _delete_backends(self, stale: list[int], stats: ApplyStats) -> None:
        four, six = _split(stale, lambda i: self._be_val[i][0])       # (BackendEntry.address)
        _delete_batch(self.backends_map, [self.backends_map.Key(i) for i in four])
        if six:
            _delete_batch(self.backends6_map, [self.backends6_map.Key(i) for i in six])
        for ident in stale:
            del self._be_id[self._be_val.pop(ident)[:3]]                # (BackendEntry.key)
            self._be_ids.release(ident)
        stats.backends_deleted += len(stale)

    def _delete_service_names(self, touched: set, stats: ApplyStats) -> None:
        stale = [n for n in touched if n not in self._svc_refs and n in self._svc_id]
        _delete_batch(self.names_map, [self.names_map.Key(self._svc_id[n]) for n in stale])
        for name in stale:
            self._svc_ids.release(self._svc_id.pop(name))
        stats.services_deleted += len(stale)

    def _count(self, w: _FeWant, sign: int, touched_be: dict, touched_names: set) -> None:
        """Add (sign 1) or drop (-1) the references one frontend holds."""
        refs = self._be_refs
        for bkey, flags in zip(w.backend_keys, w.backend_flags):
            n = refs.get(bkey, 0) + sign          # _add, inline: this runs for every backend of a full sync
            if n:
                refs[bkey] = n
            else:
                del refs[bkey]
            if flags:
                if flags & abi.LB_BE_F_TERMINATING:
                    _add(self._be_terminating, bkey, sign)
                if flags & abi.LB_BE_F_LOCAL:
                    _add(self._be_local, bkey, sign)
                if flags & abi.LB_BE_F_NOT_READY:
                    _add(self._be_not_ready, bkey, sign)
        touched_be.update(dict.fromkeys(w.backend_keys))      # (an ordered set)
        _add(self._svc_refs, w.name, sign)
        touched_names.add(w.name)
        _add(self._marker_refs, w.marker, sign)

    # ---- loadBalancerSourceRanges -----------------------------------------------------
    # Never open to everyone by accident: a frontend's flag (LB_SVC_F_SOURCE_RANGES, in its
    # entry) is set only after its prefixes are in the map, and prefixes are removed only after
    # the entries that name them were switched (changed ranges: old and new are both admitted
    # for the moment between; removed ranges: the flag goes first, as the user asked).

    def _write_source_ranges(self, new: set[tuple[int, int, int]], stats: "ApplyStats") -> None:
        new = sorted(new, key=_range_order)
        if not new:
            return
        four, six = _split(new, lambda r: r[2])
        if four and self.src_ranges_map is None:
            raise RuntimeError("loadBalancerSourceRanges wanted but the datapath has no lb4_source_ranges map")
        for m, rows in ((self.src_ranges_map, four), (self._v6(self.src_ranges6_map) if six else None, six)):
            if rows:
                _update_batch(m, [(m.Key(plen, fid, addr), m.Leaf(1)) for fid, plen, addr in rows])
        self._src_ranges.update(new)
        stats.ranges_written += len(new)

    def _prune_source_ranges(self, stale: set[tuple[int, int, int]], stats: "ApplyStats") -> None:
        stale = sorted(stale, key=_range_order)
        four, six = _split(stale, lambda r: r[2])
        for m, rows in ((self.src_ranges_map, four), (self.src_ranges6_map, six)):
            if rows and m is not None:
                _delete_batch(m, [m.Key(plen, fid, addr) for fid, plen, addr in rows])
                self._src_ranges.difference_update(rows)
                stats.ranges_deleted += len(rows)

    # ---- ids, for inspection and tests ------------------------------------------------

    def service_id(self, spn: ServicePortName) -> int | None:
        return self._svc_id.get(service_name(spn))

    def backend_id(self, backend: Backend) -> int | None:
        return self._be_id.get(_backend_key(backend))

    def frontend_id(self, fe: Frontend) -> int | None:
        val = self._fe.get(_frontend_key(fe))
        return val[1] if val else None

    def free_slots(self) -> int:
        return self._ranges.free_slots

    @staticmethod
    def _v6(table):
        """An IPv6 map, which a datapath without the lb6_* maps cannot offer."""
        if table is None:
            raise RuntimeError("an IPv6 frontend or backend wanted but the datapath has no lb6_* maps")
        return table


def _taken(prepared: _Prepared, todo: list) -> Callable[[], np.ndarray]:
    """The wait for the plan's tables from prepare()'s positions (maglev.take), as start_tables'."""
    return lambda: maglev.take(prepared.positions(), [(prepared.offsets[id(p.want.fe)], p.table.size, p.table.ids)
                                                      for p in todo], reuse=True)


def _add(counts: dict, key, sign: int) -> None:
    """Move a reference count; a count of 0 leaves the dict (absent = unreferenced)."""
    n = counts.get(key, 0) + sign
    if n:
        counts[key] = n
    else:
        del counts[key]


def _split(items: list, address_of) -> tuple[list, list]:
    """(IPv4 items, IPv6 items), by the stored address `address_of` each one names."""
    four, six = [], []
    for item in items:
        (six if _is6(address_of(item)) else four).append(item)
    return four, six


def _family_first(key: FrontendKey):
    """Sort key of FrontendKeys of both families (IPv4Address and IPv6Address do not compare)."""
    return (key.address.version, key)


def _range_order(r: tuple):
    """Sort key of (frontend id, prefix length, address) source-range entries of both families."""
    return (r[0], r[1], _is6(r[2]), r[2])


def _address(addr):
    """An lbmodel address as its map fields hold it: abi.be32 (IPv4) or abi.be128 (IPv6)."""
    if type(addr) is ipaddress.IPv4Address:     # (before `version`, a property: a Python call each)
        return abi.be32(addr)
    return abi.be128(addr) if addr.version == 6 else abi.be32(addr)


def _frontend_key(fe: Frontend) -> FeKey:
    address, port, protocol, scope = fe.key
    # (The port and protocol number without a Python call each: a full sync keys 10,000 frontends.)
    return (_address(address), socket.htons(port), _PROTOCOL_NUMBER[protocol], int(scope))


def _backend_key(b: Backend) -> BeKey:
    return (_address(b.address), abi.be16(b.port), _PROTOCOL_NUMBER[b.protocol])


_PROTOCOL_NUMBER = {p: p.number for p in Protocol}     # Protocol.number is a property: a call per backend


def _backend_keys(rows: BackendRows) -> tuple[BeKey, ...]:
    """_backend_key() of every row, by columns (a full sync keys 100,000 backends)."""
    protocols = map(_PROTOCOL_NUMBER.__getitem__, rows.protocols)
    if rows.family == 4:
        addresses = map(socket.htonl, map(int, rows.addresses))     # abi.be32, without its type checks
    else:
        addresses = map(_address, rows.addresses)
    return tuple(zip(addresses, map(socket.htons, rows.ports), protocols))


def _table_names(rows: BackendRows, chosen: list[int] | None = None) -> tuple[str, ...]:
    """The names a frontend's Maglev table is built from: all of them when every row serves
    (BackendRows.plain), else those of BackendRows.table_rows() (`chosen`, when known)."""
    if rows.plain:
        return rows.names
    return tuple([rows.names[i] for i in (rows.table_rows() if chosen is None else chosen)])


def _frontend_want(fe: Frontend) -> _FeWant:
    if fe.key.port <= 0 or fe.key.port > 65535:
        raise ValueError(f"frontend {fe.key}: port must be 1..65535")
    key = _frontend_key(fe)
    version = fe.key.address.version
    rows = backend_rows(fe.backends)
    if rows and rows.family != version:
        bad = next(n for n, a in zip(rows.names, rows.addresses) if a.version != version)
        raise ValueError(f"frontend {fe.key}: backend {bad} is not of the frontend's IP family")
    # One key per (address, port, proto), as rows have one per name: a backend terminating or
    # local in any frontend is so in all of them (not ready only if so in all: _count).
    keys = _backend_keys(rows)
    flags = tuple(map(_ENTRY_FLAGS.__getitem__, rows.flags))
    if rows.plain:          # the table is built from all of them, in the rows' (name) order
        table_names, table_keys = rows.names, keys
    else:
        chosen = rows.table_rows()
        table_names, table_keys = _table_names(rows, chosen), tuple([keys[i] for i in chosen])
    # (_FeWant._make without its length check: a NamedTuple's __new__ is a Python call.)
    return tuple.__new__(_FeWant, (fe, key, (key[0], 0, key[2], key[3]), service_name(fe.service), keys, flags,
                                   table_names, table_keys, maglev.table_size(len(table_names))))


_BE_TERMINATING, _BE_LOCAL, _BE_NOT_READY = abi.LB_BE_F_TERMINATING, abi.LB_BE_F_LOCAL, abi.LB_BE_F_NOT_READY
_NO_FLAGS, _LOCAL_FLAGS = (0,), (_BE_LOCAL,)        # an entry's flags field, to append to its key
# BackendRows.flags (lbmodel's bits) -> the entry's LB_BE_F_* bits, for each of the 8 values.
_ENTRY_FLAGS = [(_BE_TERMINATING if f & TERMINATING else 0) | (_BE_NOT_READY if f & NOT_READY else 0)
                | (_BE_LOCAL if f & LOCAL else 0) for f in range(8)]


_NO_RANGES: frozenset = frozenset()


def _source_ranges(fe: Frontend, fid: int) -> set[tuple[int, int, int]]:
    """(frontend id, LPM prefix length, address) for every source range of a frontend."""
    out = set()
    for net in _family_ranges(fe):
        out.add((fid, 32 + net.prefixlen, _address(net.network_address)))
    return out


def _family_ranges(fe: Frontend) -> list:
    """A frontend's loadBalancerSourceRanges of its own family, as kube-proxy filters them per family
    (a dual-stack Service lists both): a range of the other family can match none of its clients."""
    version = fe.key.address.version
    nets = (ipaddress.ip_network(net, strict=False) for net in fe.source_ranges)
    return [net for net in nets if net.version == version]


def _service_flags(fe: Frontend) -> int:
    flags = _KIND_FLAGS[fe.kind]
    if fe.source_ranges and _family_ranges(fe):
        flags |= abi.LB_SVC_F_SOURCE_RANGES
    if fe.affinity_timeout > 0:
        flags |= abi.LB_SVC_F_AFFINITY
    if fe.algorithm is Algorithm.RANDOM:
        flags |= abi.LB_SVC_F_RANDOM
    if fe.local_only:
        flags |= abi.LB_SVC_F_LOCAL_ONLY
    return flags
