"""Switching one lab node between the benchmark's four datapaths, one active at a time.

    ebpfsvc    this project's TC programs on the node's pod veths, maps written by MapWriter
    iptables   kube-proxy's iptables mode (iptables-restore, nf_tables backend)
    nftables   kube-proxy's nftables mode (nft -f)
    direct     no service translation at all: the client uses pod IPs

Every datapath has the same life cycle, driven by ebpfsvc.bench.run:

    dp.activate(state)  -> {"program_seconds": ...}   program `state` from nothing, timed
    dp.change(state2, keys) -> {"change_seconds": ...} apply an endpoint change the datapath's own way
    dp.deactivate()                                   remove every trace from the node

"From nothing" is literal: deactivate() leaves the node as direct found it
(no nftables / xtables objects, so no conntrack hooks either; no TC filters,
no pinned maps), so the next datapath pays nothing for the previous one and
ebpfsvc's next activation starts from empty, freshly created maps.

What is timed as programming is what a sync pays on a running node: for the
kube-proxy modes the tool's run (iptables-restore, nft -f; our rendering is
reported beside it), for ebpfsvc MapWriter.apply into empty maps.  Compiling
and loading the BPF object happens once at agent start, not per sync: it is
reported separately (load_seconds).

An endpoint change is applied as each does it: ebpfsvc as the agent does,
MapWriter.apply with the LBDelta the desired-state builder hands it (the keys
of the frontends that changed), writing only what differs; the baselines
reload the whole rule set, as kube-proxy's full sync does (its partial syncs
are not modelled).

The datapath lives on one node (the client's).  ebpfsvc attaches to every pod
veth on that node, as the agent does; the baselines cover the whole node.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from ebpfsvc import abi, maglev
from ebpfsvc.bench.baselines.load import clear, load_baseline
from ebpfsvc.lbmodel import LBState

NAMES = ("ebpfsvc", "iptables", "nftables", "direct")

# Map memory: which ApplyStats counter says how many entries each map got.
_WRITTEN = {"lb4_frontends": "frontends_written", "lb4_backends": "backends_written",
            "lb_service_names": "services_written", "lb_maglev": "slots_written"}


class Datapath:
    """One way of serving Services on a node; see the module docstring for the life cycle."""

    name = ""
    translates = True        # False: traffic goes to pod IPs, there is nothing to program

    def activate(self, state: LBState) -> dict:
        raise NotImplementedError

    def change(self, state: LBState, keys: frozenset = frozenset()) -> dict:
        """Apply `state`, which differs from the active one at frontends `keys` only."""
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def memory(self) -> dict | None:
        """What the active datapath holds in kernel maps, if that can be measured."""
        return None


class Direct(Datapath):
    """No translation: nothing loaded, the client talks to pod IPs."""

    name = "direct"
    translates = False

    def __init__(self, netns: str):
        self.netns = netns

    def activate(self, state: LBState) -> dict:
        clear(self.netns)           # nothing of another datapath may linger
        return {}

    def change(self, state: LBState, keys: frozenset = frozenset()) -> dict:
        raise NotImplementedError("direct has no endpoints to change")

    def deactivate(self) -> None:
        pass


class KubeProxy(Datapath):
    """kube-proxy's iptables or nftables mode, rendered from the LBState and loaded whole."""

    def __init__(self, netns: str, kind: str):
        self.netns = netns
        self.kind = self.name = kind

    def _load(self, state: LBState) -> dict:
        r = load_baseline(self.netns, self.kind, state)
        return {"render_seconds": r["render_seconds"], "payload_bytes": r["payload_bytes"],
                "payload_lines": r["payload_lines"], "tool_seconds": r["load_seconds"]}

    def activate(self, state: LBState) -> dict:
        clear(self.netns)
        r = self._load(state)
        return {"program_seconds": r["tool_seconds"], **r}

    def change(self, state: LBState, keys: frozenset = frozenset()) -> dict:
        r = self._load(state)      # a full sync: kube-proxy's first, and its fallback
        return {"change_seconds": r["render_seconds"] + r["tool_seconds"], **r}

    def deactivate(self) -> None:
        clear(self.netns)


def limits_for(state: LBState, headroom: float = 1.25):
    """Datapath Limits that hold `state` with room for changes: the defaults, or larger where needed.

    Maglev tables are preallocated in one ARRAY; 50,000 services of 2 backends
    need 12.5 M slots, three times the default (a real agent would be
    configured with the larger limit).  The frontends map holds two entries
    per frontend (the address marker), which its definition already allows for.
    """
    from ebpfsvc.datapath.loader import Limits

    default = Limits()
    slots = sum(maglev.table_size(len(fe.backends)) for fe in state.frontends.values())
    return Limits(
        maglev_slots=max(default.maglev_slots, int(slots * headroom)),
        frontends=max(default.frontends, int(len(state.frontends) * headroom)),
        services=max(default.services, int(len({fe.service for fe in state.frontends.values()}) * headroom)),
    )


# The IPv6 twins of the IPv4 maps (bpf/lib/maps.h): what the IPv6 datapath adds to a node's memory.
IPV6_MAP_PREFIXES = ("lb6_", "ct6", "frag6")


def map_memlock(table) -> dict:
    """max_entries and the kernel's memlock bytes for one bcc table, from /proc/self/fdinfo."""
    fields = {}
    for line in Path(f"/proc/self/fdinfo/{table.map_fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("memlock", "max_entries", "map_type"):
            fields[key] = int(value.strip())
    return fields


class Ebpfsvc(Datapath):
    """This project's datapath: loaded into the node, programmed with MapWriter, attached with tc."""

    name = "ebpfsvc"

    def __init__(self, netns: str, pin_dir: str | Path, pod_links: list[str], hairpin_addr: str | None = None):
        self.netns = netns
        self.pin_dir = Path(pin_dir)
        self.pod_links = list(pod_links)
        self.hairpin_addr = hairpin_addr
        self.dp = None
        self.writer = None
        self.attached: list[int] = []
        self.limits = None
        self.last_apply = None
        self.applied: LBState | None = None
        self.frontends = 0

    def activate(self, state: LBState) -> dict:
        from ebpfsvc.datapath import loader, nodeaddrs, tc, uplink
        from ebpfsvc.datapath.writer import MapWriter

        if self.dp is not None:
            raise RuntimeError("ebpfsvc is already active")
        loader.unpin(self.pin_dir)       # from nothing: no maps left by an earlier activation
        self.limits = limits_for(state)
        start = time.perf_counter()
        self.dp = loader.load(self.pin_dir, limits=self.limits, cache=False)
        nodeaddrs.write(self.dp.maps, nodeaddrs.NodeAddrs(hairpin4=self.hairpin_addr))
        load_seconds = time.perf_counter() - start
        try:
            self.writer = MapWriter(self.dp.maps)
            start = time.perf_counter()
            self.last_apply = self.writer.apply(state)
            program_seconds = time.perf_counter() - start
            self.applied = state
            self.frontends = len(state.frontends)
            for link in self.pod_links:
                ifindex = uplink.ifindex_of(link, self.netns)
                if ifindex is None:
                    raise RuntimeError(f"pod interface {link} not found in {self.netns}")
                self.attached.append(ifindex)
                # Leaving the pod = ingress of the host side; into the pod = its egress.
                tc.attach(ifindex, self.dp.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=self.netns)
                tc.attach(ifindex, self.dp.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns=self.netns)
        except BaseException:
            self.deactivate()
            raise
        return {"program_seconds": program_seconds, "load_seconds": load_seconds,
                "entries_written": self.last_apply.writes, "maglev_slots_limit": self.limits.maglev_slots}

    def change(self, state: LBState, keys: frozenset = frozenset()) -> dict:
        from ebpfsvc.desired import LBDelta

        delta = LBDelta(base=self.applied, keys=frozenset(keys)) if keys else None
        start = time.perf_counter()
        stats = self.writer.apply(state, delta=delta)
        seconds = time.perf_counter() - start
        self.applied = state
        return {"change_seconds": seconds, "entries_written": stats.writes}

    def deactivate(self) -> None:
        from ebpfsvc.datapath import loader, tc

        for ifindex in self.attached:
            for direction in (tc.INGRESS, tc.EGRESS):
                try:
                    tc.detach(ifindex, direction, netns=self.netns)
                except Exception:       # the namespace may already be gone (teardown after a failure)
                    pass
        self.attached = []
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        self.writer = None
        loader.unpin(self.pin_dir)

    def memory(self) -> dict | None:
        """Bytes of the entries the program-from-nothing wrote, per service port, and the maps' memlock.

        Entry bytes are key + value sizes times entries written (the Maglev
        ARRAY: 4-byte values, the key is the index).  memlock is what the
        kernel charges for each map as created: preallocated maps cost their
        max_entries whatever they hold, so it depends on the Limits, not on N.
        """
        if self.dp is None or self.last_apply is None:
            return None
        maps = {}
        entry_bytes = 0
        for name, table in self.dp.maps.items():
            info = map_memlock(table)
            key, value = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
            written = getattr(self.last_apply, _WRITTEN[name]) if name in _WRITTEN else 0
            # A Maglev slot is a u32, two to an lb_maglev element (abi.slots_per_element).
            size = written * (value // abi.slots_per_element(value) if name == "lb_maglev" else key + value)
            entry_bytes += size
            maps[name] = {**info, "key_size": key, "value_size": value, "entries_written": written,
                          "entry_bytes": size}
        memlock = sum(m.get("memlock", 0) for m in maps.values())
        memlock6 = sum(m.get("memlock", 0) for n, m in maps.items() if n.startswith(IPV6_MAP_PREFIXES))
        return {"frontends": self.frontends, "entry_bytes": entry_bytes,
                "entry_bytes_per_service": entry_bytes / max(self.frontends, 1),
                "memlock_bytes": memlock, "memlock_ipv6_bytes": memlock6, "maps": maps}


def make(name: str, node_netns: str, pin_dir: str | Path, pod_links: list[str],
         hairpin_addr: str | None = None) -> Datapath:
    """The datapath called `name` (one of NAMES) for the node `node_netns`."""
    if name == "ebpfsvc":
        return Ebpfsvc(node_netns, pin_dir, pod_links, hairpin_addr)
    if name in ("iptables", "iptables-legacy", "nftables"):
        return KubeProxy(node_netns, name)
    if name == "direct":
        return Direct(node_netns)
    raise ValueError(f"unknown datapath {name!r}; one of {', '.join(NAMES)}")
