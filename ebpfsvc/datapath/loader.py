"""Compile and load the ClusterIP datapath (bpf/lb_pod.c) with bcc.

    dp = load("/sys/fs/bpf/ebpfsvc/node1")
    nodeaddrs.write(dp.maps, NodeAddrs(hairpin4="198.18.0.1"))   # the node's addresses: a map
    dp.programs["from_pod"].fd   # SCHED_CLS program fds, for tc.attach()
    dp.maps["lb4_frontends"]     # bcc tables, for MapWriter

Nothing of the node is compiled in (its addresses are the map lb_node_addrs, nodeaddrs.py), so
the programs of every node are the same and the program cache (progcache.py) serves them all.

Maps are pinned under the pin directory (one per node) and reused by the next
load, so flows and ids survive an agent restart. With the program cache the programs are pinned
there too (programs/), so a restart with the same programs takes them without the verifier.

Why the loader inlines the project's headers instead of passing -I: bcc only
rewrites map operations (`map.lookup(&k)`) written in the main translation
unit; in an #include'd file they would compile to invalid calls. The
`#include "x.h"` lines of bpf/ are therefore expanded here, with #line markers
so compiler messages still name the right file and line.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ebpfsvc import abi
from ebpfsvc.abi import be32        # re-exported: tests and callers use loader.be32
from ebpfsvc.datapath import bpfsys, compiler, progcache

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
SOURCE = BPF_DIR / "lb_pod.c"
INCLUDE_DIRS = (BPF_DIR / "include", BPF_DIR / "lib")
DEFAULT_KERNEL_SOURCE = "/var/lib/ebpfsvc/kernel-headers"
PROGRAMS = ("from_pod", "to_pod")
#: The uplink (north-south) datapath, bpf/lb_node.c: load(..., source=NODE_SOURCE, programs=NODE_PROGRAMS).
NODE_SOURCE = BPF_DIR / "lb_node.c"
NODE_PROGRAMS = ("from_uplink", "to_uplink", "xdp_uplink", "from_host", "from_loopback")
#: The maps without programs (bpf/lb_maps.c): open_maps().
MAPS_SOURCE = BPF_DIR / "lb_maps.c"
_PROGRAM_TYPES = {"xdp_uplink": "XDP"}     # everything else is SCHED_CLS (TC)
#: enum bpf_attach_type BPF_CGROUP_SOCK_OPS: the one cgroup hook of a sock_ops program; a program on
#: any other cgroup hook (socklb.HOOKS) is a sock_addr one.
CGROUP_SOCK_OPS = 3
MAPS = tuple(abi.MAP_TYPES)

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _limit(macro: str):
    """A limit field: its abi.h macro (the -D name) once, its default read from abi.h."""
    return field(default=getattr(abi, macro), metadata={"macro": macro})


@dataclass(frozen=True)
class Limits:
    """Map sizes and conntrack lifetimes, passed to the compiler as -D (abi.h)."""

    frontends: int = _limit("LB_FRONTENDS_MAX")
    services: int = _limit("LB_SERVICES_MAX")
    backends: int = _limit("LB_BACKENDS_MAX")
    maglev_slots: int = _limit("LB_MAGLEV_SLOTS_MAX")
    ct_entries: int = _limit("CT_ENTRIES_MAX")
    affinity_entries: int = _limit("AFFINITY_ENTRIES_MAX")
    affinity_matches: int = _limit("AFFINITY_MATCH_MAX")
    frag_entries: int = _limit("FRAG_ENTRIES_MAX")
    snat_entries: int = _limit("SNAT_ENTRIES_MAX")
    source_ranges: int = _limit("SOURCE_RANGES_MAX")
    sock_revnat_entries: int = _limit("SOCK_REVNAT_ENTRIES_MAX")
    ct_tcp_syn_s: int = _limit("CT_TIMEOUT_TCP_SYN_S")
    ct_tcp_established_s: int = _limit("CT_TIMEOUT_TCP_ESTABLISHED_S")
    ct_tcp_close_wait_s: int = _limit("CT_TIMEOUT_TCP_CLOSE_WAIT_S")
    ct_tcp_close_s: int = _limit("CT_TIMEOUT_TCP_CLOSE_S")
    ct_udp_s: int = _limit("CT_TIMEOUT_UDP_S")
    ct_udp_stream_s: int = _limit("CT_TIMEOUT_UDP_STREAM_S")
    ct_other_s: int = _limit("CT_TIMEOUT_OTHER_S")

    def defines(self) -> dict[str, int]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(f"limit {f.name} must be positive, got {value}")
            out[f.metadata["macro"]] = value
        return out


def conntrack_limits(*, max_per_core: int = 0, minimum: int = 0, tcp_established: float = 0,
                     tcp_close_wait: float = 0, udp: float = 0, udp_stream: float = 0,
                     cpus: int | None = None) -> dict[str, int]:
    """kube-proxy's --conntrack-* flags as Limits fields (only the ones they change).

    kube-proxy sizes the kernel's table to max(max_per_core x CPUs, minimum) flows, and leaves it
    alone when max_per_core is 0; here that is the ct4 map, two entries per flow. A timeout of 0
    leaves the datapath's default (abi.h), as 0 leaves the kernel's sysctl with kube-proxy.
    Timeouts are whole seconds (the datapath's unit; kube-proxy's sysctls are seconds too)."""
    out: dict[str, int] = {}
    if max_per_core < 0 or minimum < 0:
        raise ValueError("conntrack sizes must be 0 or more")
    if max_per_core:
        cpus = cpus or len(os.sched_getaffinity(0))      # Go's runtime.NumCPU() counts the same CPUs
        out["ct_entries"] = 2 * max(max_per_core * cpus, minimum)
    for name, seconds in (("ct_tcp_established_s", tcp_established), ("ct_tcp_close_wait_s", tcp_close_wait),
                          ("ct_udp_s", udp), ("ct_udp_stream_s", udp_stream)):
        if seconds:
            out[name] = int(seconds)
    return out


def expand_source(path: Path = SOURCE) -> str:
    """The translation unit bcc compiles: `path` with the project's headers inlined."""
    seen: set[Path] = set()

    def expand(p: Path) -> list[str]:
        out = [f'#line 1 "{p}"']
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            m = _LOCAL_INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            header = _find_header(m.group(1))
            if header not in seen:      # headers are guarded; inline once
                seen.add(header)
                out.extend(expand(header))
            out.append(f'#line {lineno + 1} "{p}"')
        return out

    return "\n".join(expand(path)) + "\n"


def _find_header(name: str) -> Path:
    for d in INCLUDE_DIRS:
        if (d / name).is_file():
            return (d / name).resolve()
    raise FileNotFoundError(f"#include \"{name}\": not in {', '.join(map(str, INCLUDE_DIRS))}")


@dataclass
class Datapath:
    """A loaded datapath: bcc object, program fds and the (pinned) maps."""

    bpf: object
    pin_dir: Path
    cflags: tuple[str, ...]
    programs: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)
    cache_key: tuple | None = None      # set when this process's load cache holds it

    def close(self) -> None:
        """Release the program and map fds (pins, and attached filters, stay)."""
        if self.cache_key is not None:
            _CACHE.pop(self.cache_key, None)
        self.bpf.cleanup()


_CACHE: dict[tuple, Datapath] = {}


def cflags_for(pin_dir: Path, limits: Limits) -> list[str]:
    """The compiler's flags: map sizes and the pin directory only. The agent's datapath options are
    no flags: the programs read them from lb_agent_config (publish_options), so that one compiled
    object (and one program-cache entry) serves every node."""
    flags = [f"-I{d}" for d in INCLUDE_DIRS]
    flags += [f"-D{k}={v}" for k, v in limits.defines().items()]
    flags.append(f'-DLB_PIN_DIR="{pin_dir}"')
    return flags


def agent_options(*, snat_keep_client_port: bool = True, host_clients: bool = True,
                  reset_removed_endpoint_tcp: bool = True, masquerade_external_to_local_backends: bool = False,
                  cluster_cidr=None) -> int:
    """The LB_CFG_* word of lb_agent_config (abi.h): the datapath options the programs read at run
    time (bpf/lib/lb.h lb_option), and `ebpfsvc why` reads back (inspect/node.py NodeMaps.agent_options).
    `snat_keep_client_port` False gives every SNATed flow a port of the SNAT range (bpf/lib/nodeport.h);
    `host_clients` False leaves the node's own packets to externalIPs and LoadBalancer IPs
    untranslated on the uplink (bpf/lib/host.h); `reset_removed_endpoint_tcp` False lets a TCP flow
    whose backend was removed go on to its address (bpf/lib/lb.h);
    `masquerade_external_to_local_backends` SNATs external traffic under externalTrafficPolicy
    Cluster to a backend on this node too, as kube-proxy (bpf/lib/nodeport.h); `cluster_cidr`
    (kube-proxy's --cluster-cidr) sends its sources to the cluster-wide endpoints of a Local-policy
    external frontend (bpf/lib/nodeport.h np4_from_cluster)."""
    return (abi.LB_CFG_PUBLISHED
            | (abi.LB_CFG_SNAT_KEEP_CLIENT_PORT if snat_keep_client_port else 0)
            | (abi.LB_CFG_HOST_CLIENTS if host_clients else 0)
            | (abi.LB_CFG_RESET_REMOVED_TCP if reset_removed_endpoint_tcp else 0)
            | (abi.LB_CFG_MASQUERADE_LOCAL_BACKENDS if masquerade_external_to_local_backends else 0)
            | (abi.LB_CFG_CLUSTER_CIDR if cluster_cidr is not None else 0))


def publish_options(maps, cluster_cidr=None, **options) -> None:
    """Write agent_options(**options) into lb_agent_config, and the cluster CIDR (network, prefix
    length) into lb_agent_cluster_cidr before the word that says it is there (bcc tables by name,
    as Datapath.maps). The programs read the word at run time: written before they attach, it
    holds from their first packet; written again, it holds from the next packet."""
    if cluster_cidr is not None:
        net = ipaddress.IPv4Network(cluster_cidr)
        cidr = maps["lb_agent_cluster_cidr"]
        cidr[cidr.Key(0)] = cidr.Leaf(int(net.network_address))
        cidr[cidr.Key(1)] = cidr.Leaf(net.prefixlen)
    table = maps["lb_agent_config"]
    table[table.Key(0)] = table.Leaf(agent_options(cluster_cidr=cluster_cidr, **options))


def load(pin_dir, *, limits: Limits | None = None, cache: bool = True,
         source: Path = SOURCE, programs: tuple[str, ...] = PROGRAMS, migrate: bool = False,
         program_cache: bool = False, maps_unit=None, compile_apart: bool = False,
         recreate_pins: bool = True, attach_types: dict[str, int] | None = None,
         pin_programs: bool = True) -> Datapath:
    """Compile (or reuse from this process's cache) and load the datapath.

    `pin_dir` is created if needed; maps already pinned there are reused, so a
    second load (another process, or cache=False) sees the same contents.
    The node's addresses (hairpin source, SNAT address) and the agent's datapath options are not
    load arguments: they are maps, lb_node_addrs written by nodeaddrs.write() (all zero until then:
    hairpin SNAT, NodePort SNAT and node clients off) and lb_agent_config written by
    publish_options() (the defaults until then).
    `source`/`programs` select the object (NODE_SOURCE/NODE_PROGRAMS: the uplink
    programs, sharing the same pinned maps).
    `migrate`: when the pins must be recreated (another size or layout), carry their entries into
    the new maps (datapath/migrate.py) instead of starting empty.
    `program_cache`: load the programs from the compiled-program cache (datapath/progcache.py)
    when it holds this source and flags, else compile and fill it. On a hit the maps are the
    tables of `maps_unit` (what open_maps() returned; opened here when None).
    `compile_apart` (with `program_cache`): a miss is compiled in a child process (compiler.py), so
    that LLVM never grows this one; the programs are then taken from the cache and their pins.
    `recreate_pins` False raises StalePins instead of recreating pins of another shape.
    `attach_types` names the cgroup hook of each program that is a cgroup program (bpf/lb_sock.c:
    socklb.HOOKS; sock_addr ones, and sock_ops): the kernel wants a sock_addr program's at load.
    `pin_programs` (with `program_cache`) pins the programs beside the maps for the next start to
    take back.
    """
    from bcc import BPF  # imported late: unit tests import this module without bcc

    pin_dir = Path(pin_dir)
    limits = limits or Limits()
    text = expand_source(source)
    cflags = tuple(cflags_for(pin_dir, limits))
    key = (hashlib.sha256(text.encode()).hexdigest(), cflags)
    if cache and key in _CACHE:
        return _CACHE[key]

    os.environ.setdefault("BCC_KERNEL_SOURCE", DEFAULT_KERNEL_SOURCE)
    pin_dir.mkdir(parents=True, exist_ok=True)
    attach_types = attach_types or {}
    types = _program_types(programs, attach_types)
    program_key = (progcache.cache_key(text, cflags, _program_kinds(types, attach_types))
                   if program_cache and programs else None)
    pins_checked = False        # found in the program's shapes by the program cache's open_maps
    if program_key:
        try:
            dp = _load_cached(pin_dir, limits, cflags, program_key, maps_unit, pin_programs)
            pins_checked = True
        except StalePins:
            dp = None
        if dp is None and compile_apart and compiler.run(compiler.programs_request(
                pin_dir, limits, source, programs, dict(attach_types=attach_types, pin_programs=pin_programs))):
            dp = _load_cached(pin_dir, limits, cflags, program_key, maps_unit, pin_programs)
        if dp is not None:
            if cache:
                dp.cache_key = key
                _CACHE[key] = dp
            return dp
    # The pins are checked with the maps unit (the same declarations, in a fraction of a second)
    # before the program's compile (seconds: lb_node.c's 10 and more), so that pins of another
    # shape are recreated before it instead of after a compile that would be thrown away.
    stale = [] if pins_checked else _stale_pins_before_compile(pin_dir, cflags)
    if stale and not recreate_pins:
        raise StalePins(f"pinned maps in {pin_dir} do not match the program: {', '.join(stale)}")
    if stale:
        # bcc reuses a pinned map without comparing it with the declaration, so
        # after a limits or ABI change the program would run on maps of the old
        # shape. Recreate them: with `migrate` their entries are carried over
        # (datapath/migrate.py: flows, affinity, ids, tables stay); without, the
        # maps are rebuilt from the next LBState; established TCP flows mostly
        # keep their backend (a mid-stream packet creates a flow again, and
        # Maglev picks the same backend when the backend set is unchanged); UDP
        # flows are balanced again.
        log.warning("pinned maps in %s do not match the program (%s): recreating all of them%s",
                    pin_dir, ", ".join(stale), ", carrying their entries over" if migrate else "")
        saved = _save_pins(pin_dir) if migrate else None
        _remove_pins(pin_dir)
    bpf = BPF(text=text.encode(), cflags=list(cflags))
    still = stale_pins(bpf, pin_dir)
    if still:       # the maps unit and the program declare the maps differently: a bug of the sources
        bpf.cleanup()
        raise RuntimeError(f"pinned maps in {pin_dir} differ from the program's after the maps unit's check: {still}")
    dp = Datapath(bpf=bpf, pin_dir=pin_dir, cflags=cflags)
    for name in programs:
        hook = {"attach_type": attach_types[name]} if name in attach_types else {}
        dp.programs[name] = bpf.load_func(name.encode(), types[name], **hook)
    for name in MAPS:
        dp.maps[name] = bpf.get_table(name.encode())
    if stale and migrate:
        _restore_pins(dp, saved)
    _fill_sctp_crc_shift(bpf)
    if program_key:     # verified by the kernel just now: what the next start loads, or takes as pinned
        progcache.store(progcache.cache_dir(), program_key, bpf, types, MAPS, attach_types)
        if pin_programs:
            progcache.pin_programs(pin_dir, program_key, {name: dp.programs[name].fd for name in programs})
    if cache:
        dp.cache_key = key
        _CACHE[key] = dp
    return dp


def _program_types(programs: tuple[str, ...], attach_types: dict[str, int]) -> dict[str, int]:
    """bcc's program type of each program: sock_ops on the sock_ops hook, a cgroup sock_addr program
    on any other hook, XDP for xdp_uplink, else SCHED_CLS (TC)."""
    from bcc import BPF

    def kind(name: str) -> int:
        if name in attach_types:
            return BPF.SOCK_OPS if attach_types[name] == CGROUP_SOCK_OPS else BPF.CGROUP_SOCK_ADDR
        return getattr(BPF, _PROGRAM_TYPES.get(name, "SCHED_CLS"))

    return {name: kind(name) for name in programs}


def _program_kinds(types: dict[str, int], attach_types: dict[str, int]) -> dict:
    """What the program cache's key holds of each program: its type, and its hook where it has one
    (a hook is part of what the kernel verified: another hook is another entry)."""
    return {name: [t, attach_types[name]] if name in attach_types else t for name, t in types.items()}


def program_key(limits: Limits, source: Path = SOURCE, programs: tuple[str, ...] = PROGRAMS,
                attach_types: dict[str, int] | None = None) -> str:
    """The program cache's key (progcache.cache_key) of the programs load() would compile with these
    arguments: what a load with `program_cache` looks up, and what its compile stores. No pin
    directory: -DLB_PIN_DIR is no part of the key, so any one serves here."""
    attach_types = attach_types or {}
    return progcache.cache_key(expand_source(source), cflags_for(Path("/"), limits),
                               _program_kinds(_program_types(programs, attach_types), attach_types))


class StalePins(RuntimeError):
    """Pins of another shape, where the caller asked load() not to recreate them."""


def _load_cached(pin_dir: Path, limits: Limits, cflags, program_key: str, maps_unit,
                 pin_programs: bool = True) -> Datapath | None:
    """The Datapath with programs from the program cache, on the maps of `maps_unit` (opened here
    when None), or None on a miss; the pins are then known to be in the program's shapes (open_maps
    opened them). StalePins when they are not (load() recreates them)."""
    owned = maps_unit is None
    if owned:
        opened = open_maps(pin_dir, limits=limits, program_cache=True)
        if opened is None:
            raise StalePins(f"pinned maps in {pin_dir} do not match the maps unit")
        maps_unit = opened[0]
    map_fds = {name: maps_unit.get_table(name.encode()).map_fd for name in MAPS}
    found = progcache.load(progcache.cache_dir(), program_key, map_fds,
                           fillers={"lb_sctp_crc_shift": _fill_crc_shift_fd, "lb6_icmp_scratch": _scratch,
                                    "np6_scratch": _scratch, "lb6_merge_scratch": _scratch},
                           pin_dir=pin_dir if pin_programs else None)
    if found is None:
        if owned:
            maps_unit.cleanup()
        return None
    programs, fds = found
    dp = Datapath(bpf=progcache.CachedObject(maps_unit, owned, fds), pin_dir=pin_dir, cflags=cflags)
    dp.programs.update(programs)
    dp.maps.update({name: maps_unit.get_table(name.encode()) for name in MAPS})
    log.info("programs %s loaded from the program cache", ", ".join(programs))
    return dp


def open_maps(pin_dir, *, limits: Limits | None = None, program_cache: bool = False, compile_apart: bool = False):
    """The datapath's pinned maps as bcc tables, without compiling a program (bpf/lb_maps.c:
    a fraction of a second, where load() takes seconds), so a starting agent can write them
    while the programs compile. Maps not pinned yet are created and pinned, as load() would.
    With `program_cache`, a kept layout needs no compile at all (progcache.open_layout): a restart
    opens the maps pinned in its shapes, a new node creates and pins them from it. Without a layout
    (the machine's first node, or new limits) the unit is compiled, which keeps the layout, and with
    `compile_apart` it runs in a child process (compiler.py), whose layout and pins are then opened.
    Returns (bpf object, {name: table}), or None when pins of another shape are in the way:
    load() then recreates them, so nothing must be written before it."""
    pin_dir = Path(pin_dir)
    text = expand_source(MAPS_SOURCE)
    os.environ.setdefault("BCC_KERNEL_SOURCE", DEFAULT_KERNEL_SOURCE)
    cflags = cflags_for(pin_dir, limits or Limits())
    key = progcache.cache_key(text, cflags, {}, with_sizes=True) if program_cache else None
    unit = progcache.open_layout(progcache.cache_dir(), key, pin_dir, MAPS) if key else None
    if unit is None and key and compile_apart and compiler.run(compiler.maps_request(pin_dir, limits or Limits())):
        unit = progcache.open_layout(progcache.cache_dir(), key, pin_dir, MAPS)
    if unit is not None:
        stale = stale_pins(unit, pin_dir)
        if not stale:
            return unit, {name: unit.get_table(name) for name in MAPS}
        unit.cleanup()
        log.info("maps layout not used, pins of another shape (%s): compiling the maps unit", "; ".join(stale))
    from bcc import BPF

    pin_dir.mkdir(parents=True, exist_ok=True)
    bpf = BPF(text=text.encode(), cflags=cflags)
    if stale_pins(bpf, pin_dir):
        bpf.cleanup()
        return None
    if key:
        progcache.store_layout(progcache.cache_dir(), key, bpf, MAPS)
    return bpf, {name: bpf.get_table(name.encode()) for name in MAPS}


def open_maps_early(pin_dir, limits: Limits, program_cache: bool = False, compile_apart: bool = False):
    """open_maps() on a thread of its own (bcc compiles with the GIL released), so a starting agent
    imports, reads its source and lists while the maps-only unit compiles. `pin_dir` must be
    absolute: bcc changes the working directory while it compiles. Returns (restart, future of
    open_maps()'s result): restart tells whether a previous run's maps were pinned there, read
    before the open pins any."""
    from concurrent.futures import Future
    import threading

    pin_dir = Path(pin_dir)
    restart = (pin_dir / "lb4_frontends").exists()
    future: Future = Future()

    def run():
        try:
            future.set_result(open_maps(pin_dir, limits=limits, program_cache=program_cache,
                                        compile_apart=compile_apart))
        except BaseException as e:      # raised again where the agent waits for the maps
            future.set_exception(e)
    threading.Thread(target=run, name="open-maps", daemon=True).start()
    return restart, future


def release_compiler_memory() -> None:
    """Give the heap that LLVM freed after compiling back to the system (glibc keeps it otherwise:
    50-65 MB of an agent's RSS after compiling lb_pod.c and lb_node.c, measured). Not glibc: no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def crc32c_shift_table(n: int) -> np.ndarray:
    """x^(8i) mod P for i < n (CRC32c, reflected: x^0 is bit 31): the factor by
    which i zero bytes multiply a CRC. Each entry is the previous one put
    through one CRC step of a zero byte (a multiplication by x^8)."""
    step = np.zeros(256, dtype=np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        step[b] = c
    out = np.empty(n, dtype=np.uint32)
    v = 1 << 31
    for i in range(n):
        out[i] = v
        v = (v >> 8) ^ int(step[v & 0xFF])
    return out


def _fill_sctp_crc_shift(bpf) -> None:
    """Fill lb_sctp_crc_shift (bpf/lib/maps.h) in programs built with LB_SCTP_PORT_CRC."""
    try:
        table = bpf.get_table(b"lb_sctp_crc_shift")
    except KeyError:
        return
    _fill_crc_shift_fd(table.map_fd, table.max_entries)


def _fill_crc_shift_fd(fd: int, n: int) -> None:
    """lb_sctp_crc_shift by its fd: a bcc table's, or the map a program-cache load made."""
    bpfsys.map_update_batch(fd, np.arange(n, dtype=np.uint32).tobytes(), crc32c_shift_table(n).tobytes(), n)


def _scratch(fd: int, n: int) -> None:
    """lb6_icmp_scratch (bpf/lib/icmp.h), np6_scratch (bpf/lib/nodeport6.h), lb6_merge_scratch
    (bpf/lib/flow.h): per-CPU work buffers the program writes before it reads; a new map's zeroes
    are all it needs."""


def stale_pins(bpf, pin_dir: Path) -> list[str]:
    """Maps of `bpf` whose pinned object differs from the program's declaration
    (type, key size, value size, max entries)."""
    from ebpfsvc.datapath.bpfsys import MAP_TYPES as KERNEL_MAP_TYPES, PinnedMap

    stale = []
    for name in MAPS:
        table = bpf.get_table(name.encode())
        leaf = getattr(table, "sLeaf", table.Leaf)          # per-CPU maps: one CPU's value
        declared = (KERNEL_MAP_TYPES.get(table.ttype, str(table.ttype)), ctypes.sizeof(table.Key),
                    ctypes.sizeof(leaf), table.max_entries)
        with PinnedMap.open(pin_dir / name) as pinned:
            info = pinned.info
            actual = (info.type, info.key_size, info.value_size, info.max_entries)
        if actual != declared:
            stale.append(f"{name}: pinned {actual}, declared {declared}")
    return stale


def _stale_pins_before_compile(pin_dir: Path, cflags) -> list[str]:
    """stale_pins() of the maps unit (bpf/lb_maps.c) compiled with `cflags`: the maps every program
    declares, so what a program's compile would find, without compiling it. Nothing pinned yet:
    nothing to compare, no compile."""
    if not any((pin_dir / name).exists() for name in MAPS):
        return []
    from bcc import BPF

    unit = BPF(text=expand_source(MAPS_SOURCE).encode(), cflags=list(cflags))
    try:
        return stale_pins(unit, pin_dir)
    finally:
        unit.cleanup()


def _save_pins(pin_dir: Path):
    from ebpfsvc.datapath import migrate
    return migrate.save(pin_dir, MAPS)


def _restore_pins(dp: "Datapath", saved) -> None:
    from ebpfsvc.datapath import migrate
    migrate.restore(dp.maps, saved)


def _remove_pins(pin_dir: Path) -> None:
    for name in MAPS:
        (pin_dir / name).unlink(missing_ok=True)
    # The programs pinned for the next start reference these maps: a load on new maps pins its own.
    for path in progcache.program_pins(pin_dir):
        path.unlink()
    programs = pin_dir / progcache.PROGRAM_PINS
    if programs.is_dir():
        programs.rmdir()        # fails on a file that is not ours, as unpin() should


def unpin(pin_dir) -> None:
    """Remove the pinned maps of a pin directory, and the directory itself.

    Only what the datapath pins is removed; an unexpected file makes this fail
    rather than delete something that is not ours.
    """
    pin_dir = Path(pin_dir)
    if not pin_dir.exists():
        return
    _remove_pins(pin_dir)
    for key, dp in list(_CACHE.items()):
        if dp.pin_dir == pin_dir:
            _CACHE.pop(key)
            dp.bpf.cleanup()
    pin_dir.rmdir()


def drop_cache() -> None:
    """Forget every cached Datapath (and close it)."""
    for dp in list(_CACHE.values()):
        dp.bpf.cleanup()
    _CACHE.clear()


__all__ = ["Datapath", "Limits", "conntrack_limits", "load", "open_maps", "unpin", "expand_source", "be32", "PROGRAMS",
           "MAPS", "NODE_SOURCE", "NODE_PROGRAMS"]
