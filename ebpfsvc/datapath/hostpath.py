"""The node's own clients (hostNetwork pods, node daemons) to ClusterIPs: bpf/lib/host.h.

kube-proxy catches a node process's packet to a ClusterIP in iptables' OUTPUT chain. Here the
service addresses are routed to a device of ours, `ebpfsvc0`, with the node address as preferred
source, and `from_host` runs at its egress: it DNATs the packet and sends it to the backend
itself. The device is one end of a veth pair (its peer `ebpfsvc1` is never used; a veth rather
than a dummy because not every kernel has the dummy driver) with ARP off, so packets to service
addresses reach the egress hook without a neighbour to resolve. It carries no address, so its
routes cannot capture anything but packets to service addresses, and deleting the pair removes
the routes with it.

Which addresses are routed (NodeClientRoutes): the cluster's service CIDRs (its ServiceCIDR
objects, else the agent's --service-cidr), plus a /32 for every ClusterIP outside them, so with
neither known every ClusterIP still gets its own route; they follow the objects and Services as
they change.

    index = hostpath.setup(uplink_dp, node_address)             # idempotent
    installed = hostpath.sync_routes(installed, wanted, node_address)
    hostpath.teardown()                                          # `ebpfsvc cleanup`
"""

from __future__ import annotations

import ipaddress
import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from ebpfsvc.datapath import tc
from ebpfsvc.datapath.uplink import _netlink
from ebpfsvc.lbmodel import FrontendKind, LBState

log = logging.getLogger(__name__)

DEVICE = "ebpfsvc0"
PEER = "ebpfsvc1"
PROGRAM = "from_host"
_IFF_UP, _IFF_NOARP = 0x1, 0x80
_SCOPE_LINK = 253


def setup(dp, node_address: ipaddress.IPv4Address, netns=None) -> int:
    """Create the device (if missing) and attach from_host at its egress. Returns its ifindex."""
    def configure(ipr) -> int:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            ipr.link("add", ifname=DEVICE, kind="veth", peer={"ifname": PEER})
            found = ipr.link_lookup(ifname=DEVICE)
        index = found[0]
        ipr.link("set", index=ipr.link_lookup(ifname=PEER)[0], state="up")
        ipr.link("set", index=index, flags=_IFF_UP | _IFF_NOARP, change=_IFF_UP | _IFF_NOARP)
        return index

    index = _netlink(netns, configure)
    tc.attach(index, dp.programs[PROGRAM].fd, PROGRAM, tc.EGRESS, netns)
    log.info("node clients to ClusterIPs: %s (ifindex %d), from %s", DEVICE, index, node_address)
    return index


def routes(netns=None) -> set[IPv4Network]:
    """The destinations routed to DEVICE now (none if it does not exist)."""
    def read(ipr) -> set[IPv4Network]:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return set()
        return {IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")
                for r in ipr.get_routes(family=2, oif=found[0], table=254)}

    return _netlink(netns, read)


def sync_routes(installed: set[IPv4Network], wanted: set[IPv4Network], node_address: IPv4Address,
                netns=None, *, rewrite: bool = False) -> set[IPv4Network]:
    """Route `wanted` to DEVICE from `node_address` and remove the rest of `installed`; returns
    what is routed now. rewrite: replace every wanted route (a new node address)."""
    add = set(wanted) if rewrite else wanted - installed
    remove = installed - wanted
    if not add and not remove:
        return installed

    def configure(ipr) -> None:
        index = ipr.link_lookup(ifname=DEVICE)[0]
        for dst in sorted(add):
            # replace: a restarted agent (or a changed node address) rewrites the same route.
            ipr.route("replace", dst=str(dst), oif=index, prefsrc=str(node_address), scope=_SCOPE_LINK)
        for dst in sorted(remove):
            try:
                ipr.route("del", dst=str(dst), oif=index, scope=_SCOPE_LINK)
            except Exception as e:           # gone already: what we wanted
                log.debug("route %s via %s: %s", dst, DEVICE, e)

    _netlink(netns, configure)
    if len(add) + len(remove) <= 8:
        log.info("node clients: routed %s to %s%s", ", ".join(map(str, sorted(add))) or "nothing new", DEVICE,
                 f", unrouted {', '.join(map(str, sorted(remove)))}" if remove else "")
    else:
        log.info("node clients: %d routes to %s added, %d removed", len(add), DEVICE, len(remove))
    return set(wanted)


class NodeClientRoutes:
    """What to route to DEVICE: the service CIDRs, and a /32 for each ClusterIP outside them.

    Kept up to date from each LBState at the cost of what changed (the DesiredStateBuilder's
    delta), since with no service CIDR known there is one route per ClusterIP; `dirty` says
    whether `wanted` changed since the last take_wanted()."""

    def __init__(self) -> None:
        self.cidrs: tuple[IPv4Network, ...] = ()
        self.dirty = True
        self._state: LBState | None = None
        self._refs: dict[IPv4Address, int] = {}      # ClusterIP -> frontends with it
        self._uncovered: set[IPv4Address] = set()     # ClusterIPs in no CIDR

    @property
    def ready(self) -> bool:
        """Has it seen a state (before, `wanted` holds the CIDRs only)?"""
        return self._state is not None

    def set_cidrs(self, cidrs: Iterable[IPv4Network]) -> None:
        cidrs = tuple(sorted(set(cidrs)))
        if cidrs != self.cidrs:
            self.cidrs, self.dirty = cidrs, True
            self._uncovered = {ip for ip in self._refs if not self._covered(ip)}

    def update(self, state: LBState, delta=None) -> None:
        """Follow `state`; `delta` (an LBDelta) names the frontends that changed since its base."""
        if state is self._state:
            return
        if delta is not None and delta.base is self._state and self._state is not None:
            for key in delta.keys:
                old, new = delta.base.frontends.get(key), state.frontends.get(key)
                if old is not None and old.kind is FrontendKind.CLUSTER_IP:
                    self._unref(key.address)
                if new is not None and new.kind is FrontendKind.CLUSTER_IP:
                    self._ref(key.address)
        else:
            self._refs, self._uncovered, self.dirty = {}, set(), True
            for fe in state.frontends.values():
                if fe.kind is FrontendKind.CLUSTER_IP:
                    self._ref(fe.key.address)
        self._state = state

    def take_wanted(self) -> set[IPv4Network]:
        """Every destination to route now; clears `dirty`."""
        self.dirty = False
        return set(self.cidrs) | {IPv4Network(f"{ip}/32") for ip in self._uncovered}

    def _covered(self, ip: IPv4Address) -> bool:
        return any(ip in c for c in self.cidrs)

    def _ref(self, ip: IPv4Address) -> None:
        n = self._refs.get(ip, 0)
        self._refs[ip] = n + 1
        if not n and not self._covered(ip):
            self._uncovered.add(ip)
            self.dirty = True

    def _unref(self, ip: IPv4Address) -> None:
        n = self._refs.get(ip, 0) - 1
        if n > 0:
            self._refs[ip] = n
        else:
            self._refs.pop(ip, None)
            if ip in self._uncovered:
                self._uncovered.discard(ip)
                self.dirty = True


def teardown(netns=None) -> bool:
    """Remove the device pair (its routes and program go with it). False if there was none."""
    def remove(ipr) -> bool:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True

    return _netlink(netns, remove)
