"""Maglev consistent hashing: which backend owns each slot of a frontend's lookup table.

The datapath hashes a new flow's 5-tuple to a slot of the frontend's Maglev table
(a contiguous range of the flat `maglev` BPF array) and sends the flow to the
backend stored there.  This module computes those tables: pure functions over
numpy arrays, no maps, no kernel, so every node computes byte-identical tables from the same backend
names and unit tests need no root.

Algorithm: Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI'16, section 3.4.  Each backend i has a permutation of the M
slots, perm[i][j] = (offset_i + j * skip_i) mod M (M prime, so every skip
visits every slot); backends take turns, in sorted-name order, each claiming
the first slot of its permutation not already taken, until the table is full.
See docs/maglev.md for the measured balance and disruption figures.

The population loop runs in C (maglev_fill.c, through cffi, built once per machine into a cache
directory) when a compiler is there, many tables per call: a full sync of 10,000 Services builds
10 M slots.  The backend names are hashed in C too (maglev_hash.c, with libb2), all of a call's
at once.  A call of a million slots or more (a full sync) is cut into runs of tables, hashed and
filled side by side on the node's cores.  Without a compiler or libb2, the same loop and hashlib
in Python give the same tables, only slower.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import itertools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Slots per backend the paper recommends (M > 100 * N): a backend's share of new
# flows then differs from 1/N by at most 1%, and a backend change moves few
# slots beyond the ones that must move.
SLOTS_PER_BACKEND = 100

# Smallest table, and the first rung of the size ladder (see table_size).  Most
# Services have one to three backends; 251 slots (1 KiB) make one slot 0.4% of
# their traffic, so even a 2- or 3-backend split is within 0.4% of even
# (125/126, 83/84) and those services share one size, and so keep their table
# size, as they scale from 1 to 2 backends.
MIN_TABLE_SIZE = 251

# Below this many backends the plain loop beats the vectorised rounds: numpy
# pays ~15 us per round and there are M / N rounds.  Measured crossover on this
# machine is ~300 backends (N=100: 5 ms vs 9 ms; N=1000: 86 ms vs 40 ms); both
# fills give identical tables (tests/unit/test_maglev.py).
SEQUENTIAL_BELOW = 256

# Two personalisations of blake2b act as two independent hash functions
# (offset and skip must not be correlated, or permutations cluster).  Stable
# across Python versions, processes and nodes, unlike hash().
_OFFSET_PERSON = b"ebpfsvc/mgl/off"
_SKIP_PERSON = b"ebpfsvc/mgl/skip"


def is_prime(n: int) -> bool:
    """Trial division: table sizes are at most a few million, so sqrt(n) is small."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(n: int) -> int:
    """Smallest prime >= n."""
    while not is_prime(n):
        n += 1
    return n


@functools.lru_cache(maxsize=4096, typed=True)     # typed: table_size(True) must still refuse
def table_size(backend_count: int) -> int:
    """Prime table size M for N backends; 0 for N == 0.

    M is the smallest rung of a ladder of primes, next_prime(MIN_TABLE_SIZE * 2**k),
    that is >= SLOTS_PER_BACKEND * N.  Why a ladder and not the smallest prime
    >= 100 * N: Maglev's small disruption holds only while M stays the same.  A
    table rebuilt with another M is a new, unrelated permutation: about
    (N-1)/N of its slots change backend, so every backend change would remap
    nearly every flow that has no conntrack entry (other nodes, agent restart)
    and make the writer rewrite the whole range.  With doubling rungs M changes
    only when N crosses a rung, i.e. about log2(N) times as a service scales
    from 1 to N backends, at the cost of at most 2x memory (<= 800 bytes per
    backend).  Memory follows backends, not services x a fixed size.
    """
    if isinstance(backend_count, bool) or not isinstance(backend_count, int) or backend_count < 0:
        raise ValueError(f"backend_count must be a non-negative int, got {backend_count!r}")
    if backend_count == 0:
        return 0
    wanted = SLOTS_PER_BACKEND * backend_count
    rung = MIN_TABLE_SIZE
    while rung < wanted:
        rung *= 2
    return next_prime(rung)


@functools.lru_cache(maxsize=1 << 20)
def name_hashes(name: str) -> tuple[int, int]:
    """The two 64-bit hashes of a backend name, before reduction to a table size: a backend's
    offset and skip in a table of size M are these modulo M and M - 1 (+1).  hashlib's, the
    reference maglev_hash.c is tested against and the fallback without it.  Cached: a backend
    is in several tables (one per frontend) and every rebuild of its Service's tables."""
    data = name.encode("utf-8")
    # Copies of two keyed-up hashers: the same digests as new blake2b objects, at half the cost.
    off, skip = _OFFSET_HASHER.copy(), _SKIP_HASHER.copy()
    off.update(data)
    skip.update(data)
    return int.from_bytes(off.digest(), "little"), int.from_bytes(skip.digest(), "little")


_OFFSET_HASHER = hashlib.blake2b(digest_size=8, person=_OFFSET_PERSON)
_SKIP_HASHER = hashlib.blake2b(digest_size=8, person=_SKIP_PERSON)


def hash_names(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """name_hashes of every name, as two uint64 arrays (offset hashes, skip hashes): in one C call
    when hasher() is built, else name by name through the cache."""
    lib = hasher()
    if lib is None:
        pairs = np.fromiter(itertools.chain.from_iterable(map(name_hashes, names)), dtype=np.uint64,
                            count=2 * len(names))
        return pairs[0::2].copy(), pairs[1::2].copy()
    run = _HashRun(lib, names)
    run(0, len(names))
    return run.h_offset, run.h_skip


class _HashRun:
    """The names back to back (UTF-8, each one's length in bytes) and the two arrays their hashes
    go to, as maglev_name_hashes reads and writes them; calling it hashes names [n0, n1), so the
    parts of a full sync can each hash their own."""

    def __init__(self, lib, names: Sequence[str]):
        blob = "".join(names).encode("utf-8")
        if len(blob) == sum(map(len, names)):       # all ASCII (every backend name): a char is a byte
            lengths = np.fromiter(map(len, names), dtype=np.uint32, count=len(names))
        else:
            lengths = np.fromiter((len(n.encode("utf-8")) for n in names), dtype=np.uint32, count=len(names))
        self.lib, self.lengths = lib, lengths
        self.h_offset = np.empty(len(names), dtype=np.uint64)
        self.h_skip = np.empty(len(names), dtype=np.uint64)
        ffi = lib.ffi
        self._buffers = (ffi.from_buffer("uint8_t[]", blob), ffi.from_buffer("uint32_t[]", lengths),
                         ffi.from_buffer("uint64_t[]", self.h_offset), ffi.from_buffer("uint64_t[]", self.h_skip))

    def __call__(self, n0: int, n1: int) -> None:
        blob, lengths, h_offset, h_skip = self._buffers
        byte0 = int(self.lengths[:n0].sum()) if n0 else 0
        if self.lib.lib.maglev_name_hashes(n1 - n0, blob + byte0, lengths + n0, _PERSON_OFFSET_16, _PERSON_SKIP_16,
                                           h_offset + n0, h_skip + n0) != 0:
            raise RuntimeError("maglev_name_hashes: libb2 refused the parameters")


# The personalisations as libb2's parameter block holds them (hashlib pads them the same way).
_PERSON_OFFSET_16 = _OFFSET_PERSON.ljust(16, b"\0")
_PERSON_SKIP_16 = _SKIP_PERSON.ljust(16, b"\0")


def permutation_params(names: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, skip) per name, int64: offset in [0, M), skip in [1, M)."""
    h_offset, h_skip = hash_names(names)
    offset = (h_offset % np.uint64(size)).astype(np.int64)
    skip = (h_skip % np.uint64(size - 1) + np.uint64(1)).astype(np.int64)
    return offset, skip


def _check_args(names: Sequence[str], size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, got {size!r}")
    if isinstance(names, str):
        raise ValueError("names must be a sequence of backend names, not one str")
    if size == 0:
        if len(names):
            raise ValueError(f"size is 0 but names has {len(names)} backends")
        return
    if not names:
        raise ValueError(f"names is empty; a table of size {size} needs at least one backend")
    if not is_prime(int(size)):
        raise ValueError(f"size must be prime (so every skip visits every slot), got {size}")
    if size < len(names):
        raise ValueError(f"size {size} is smaller than the {len(names)} names: some backends get no slot")
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"names must be str, got {n!r}")
    if len(set(names)) != len(names):
        raise ValueError("names has duplicates; each backend must have one stable name")


def build_table(names: Sequence[str], size: int) -> np.ndarray:
    """Maglev lookup table: shape (size,), int32, each slot an index into `names` as given.

    The table depends only on the set of names and on size, not on their order:
    names are sorted before the population loop and the result is mapped back
    to the caller's indices.  size must be prime and >= len(names); empty names
    only with size 0 (then an empty table).
    """
    _check_args(names, size)
    size = int(size)
    if size == 0:
        return np.empty(0, dtype=np.int32)
    order = sorted(range(len(names)), key=names.__getitem__)
    if native() is not None:
        return build_tables([([names[i] for i in order], size, order)]).view(np.int32)
    offset, skip = permutation_params([names[i] for i in order], size)
    fill = _fill_sequential if len(names) < SEQUENTIAL_BELOW else _fill_by_rounds
    by_sorted_rank = fill(offset, skip, size)
    return np.asarray(order, dtype=np.int32)[by_sorted_rank]


def build_tables(tables: Sequence[tuple[Sequence[str], int, Sequence[int]]]) -> np.ndarray:
    """Many Maglev tables in one pass, back to back: for each (names, size, values), `size`
    uint32 slots, each the value of the backend that owns it (values[i] is names[i]'s: a backend
    id), i.e. values[build_table(names, size)].  `names` must be sorted and distinct, `size` as
    table_size() gives (prime, >= len(names)); the map writer passes what it derived so."""
    return start_tables(tables)()


def start_tables(tables: Sequence[tuple[Sequence[str], int, Sequence[int]]]) -> Callable[[], np.ndarray]:
    """build_tables(tables), begun: returns the call that waits for its result.  The tables of a
    full sync (PARALLEL_SLOTS or more) are hashed and filled on threads, in C with the GIL let go,
    while the caller goes on with its own work (the map writer writes backends and names
    meanwhile); a change's few are built before this returns, as a thread costs more than they do."""
    counts = np.fromiter((len(names) for names, _, _ in tables), dtype=np.uint32, count=len(tables))
    values = np.fromiter((v for _, _, vs in tables for v in vs), dtype=np.uint32, count=int(counts.sum()))
    workers = _fill_workers(sum(size for _, size, _ in tables))
    return _start([(names, size) for names, size, _ in tables], counts, values, workers if workers > 1 else 0)


def start_positions(tables: Sequence[tuple[Sequence[str], int]]) -> Callable[[], np.ndarray]:
    """start_tables() of (names, size) tables whose values are not known yet: each slot holds its
    backend's position in `names` (0 .. n-1), and take() makes them the values once they are.  So
    a starting agent fills the tables on the other cores while it works out the backends' ids
    (MapWriter.prepare).  As the caller goes on with its own work all along, the fill leaves it a
    core: on 2 cores one thread fills (two beside the caller made its work 40-60% slower)."""
    counts = np.fromiter((len(names) for names, _ in tables), dtype=np.uint32, count=len(tables))
    starts = np.cumsum(counts, dtype=np.int64) - counts
    values = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)).astype(np.uint32)
    total = sum(size for _, size in tables)
    return _start(tables, counts, values, max(1, _fill_workers(total) - 1) if total >= PARALLEL_SLOTS else 0)


def take(positions: np.ndarray, tables: Sequence[tuple[int, int, Sequence[int]]], reuse: bool = False) -> np.ndarray:
    """Tables that start_positions() filled, made tables of values: for each (offset, size,
    values), the table at positions[offset:offset + size], each slot values[its position]; back to
    back, as start_tables() of the same names, sizes and values builds them.  With `reuse`, when
    the tables are all of `positions`, in order (a starting agent's), they are made in place: no
    second array of every slot (at 100,000 × 10, 400 MB the kernel would map in page by page)."""
    sizes = np.fromiter((size for _, size, _ in tables), dtype=np.uint32, count=len(tables))
    src = np.fromiter((offset for offset, _, _ in tables), dtype=np.uint64, count=len(tables))
    total = int(sizes.sum())
    lib = native()
    in_place = (reuse and lib is not None and positions.dtype == np.uint32 and positions.flags.c_contiguous
                and positions.flags.writeable and positions.size == total
                and np.array_equal(src, np.cumsum(sizes, dtype=np.uint64) - sizes))
    out = positions if in_place else np.empty(total, dtype=np.uint32)
    if lib is None:
        pos = 0
        for offset, size, values in tables:
            out[pos:pos + size] = np.asarray(values, dtype=np.uint32)[positions[offset:offset + size]]
            pos += size
        return out
    counts = np.fromiter((len(values) for _, _, values in tables), dtype=np.uint64, count=len(tables))
    first = np.cumsum(counts, dtype=np.uint64) - counts
    values = np.fromiter(itertools.chain.from_iterable(v for _, _, v in tables), dtype=np.uint32, count=int(counts.sum()))
    positions = np.ascontiguousarray(positions, dtype=np.uint32)
    ffi = lib.ffi
    # (In place, each slot is read before it is written: out[k] and positions[k] are one slot.)
    lib.lib.maglev_take(len(tables), ffi.from_buffer("uint32_t[]", sizes), ffi.from_buffer("uint64_t[]", src),
                        ffi.from_buffer("uint64_t[]", first), ffi.from_buffer("uint32_t[]", values),
                        ffi.from_buffer("uint32_t[]", positions), ffi.from_buffer("uint32_t[]", out))
    return out


def _start(tables: Sequence[tuple[Sequence[str], int]], counts: np.ndarray, values: np.ndarray,
           workers: int) -> Callable[[], np.ndarray]:
    """start_tables(), with each table's backend count and all the values made, on `workers`
    threads (0: at once, in the caller's thread)."""
    total = sum(size for _, size in tables)
    out = np.empty(total, dtype=np.uint32)
    lib = native()
    if lib is None:
        pos = first = 0
        for (names, size), n in zip(tables, counts.tolist()):
            if size:
                out[pos:pos + size] = values[first:first + n][build_table(names, size)]
            pos += size
            first += n
        return lambda: out
    sizes = np.fromiter((size for _, size in tables), dtype=np.uint32, count=len(tables))
    total_names = int(counts.sum())
    names = list(itertools.chain.from_iterable(names for names, _ in tables))
    hashes = hasher()
    if hashes is None:
        hash_run = None
        h_offset, h_skip = hash_names(names)
    else:       # each part hashes its own names, below
        hash_run = _HashRun(hashes, names)
        h_offset, h_skip = hash_run.h_offset, hash_run.h_skip
    ffi = lib.ffi
    args = [ffi.from_buffer("uint32_t[]", counts), ffi.from_buffer("uint32_t[]", sizes),
            ffi.from_buffer("uint64_t[]", h_offset), ffi.from_buffer("uint64_t[]", h_skip),
            ffi.from_buffer("uint32_t[]", values), ffi.from_buffer("uint32_t[]", out)]

    def fill(part: tuple[int, int, int, int, int]) -> int:
        """Tables [t0, t1), whose names are [n0, n1) and slots start at s0: hashed, then filled."""
        t0, t1, n0, n1, s0 = part
        if hash_run is not None:
            hash_run(n0, n1)
        n, size, h_off, h_sk, value, slots = args
        return lib.lib.maglev_fill(t1 - t0, n + t0, size + t0, h_off + n0, h_sk + n0, value + n0, slots + s0)

    def done(results: list[int]) -> np.ndarray:
        if any(results):
            raise MemoryError("maglev_fill: out of memory")
        return out

    if not workers:         # (a change's few tables: no cutting up, no thread)
        built = done([fill((0, len(tables), 0, total_names, 0))])
        return lambda: built
    # cffi lets go of the GIL for the calls: the parts fill side by side, one per core, and beside
    # the caller.  (What allocates, above, ran in the caller's thread.)
    parts = _parts(counts, sizes, workers)
    pool = concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="maglev-fill")
    try:
        running = [pool.submit(fill, part) for part in parts]
    finally:
        pool.shutdown(wait=False)
    return lambda: done([f.result() for f in running])


# A build_tables call of this many slots or more fills on several cores: a full sync (10,000 tables
# of 1009 slots take ~140 ms on one core of the 2-core VM), never a change's few tables.
PARALLEL_SLOTS = 1 << 20
MAX_FILL_WORKERS = 4


def _fill_workers(total_slots: int) -> int:
    if total_slots < PARALLEL_SLOTS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_FILL_WORKERS))


def _parts(counts: np.ndarray, sizes: np.ndarray, workers: int) -> list[tuple[int, int, int, int, int]]:
    """The tables cut into `workers` runs of about as many slots each: (first table, end table,
    first name, end name, first slot) per run, every table in one run."""
    ends = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    name_ends = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    total = int(ends[-1])
    cuts = sorted({0, len(sizes), *(int(np.searchsorted(ends, total * k // workers, side="right")) - 1
                                    for k in range(1, workers))})
    return [(t0, t1, int(name_ends[t0]), int(name_ends[t1]), int(ends[t0]))
            for t0, t1 in zip(cuts, cuts[1:]) if t1 > t0] or [(0, 0, 0, 0, 0)]


# ---- the C population loop (maglev_fill.c) and name hashes (maglev_hash.c), built once per machine

_FILL_C = Path(__file__).with_name("maglev_fill.c")
_FILL_CDEF = """int maglev_fill(uint64_t tables, const uint32_t *n, const uint32_t *size, const uint64_t *h_offset,
                const uint64_t *h_skip, const uint32_t *value, uint32_t *out);
int maglev_take(uint64_t tables, const uint32_t *size, const uint64_t *src, const uint64_t *first,
                const uint32_t *value, const uint32_t *positions, uint32_t *out);"""
_HASH_C = Path(__file__).with_name("maglev_hash.c")
_HASH_CDEF = """int maglev_name_hashes(uint64_t count, const uint8_t *blob, const uint32_t *length,
                       const uint8_t *person_offset, const uint8_t *person_skip,
                       uint64_t *h_offset, uint64_t *h_skip);"""
_UNSET = object()
_native = _UNSET
_hasher = _UNSET


def cache_dir() -> Path:
    """Where the compiled fill is kept: $EBPFSVC_CACHE_DIR, else ~/.cache/ebpfsvc."""
    return Path(os.environ.get("EBPFSVC_CACHE_DIR") or Path.home() / ".cache" / "ebpfsvc")


def native():
    """The compiled fill (a cffi module: .ffi, .lib), or None where it cannot be built (then the
    Python loop serves, with the same tables).  Built on first use, keyed by the source and the
    interpreter, so a changed maglev_fill.c is rebuilt and never mixed up with an old one."""
    global _native
    if _native is _UNSET:
        try:
            _native = _build("_ebpfsvc_maglev", _FILL_C, _FILL_CDEF)
        except Exception as exc:       # no compiler, no headers, read-only cache: slower, not wrong
            log.warning("Maglev tables are built in Python, slower: the C fill could not be built (%s)", exc)
            _native = None
    return _native


def hasher():
    """The compiled name hashes (maglev_hash.c, linked with libb2), or None where they cannot be
    built (no libb2: hashlib serves, with the same digests).  Built and kept as native() is."""
    global _hasher
    if _hasher is _UNSET:
        try:
            _hasher = _build("_ebpfsvc_maglev_hash", _HASH_C, _HASH_CDEF, libraries=("b2",))
        except Exception as exc:
            log.warning("backend names are hashed in Python, slower: the C hashes could not be built (%s)", exc)
            _hasher = None
    return _hasher


def _build(prefix: str, c_file: Path, cdef: str, libraries: tuple[str, ...] = ()):
    import cffi

    source = c_file.read_text()
    tag = hashlib.sha256((source + cdef + repr(libraries) + sys.implementation.cache_tag).encode()).hexdigest()[:16]
    name = f"{prefix}_{tag}"
    where = cache_dir()
    built = sorted(where.glob(f"{name}.*.so")) if where.is_dir() else []
    if not built:
        where.mkdir(parents=True, exist_ok=True)
        builder = cffi.FFI()
        builder.cdef(cdef)
        builder.set_source(name, source, extra_compile_args=["-O2"], libraries=list(libraries))
        # Built aside and renamed in: a concurrent start never imports a half-written file.
        tmp = tempfile.mkdtemp(dir=where, prefix=".build-")
        try:
            so = Path(builder.compile(tmpdir=tmp, verbose=False))
            os.replace(so, where / so.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built = [where / so.name]
    spec = importlib.util.spec_from_file_location(name, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fill_sequential(offset: np.ndarray, skip: np.ndarray, size: int) -> np.ndarray:
    """The paper's population loop (pseudocode 1), one backend's turn at a time.

    Each backend's next candidate is kept as a slot and advanced by adding skip,
    so the loop does no multiplication or modulo beyond one subtraction.
    """
    n = len(offset)
    skip_l = skip.tolist()
    candidate = offset.tolist()
    entry = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            c, s = candidate[i], skip_l[i]
            while entry[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            entry[c] = i
            filled += 1
            if filled == size:
                return np.array(entry, dtype=np.int32)
            c += s
            candidate[i] = c - size if c >= size else c


def _fill_by_rounds(offset: np.ndarray, skip: np.ndarray, size: int) -> np.ndarray:
    """The same fill as _fill_sequential, one round (every backend claims one slot) at a time.

    Within a round backend k must get the first slot of its permutation not
    taken in an earlier round nor by a backend < k in this round.  Instead of
    walking backends one by one, all of them search at once and conflicts are
    settled by rank: `owner[slot]` holds the lowest backend that claimed the
    slot so far this round (-1 once taken in an earlier round, `free` if never).
    A backend stops at a slot whose owner is > itself and bumps that owner back
    to searching.  Owners only decrease and search positions only advance, so
    this reaches a fixpoint, and at the fixpoint every slot a backend skipped
    is held by a lower backend: exactly the sequential result.
    """
    n = len(offset)
    free = np.iinfo(np.int64).max
    owner = np.full(size, free, dtype=np.int64)
    table = np.full(size, -1, dtype=np.int32)
    next_j = np.zeros(n, dtype=np.int64)    # index of each backend's next candidate in its permutation
    filled = 0
    while filled < size:
        # The last round is partial: only the first (size - filled) backends get a turn.
        players = min(n, size - filled)
        held = np.full(players, -1, dtype=np.int64)   # slot each player holds this round
        searching = np.arange(players, dtype=np.int64)
        while searching.size:
            slots = _first_claimable(offset, skip, next_j, owner, searching, size, size - filled)
            np.minimum.at(owner, slots, searching)
            held[searching] = slots
            # Losers: players whose slot is now owned by a lower one (same-round
            # collisions and players bumped by a newcomer); they resume after it.
            searching = np.flatnonzero(owner[held] != np.arange(players))
            next_j[searching] += 1
        table[held] = np.arange(players, dtype=np.int32)
        owner[held] = -1
        next_j[:players] += 1
        filled += players
    return table


def _first_claimable(offset, skip, next_j, owner, who, size, free_slots) -> np.ndarray:
    """For each backend in `who`, the first slot from its next candidate on whose owner is > it.

    Candidates are tested a block at a time; the block length follows the
    expected search length (size / free_slots) so late rounds, when the table is
    nearly full, need one numpy pass instead of hundreds.  Advances next_j.
    """
    out = np.empty(who.size, dtype=np.int64)
    pending = np.arange(who.size)
    block = min(size, 4 + 2 * size // max(free_slots, 1))
    steps = np.arange(block, dtype=np.int64)
    while pending.size:
        k = who[pending]
        cand = (offset[k, None] + (next_j[k, None] + steps) * skip[k, None]) % size
        ok = owner[cand] > k[:, None]
        first = ok.argmax(axis=1)
        found = ok[np.arange(k.size), first]
        next_j[k] += np.where(found, first, block)
        out[pending[found]] = cand[found, first[found]]
        pending = pending[~found]
    return out


def changed_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Slot indices whose value differs: what a delta write must touch (Katran writes only these).

    Compare tables of backend *ids* (ids[table]), not raw build_table output:
    indices into two different name lists are not comparable.  Tables of
    different sizes share no slots, so then every slot of `new` is returned.
    """
    old = np.asarray(old)
    new = np.asarray(new)
    if old.shape != new.shape:
        return np.arange(new.size, dtype=np.int64)
    return np.flatnonzero(old != new)
