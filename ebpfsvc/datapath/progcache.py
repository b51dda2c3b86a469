"""Compiled datapath programs kept on disk, so that only the first compile on a machine pays bcc.

bcc compiles lb_pod.c in seconds and lb_node.c in more, at every agent start. Once bcc has
compiled a program and the kernel has accepted it, store() keeps its instructions with, for
each map reference (BPF_LD_IMM64 with src_reg BPF_PSEUDO_MAP_FD), the name of the map it was.
A later start with the same key (load()) writes the fds of the maps opened now into those
instructions and loads them with BPF_PROG_LOAD (ebpfsvc/datapath/bpfsys.py): milliseconds.

The key covers every input of the compile: the translation unit (the source with the project's
headers inlined), the compiler flags except the pin directory (it names where maps are pinned,
which is in no instruction: nodes of one machine share entries) and the sizes of pinned maps
(size_only_macros: in no instruction either, and the conntrack table's depends on the node's CPUs),
the kernel release and headers tree, bcc's version, the programs and their types, and FORMAT. A
changed #define, or a limit the code uses, is another key. A miss, an unreadable or corrupt entry (a digest covers it), or a load the kernel
refuses is one log line, and the caller compiles with bcc as before.

What a raw load lacks compared with bcc's is BTF (function and line info). The kernel needs it
only for global functions and callbacks (bpf_loop): the datapath has none (every helper is
__always_inline). store() refuses to keep a program with a BPF-to-BPF call or a reference to
a map value (globals), so such a program would always be compiled, never loaded half right.

The maps unit (lb_maps.c, loader.open_maps) is kept too, as a layout rather than programs: each map's
bcc type, flags, size and the key and leaf descriptions bcc's compile gives (store_layout). A
restarted agent whose maps are all pinned in those shapes (loader.stale_pins, as after a compile)
makes the writer's bcc tables from the layout and the pins (open_layout): no compile, where bcc's fixed cost for the unit is 1-2.5 s of a
restart's first change (issue 12). The layout's key keeps every size: a table must say its map's.

The directory must be the process's own and writable by no one else (else it is not used): its
entries are programs loaded into the kernel. Entries are written atomically (a temporary file renamed), so concurrent agents of one machine
(the lab's nodes) share a directory safely: $EBPFSVC_PROGRAM_CACHE, else programs/ in the
cache directory of the Maglev fill (ebpfsvc/maglev.py).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ebpfsvc.datapath import bpfsys

log = logging.getLogger(__name__)

FORMAT = 1      # of an entry and of the key: changed, every old entry is a miss
_LD_IMM64 = 0x18                # BPF_LD | BPF_IMM | BPF_DW: two slots, imm of the first is the fd
_CALL = 0x85                    # BPF_JMP | BPF_CALL
_PSEUDO_MAP_FD = 1              # src_reg of an LD_IMM64 that loads a map by fd
_PSEUDO_CALL = 1                # src_reg of a CALL to a BPF-to-BPF function
_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst_reg:4|src_reg:4, off, imm


def cache_dir() -> Path:
    from ebpfsvc import maglev
    return Path(os.environ.get("EBPFSVC_PROGRAM_CACHE") or maglev.cache_dir() / "programs")


def size_only_macros(text: str, cflags) -> set[str]:
    """The -D names of `cflags` that `text` uses only as the size of a pinned map: each line naming
    one is its own default (#ifndef/#define NAME) or a BPF_TABLE_PINNED declaration. Such a value is
    in no instruction (a map reference is an fd; the verifier reads the size from the map at load),
    so the key leaves it out: nodes of different sizes (--conntrack-max-per-core times the node's
    CPUs sizes ct4/ct6) share one entry. A name used anywhere else stays in the key."""
    names = {f[2:].split("=", 1)[0] for f in cflags if f.startswith("-D")}
    out = set()
    for name in names:
        word = re.compile(rf"\b{re.escape(name)}\b")
        own = re.compile(rf"^\s*#\s*(ifndef|define)\s+{re.escape(name)}\b")
        lines = [line for line in text.splitlines() if word.search(line)]
        if lines and all(own.match(line) or line.lstrip().startswith("BPF_TABLE_PINNED(") for line in lines):
            out.add(name)
    return out


def cache_key(text: str, cflags, programs: dict[str, object], *, with_sizes: bool = False) -> str:
    """sha256 of every input of the compile (the module docstring lists them); `with_sizes` keeps
    the sizes of pinned maps in it (a layout's key)."""
    import bcc
    sizes = set() if with_sizes else size_only_macros(text, cflags)
    inputs = {
        "format": FORMAT,
        "source": hashlib.sha256(text.encode()).hexdigest(),
        "cflags": [f for f in cflags if not f.startswith("-DLB_PIN_DIR=")
                   and f[2:].split("=", 1)[0] not in sizes],
        "kernel": os.uname().release,
        "headers": os.environ.get("BCC_KERNEL_SOURCE", ""),
        "bcc": getattr(bcc, "__version__", "?"),
        "programs": sorted(programs.items()),
    }
    if with_sizes:
        inputs["sizes"] = True
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class LoadedProgram:
    """A program loaded from the cache: what callers use of bcc's BPF.Function."""
    name: str
    fd: int


@dataclass
class CachedObject:
    """Stands in for a bcc object in a Datapath whose programs came from the cache: tables are the
    maps unit's (loader.open_maps), cleanup() closes what this load opened."""
    maps_unit: object
    owns_maps_unit: bool
    fds: list[int] = field(default_factory=list)

    def get_table(self, name):
        return self.maps_unit.get_table(name)

    def cleanup(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.owns_maps_unit:
            self.maps_unit.cleanup()


def _entry_path(directory: Path, key: str, kind: str = "") -> Path:
    """`<key>.json` for programs, `<key>.maps.json` for a maps layout."""
    return Path(directory) / f"{key}{'.' + kind if kind else ''}.json"


def _map_refs(insns: bytes) -> list[tuple[int, int]] | str:
    """(instruction index, fd) of every map reference, or why the program cannot be kept."""
    refs = []
    for i in range(0, len(insns) // 8):
        code, regs, _off, imm = _INSN.unpack_from(insns, i * 8)
        src = regs >> 4
        if code == _LD_IMM64 and src:
            if src != _PSEUDO_MAP_FD:
                return f"instruction {i} references a map value (src_reg {src})"
            refs.append((i, imm))
        elif code == _CALL and src == _PSEUDO_CALL:
            return f"instruction {i} calls a BPF function (its BTF would be needed)"
    return refs


def store(directory, key: str, bpf, programs: dict[str, int], pinned, attach_types: dict[str, int] | None = None) -> bool:
    """Keep the programs `bpf` (a bcc object that compiled and loaded them) has, under `key`.
    `programs`: name -> BPF_PROG_TYPE; `pinned`: names of the maps the loader opens by pin; any
    other map is recorded by shape and made anew at load; `attach_types`: name -> the hook a
    program was loaded for (cgroup programs: the kernel's expected_attach_type). False (and a log
    line) if not kept."""
    import ctypes

    from bcc import libbcc
    lib = libbcc.lib
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]
    tables = {}
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        tables[lib.bpf_table_fd(bpf.module, name)] = name.decode()
    entry = {"format": FORMAT, "key": key, "license": lib.bpf_module_license(bpf.module).decode(),
             "kern_version": lib.bpf_module_kern_version(bpf.module), "programs": {}, "unpinned": {}}
    for name, prog_type in programs.items():
        insns = bpf.dump_func(name.encode())
        refs = _map_refs(insns)
        if isinstance(refs, str) or any(fd not in tables for _, fd in refs):
            why = refs if isinstance(refs, str) else "a map reference is not one of the object's maps"
            log.info("program cache: %s not kept: %s", name, why)
            return False
        code = bytearray(insns)
        for i, fd in refs:
            if tables[fd] not in pinned:
                entry["unpinned"][tables[fd]] = list(bpfsys.map_shape(fd))
            # The fd is this process's (load() writes the loading one's): left out, the same compile
            # stores the same bytes whatever fds its process had open.
            c, regs, off, _imm = _INSN.unpack_from(code, i * 8)
            _INSN.pack_into(code, i * 8, c, regs, off, 0)
        entry["programs"][name] = {"type": prog_type, "insns": base64.b64encode(bytes(code)).decode(),
                                   "maps": [[i, tables[fd]] for i, fd in refs],
                                   "attach_type": (attach_types or {}).get(name, 0)}
    return _write(directory, key, entry)


def _write(directory, key: str, entry: dict, kind: str = "") -> bool:
    """Write `entry` under `key`, with its digest, atomically; False (and a log line) if not."""
    entry["digest"] = _digest(entry)
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, _entry_path(directory, key, kind))      # readers see the whole entry or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("program cache: cannot write %s: %s", directory, e)
        return False
    return True


def _read(directory, key: str, kind: str = "") -> dict | None:
    """The entry under `key`, whole and of this FORMAT, or None: a miss or an unusable entry
    (a log line; the caller compiles). A directory that is not safe is never read."""
    path = _entry_path(directory, key, kind)
    unsafe = _unsafe(Path(directory))
    if unsafe:
        log.warning("program cache: %s not used: %s: compiling", directory, unsafe)
        return None
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != FORMAT or entry.get("key") != key or entry.get("digest") != _digest(entry):
            raise ValueError("digest or format does not match")
    except FileNotFoundError:
        log.info("program cache: miss (%s): compiling", path)
        return None
    except (OSError, ValueError, AttributeError) as e:
        log.warning("program cache: entry %s unusable (%s): compiling", path, e)
        return None
    return entry


def _unsafe(directory: Path) -> str | None:
    """Why `directory` cannot be trusted with programs this process loads into the kernel: another
    user owns it or may write it (as ssh judges ~/.ssh). None when it is ours alone, or absent."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {st.st_mode & 0o777:o})"
    return None


def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load(directory, key: str, map_fds: dict[str, int],
         fillers: dict[str, Callable[[int, int], None]] | None = None, pin_dir=None):
    """The programs kept under `key`, loaded on the maps `map_fds` (name -> fd, the pinned ones);
    maps the entry names as unpinned are created and filled by `fillers[name](fd, max_entries)`
    (derived data; an unpinned map without a filler is not served from the cache). With `pin_dir`,
    the programs a previous run pinned there under `key` are taken as they are (reuse_pinned), and
    programs loaded here are pinned there for the next run (pin_programs).
    Returns ({name: LoadedProgram}, [every fd opened]) or None (a miss, logged in one line)."""
    path = _entry_path(directory, key)
    entry = _read(directory, key)
    if entry is None:
        return None
    try:
        programs = {name: (int(p["type"]), base64.b64decode(p["insns"], validate=True), p["maps"],
                           int(p.get("attach_type", 0))) for name, p in entry["programs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("program cache: entry %s unusable (%s): compiling", path, e)
        return None
    if pin_dir is not None:
        kept = reuse_pinned(pin_dir, key, {name: refs for name, (_t, _i, refs, _a) in programs.items()}, map_fds)
        if kept is not None:
            log.info("program cache: programs %s kept from the previous run (pinned in %s): nothing loaded",
                     ", ".join(kept), Path(pin_dir) / PROGRAM_PINS)
            return {name: LoadedProgram(name, fd) for name, fd in kept.items()}, list(kept.values())
    fillers = fillers or {}
    opened: list[int] = []
    try:
        fds = dict(map_fds)
        for name, (map_type, key_size, value_size, max_entries, flags) in entry["unpinned"].items():
            if name not in fillers:
                raise ValueError(f"unpinned map {name} has no filler")
            fd = bpfsys.map_create(map_type, key_size, value_size, max_entries, flags=flags, name=name)
            opened.append(fd)
            fillers[name](fd, max_entries)
            fds[name] = fd
        patched = {}
        for name, (prog_type, insns, refs, attach_type) in programs.items():
            code = bytearray(insns)
            for index, map_name in refs:
                if map_name not in fds:
                    raise ValueError(f"program {name} references map {map_name}, not opened")
                c, regs, off, _imm = _INSN.unpack_from(code, index * 8)
                if c != _LD_IMM64 or regs >> 4 != _PSEUDO_MAP_FD:
                    raise ValueError(f"program {name}: instruction {index} is no map reference")
                _INSN.pack_into(code, index * 8, c, regs, off, fds[map_name])
            patched[name] = (prog_type, bytes(code), attach_type)
        loaded = {name: LoadedProgram(name, fd) for name, fd in _load_all(patched, entry, opened).items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        for fd in opened:
            os.close(fd)
        log.warning("program cache: entry %s not loaded (%s): compiling", path.name, e)
        return None
    if pin_dir is not None:
        pin_programs(pin_dir, key, {name: p.fd for name, p in loaded.items()})
    return loaded, opened


def _load_all(patched: dict[str, tuple[int, bytes, int]], entry: dict, opened: list[int]) -> dict[str, int]:
    """BPF_PROG_LOAD of every program at once, one thread each (the GIL is released in the syscall):
    the verifier takes seconds per program (from_pod 4-11 s, from_uplink 3-6 s, measured at load
    1-10), and the kernel verifies concurrent loads on as many CPUs. Every fd made goes into
    `opened` (the caller closes them on failure); the first failure is raised."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name):
        prog_type, code, attach_type = patched[name]
        return bpfsys.prog_load(prog_type, code, license=entry["license"], name=name,
                                kern_version=int(entry["kern_version"]), expected_attach_type=attach_type)
    with ThreadPoolExecutor(max(1, min(len(patched), os.cpu_count() or 1)), thread_name_prefix="prog-load") as pool:
        futures = {name: pool.submit(one, name) for name in patched}
    fds, error = {}, None
    for name, future in futures.items():
        try:
            fds[name] = future.result()
            opened.append(fds[name])
        except OSError as e:
            error = error or e
    if error is not None:
        raise error
    return fds


# -- programs kept across a restart -----------------------------------------------------------
# The kernel verifies a program at every BPF_PROG_LOAD: seconds for lb_node.c's, on a small node more
# than the whole rest of a warm start (measured: 5-6 s per object at load 1-4). A restarted agent
# whose programs would be the same (same cache key) on the same maps takes the previous run's
# instead: they are pinned beside the maps, under PROGRAM_PINS/<program>_<key>, and BPF_OBJ_GET
# costs microseconds. The pins are the programs the previous run attached, so nothing changes for
# a packet either.

PROGRAM_PINS = "programs"       # the subdirectory of a pin directory the programs are pinned in
_PIN_NAME = re.compile(r"^(?P<program>[a-z0-9_]+)_(?P<key>[0-9a-f]{32})$")


def store_layout(directory, key: str, bpf, names) -> bool:
    """Keep the layout of the maps `names` of `bpf` (the bcc object of the maps unit) under `key`:
    what open_layout needs to make the same tables without compiling."""
    from bcc import libbcc
    lib = libbcc.lib

    tables = {}
    for name in names:
        table = bpf.get_table(name.encode())
        tables[name] = {"type": table.ttype, "flags": table.flags, "max_entries": table.max_entries,
                        "key": json.loads(lib.bpf_table_key_desc(bpf.module, name.encode()).decode()),
                        "leaf": json.loads(lib.bpf_table_leaf_desc(bpf.module, name.encode()).decode())}
    return _write(directory, key, {"format": FORMAT, "key": key, "tables": tables}, kind="maps")


class _NoModule:
    """The `bpf` of a table made from a layout: no compiled module behind it."""
    module = None


class PinnedTables:
    """Stands in for the maps unit's bcc object (loader.open_maps) when its tables were made from a
    layout (open_layout): get_table() as bcc's, cleanup() closes the pins' fds."""

    def __init__(self, tables: dict[str, object]):
        self.tables = tables

    def get_table(self, name):
        return self.tables[name.decode() if isinstance(name, bytes) else name]

    def cleanup(self) -> None:
        for table in self.tables.values():
            os.close(table.map_fd)
        self.tables = {}


def open_layout(directory, key: str, pin_dir, names) -> PinnedTables | None:
    """The tables `names` of the layout kept under `key`, on the maps pinned in `pin_dir`; a map not
    pinned yet (a new node) is created in the layout's shape and pinned, as the maps unit's compile
    would (_create_pinned). None (a compile) when there is no usable layout of exactly those maps.
    Whether the pins have the layout's shapes is the caller's to check, as after a compile
    (loader.stale_pins)."""
    from bcc import BPF, table as bcc_table

    # bcc's table classes of the map types the datapath declares (bcc.table.Table picks them so)
    classes = {bcc_table.BPF_MAP_TYPE_HASH: bcc_table.HashTable, bcc_table.BPF_MAP_TYPE_ARRAY: bcc_table.Array,
               bcc_table.BPF_MAP_TYPE_LRU_HASH: bcc_table.LruHash, bcc_table.BPF_MAP_TYPE_LPM_TRIE: bcc_table.LpmTrie,
               bcc_table.BPF_MAP_TYPE_PERCPU_ARRAY: bcc_table.PerCpuArray,
               bcc_table.BPF_MAP_TYPE_PERCPU_HASH: bcc_table.PerCpuHash}
    entry = _read(directory, key, kind="maps")
    if entry is None:
        return None
    tables: dict[str, object] = {}
    try:
        if sorted(entry["tables"]) != sorted(names):
            raise LookupError(f"it has maps {sorted(entry['tables'])}")
        for name, layout in entry["tables"].items():
            cls = classes[layout["type"]]
            keytype, leaftype = BPF._decode_table_type(layout["key"]), BPF._decode_table_type(layout["leaf"])
            fd = _open_or_create_pinned(Path(pin_dir) / name, layout, keytype, leaftype)
            try:
                # bcc's constructors read type, flags and size from a compiled module; without one
                # (NULL: libbcc answers -1) they are the layout's, set here.
                t = cls(_NoModule(), -1, fd, keytype, leaftype)
            except BaseException:
                os.close(fd)
                raise
            t.ttype, t.flags, t.max_entries = layout["type"], layout["flags"], layout["max_entries"]
            tables[name] = t
    except Exception as e:      # noqa: BLE001 - bcc's decoder raises plain Exceptions; any failure is a compile
        PinnedTables(tables).cleanup()
        log.info("program cache: maps layout %s not used (%s): compiling the maps unit", key[:16], e)
        return None
    return PinnedTables(tables)


def _open_or_create_pinned(path: Path, layout: dict, keytype, leaftype) -> int:
    """An fd of the map pinned at `path`, created in `layout`'s shape and pinned there first when
    nothing is: what bcc does for a BPF_TABLE_PINNED declaration, without compiling the unit that
    declares it. The map gets no BTF (bcc's has it for bpftool's pretty-printing only: the datapath
    has no spin lock, timer or kptr, the only map fields the verifier needs BTF for)."""
    import ctypes

    try:
        return bpfsys.obj_get(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = bpfsys.map_create(layout["type"], ctypes.sizeof(keytype), ctypes.sizeof(leaftype), layout["max_entries"],
                           flags=layout["flags"], name=path.name)
    try:
        bpfsys.obj_pin(fd, path)
    except OSError:
        os.close(fd)
        return bpfsys.obj_get(path)     # another process pinned it first: theirs, as bcc would take it
    return fd


def _pin_name(program: str, key: str) -> str:
    return f"{program}_{key[:32]}"      # bpffs names take no dot; 128 bits of the key name it


def program_pins(pin_dir) -> list[Path]:
    """The program pins under `pin_dir` (what pin_programs made), for unpin and cleanup."""
    directory = Path(pin_dir) / PROGRAM_PINS
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _PIN_NAME.match(p.name))


def pin_programs(pin_dir, key: str, fds: dict[str, int]) -> None:
    """Pin programs `fds` (name -> fd, loaded or compiled under `key`) for the next run of this pin
    directory, in place of any earlier pin of the same program. A failure is one log line: the next
    start then loads them again."""
    directory = Path(pin_dir) / PROGRAM_PINS
    try:
        directory.mkdir(exist_ok=True)
        for name, fd in fds.items():
            wanted = directory / _pin_name(name, key)
            for old in program_pins(pin_dir):
                if _PIN_NAME.match(old.name)["program"] == name and old != wanted:
                    old.unlink()
            if not wanted.exists():
                bpfsys.obj_pin(fd, wanted)
    except OSError as e:
        log.warning("program cache: programs not pinned in %s: %s", directory, e)


def reuse_pinned(pin_dir, key: str, programs: dict[str, list], map_fds: dict[str, int]) -> dict[str, int] | None:
    """{name: fd} of the programs pinned under `key` in `pin_dir`, when every one of `programs` (name ->
    its [instruction, map name] references) is there and references exactly the maps of `map_fds`
    that it names (pins recreated since, at another size, are other maps: then None, and they are
    loaded again). Maps the entry creates unpinned are the previous run's, alive with its programs."""
    directory = Path(pin_dir) / PROGRAM_PINS
    fds: dict[str, int] = {}
    try:
        for name, refs in programs.items():
            path = directory / _pin_name(name, key)
            if not path.exists():
                return None
            fds[name] = fd = bpfsys.obj_get(path)
            named = {map_name for _, map_name in refs}
            wanted = {bpfsys.map_id(map_fds[m]) for m in named if m in map_fds}
            ids = set(bpfsys.prog_map_ids(fd))
            if not wanted <= ids or len(ids - wanted) != len(named - map_fds.keys()):
                log.info("program cache: pinned %s references other maps than %s's: loading it again",
                         name, pin_dir)
                raise LookupError(name)
    except (OSError, LookupError) as e:
        for fd in fds.values():
            os.close(fd)
        if isinstance(e, OSError):
            log.warning("program cache: pinned programs in %s not usable (%s): loading them", directory, e)
        return None
    return fds
