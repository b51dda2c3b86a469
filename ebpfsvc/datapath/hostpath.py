"""The node's own clients (hostNetwork pods, node daemons) to Services: bpf/lib/host.h.

kube-proxy catches a node process's packet to a Service in iptables' OUTPUT chain. The agent
meets those packets where they leave instead (docs/northsouth.md, "Node clients"):

- ClusterIPs: the service addresses are routed to a device of ours, `ebpfsvc0`, with the node
  address as preferred source, and `from_host` runs at its egress: it DNATs the packet and sends
  it to the backend itself. The device is one end of a veth pair (its peer `ebpfsvc1` is never
  used; a veth rather than a dummy because not every kernel has the dummy driver) with ARP off,
  so packets to service addresses reach the egress hook without a neighbour to resolve. It
  carries no address, so its routes cannot capture anything but packets to service addresses,
  and deleting the pair removes the routes with it.
- The node's own address (its NodePorts, an externalIP or LoadBalancer IP that is that address):
  such packets never leave the host; the kernel sends them through `lo`, where `from_loopback`
  runs at egress. Replies whose source becomes the node's own address again are handed in through
  lo's ingress, which accepts them only with accept_local set on lo (LO_SYSCTL): a packet from a
  local address arriving on any device without it is dropped as a martian.
- externalIPs and LoadBalancer IPs the node routes elsewhere: caught on the uplink's egress by
  `to_uplink` (uplink.py), on their service ports only; nothing to set up here.

Which addresses are routed to ebpfsvc0 (NodeClientRoutes): the cluster's service CIDRs (its
ServiceCIDR objects, else the agent's --service-cidr), plus a /32 (/128) for every ClusterIP
outside them, so with neither known every ClusterIP still gets its own route; they follow the
objects and Services as they change. Both families: each route has the node's address of its
family as preferred source (the address from_host's flows and their replies use, node_snat4/6 in
lb_node_addrs); a family the node has no address of is not routed.

    index = hostpath.setup(uplink_dp, node_address)             # idempotent
    installed = hostpath.sync_routes(installed, wanted, (node_address, node_address6))
    hostpath.teardown()                                          # `ebpfsvc cleanup`
"""

from __future__ import annotations

import logging
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Iterable

from ebpfsvc.lbmodel import IPAddress

from ebpfsvc.datapath import nsenter, tc
from ebpfsvc.lbmodel import FrontendKind, LBState

log = logging.getLogger(__name__)

DEVICE = "ebpfsvc0"
PEER = "ebpfsvc1"
PROGRAM = "from_host"
LOOPBACK = "lo"
LOOPBACK_PROGRAM = "from_loopback"
# The node's replies to itself (source and destination both its address) are handed in through lo,
# which drops packets from a local address unless accept_local is set on it. Only packets injected
# into lo without a route are affected: the kernel's own loopback traffic keeps its route.
LO_SYSCTL = "net.ipv4.conf.lo.accept_local"     # set through netlink: set_accept_local()
_IFF_UP, _IFF_NOARP = 0x1, 0x80
_SCOPE_LINK = 253


def setup(dp, node_address: IPAddress, netns=None) -> int:
    """Create the device (if missing), attach from_host at its egress and from_loopback at lo's
    egress, and let lo accept the node's replies to itself. Returns the device's ifindex."""
    def configure(ipr) -> tuple[int, int]:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            ipr.link("add", ifname=DEVICE, kind="veth", peer={"ifname": PEER})
            found = ipr.link_lookup(ifname=DEVICE)
        index = found[0]
        ipr.link("set", index=ipr.link_lookup(ifname=PEER)[0], state="up")
        ipr.link("set", index=index, flags=_IFF_UP | _IFF_NOARP, change=_IFF_UP | _IFF_NOARP)
        return index, ipr.link_lookup(ifname=LOOPBACK)[0]

    index, lo = nsenter.netlink(netns, configure)
    tc.attach(index, dp.programs[PROGRAM].fd, PROGRAM, tc.EGRESS, netns)
    set_accept_local(lo, 1, netns)
    tc.attach(lo, dp.programs[LOOPBACK_PROGRAM].fd, LOOPBACK_PROGRAM, tc.EGRESS, netns)
    log.info("node clients: ClusterIPs through %s (ifindex %d), the node's own address through %s, from %s",
             DEVICE, index, LOOPBACK, node_address)
    return index


# include/uapi/linux/ip.h (IPV4_DEVCONF_*), if_link.h (IFLA_AF_SPEC, IFLA_INET_CONF), rtnetlink.h.
_IPV4_DEVCONF_ACCEPT_LOCAL = 23
_IFLA_AF_SPEC, _IFLA_INET_CONF, _NLA_F_NESTED = 26, 1, 0x8000
_RTM_SETLINK, _NLMSG_ERROR, _NLM_F_REQUEST, _NLM_F_ACK = 19, 2, 0x1, 0x4


def set_accept_local(ifindex: int, value: int, netns=None) -> None:
    """Set net.ipv4.conf.<ifindex>.accept_local through netlink (RTM_SETLINK, IFLA_AF_SPEC/AF_INET/
    IFLA_INET_CONF), which CAP_NET_ADMIN allows, rather than /proc/sys, which the DaemonSet's
    unprivileged container sees read-only. pyroute2 only decodes that attribute, so it is built here."""
    import socket
    import struct

    def nla(kind: int, payload: bytes) -> bytes:
        size = 4 + len(payload)
        return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)

    conf = nla(_IFLA_INET_CONF | _NLA_F_NESTED, nla(_IPV4_DEVCONF_ACCEPT_LOCAL, struct.pack("=I", value)))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0) + \
        nla(_IFLA_AF_SPEC | _NLA_F_NESTED, nla(socket.AF_INET | _NLA_F_NESTED, conf))
    request = struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body

    def send() -> None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
            sock.send(request)
            answer = sock.recv(65536)
        kind, = struct.unpack_from("=H", answer, 4)
        error, = struct.unpack_from("=i", answer, 16) if kind == _NLMSG_ERROR else (0,)
        if error:
            raise OSError(-error, f"accept_local on ifindex {ifindex}: {os.strerror(-error)}")

    if not netns:
        send()
    else:
        nsenter.run_in(netns, send)


Network = IPv4Network | IPv6Network


def routes(netns=None) -> set[Network]:
    """The destinations routed to DEVICE now, both families (none if it does not exist; IPv6's
    link-local and multicast routes the kernel gives every device are not ours)."""
    def read(ipr) -> set[Network]:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return set()
        nets = {ip_network(f"{r.get_attr('RTA_DST') or ('::' if r['family'] == 10 else '0.0.0.0')}/{r['dst_len']}")
                for family in (2, 10) for r in ipr.get_routes(family=family, oif=found[0], table=254)}
        return {n for n in nets if not (n.is_link_local or n.is_multicast)}

    return nsenter.netlink(netns, read)


def sync_routes(installed: set[Network], wanted: set[Network], node_addresses: IPAddress | Iterable[IPAddress],
                netns=None, *, rewrite: bool = False) -> set[Network]:
    """Route `wanted` to DEVICE, each from the node address of its family in `node_addresses` (one
    address or several; a destination of a family without one is not routed), and remove the rest
    of `installed`; returns what is routed now. rewrite: replace every wanted route (a new node
    address)."""
    one = isinstance(node_addresses, (IPv4Address, IPv6Address))
    sources = {a.version: a for a in ([node_addresses] if one else node_addresses) if a is not None}
    wanted = {dst for dst in wanted if dst.version in sources}
    add = set(wanted) if rewrite else wanted - installed
    remove = installed - wanted
    if not add and not remove:
        return installed

    def configure(ipr) -> None:
        index = ipr.link_lookup(ifname=DEVICE)[0]
        for dst in sorted(add, key=_order):
            # replace: a restarted agent (or a changed node address) rewrites the same route.
            ipr.route("replace", dst=str(dst), oif=index, prefsrc=str(sources[dst.version]), scope=_SCOPE_LINK)
        for dst in sorted(remove, key=_order):
            try:
                ipr.route("del", dst=str(dst), oif=index, scope=_SCOPE_LINK)
            except Exception as e:           # gone already: what we wanted
                log.debug("route %s via %s: %s", dst, DEVICE, e)

    nsenter.netlink(netns, configure)
    if len(add) + len(remove) <= 8:
        log.info("node clients: routed %s to %s%s", ", ".join(map(str, sorted(add, key=_order))) or "nothing new",
                 DEVICE, f", unrouted {', '.join(map(str, sorted(remove, key=_order)))}" if remove else "")
    else:
        log.info("node clients: %d routes to %s added, %d removed", len(add), DEVICE, len(remove))
    return set(wanted)


def _order(net: Network) -> tuple:
    return net.version, net          # IPv4 and IPv6 networks do not compare with each other


def _routed(fe) -> bool:
    """A frontend whose address the node-client device is routed for: a ClusterIP, of either
    family (sync_routes leaves out a family the node has no address of)."""
    return fe is not None and fe.kind is FrontendKind.CLUSTER_IP


class NodeClientRoutes:
    """What to route to DEVICE: the service CIDRs, and a /32 (/128) for each ClusterIP outside them.

    Kept up to date from each LBState at the cost of what changed (the DesiredStateBuilder's
    delta), since with no service CIDR known there is one route per ClusterIP; `dirty` says
    whether `wanted` changed since the last take_wanted()."""

    def __init__(self) -> None:
        self.cidrs: tuple[Network, ...] = ()
        self.dirty = True
        self._state: LBState | None = None
        self._refs: dict[IPAddress, int] = {}        # ClusterIP -> frontends with it
        self._uncovered: set[IPAddress] = set()       # ClusterIPs in no CIDR

    @property
    def ready(self) -> bool:
        """Has it seen a state (before, `wanted` holds the CIDRs only)?"""
        return self._state is not None

    def set_cidrs(self, cidrs: Iterable[Network]) -> None:
        cidrs = tuple(sorted(set(cidrs), key=_order))
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
                if _routed(old):
                    self._unref(key.address)
                if _routed(new):
                    self._ref(key.address)
        else:
            self._refs, self._uncovered, self.dirty = {}, set(), True
            for fe in state.frontends.values():
                if _routed(fe):
                    self._ref(fe.key.address)
        self._state = state

    def take_wanted(self) -> set[Network]:
        """Every destination to route now; clears `dirty`."""
        self.dirty = False
        return set(self.cidrs) | {ip_network(f"{ip}/{ip.max_prefixlen}") for ip in self._uncovered}

    def _covered(self, ip: IPAddress) -> bool:
        return any(ip.version == c.version and ip in c for c in self.cidrs)

    def _ref(self, ip: IPAddress) -> None:
        n = self._refs.get(ip, 0)
        self._refs[ip] = n + 1
        if not n and not self._covered(ip):
            self._uncovered.add(ip)
            self.dirty = True

    def _unref(self, ip: IPAddress) -> None:
        n = self._refs.get(ip, 0) - 1
        if n > 0:
            self._refs[ip] = n
        else:
            self._refs.pop(ip, None)
            if ip in self._uncovered:
                self._uncovered.discard(ip)
                self.dirty = True


def teardown(netns=None) -> bool:
    """Remove the device pair (its routes and program go with it) and from_loopback from lo, and
    set lo's accept_local back to the kernel's default. False if there was no device."""
    def remove(ipr) -> tuple[bool, int]:
        lo = ipr.link_lookup(ifname=LOOPBACK)[0]
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return False, lo
        ipr.link("del", index=found[0])
        return True, lo

    removed, lo = nsenter.netlink(netns, remove)
    if any(f.ours for f in tc.list_filters(lo, netns) if f.direction == tc.EGRESS):
        tc.detach(lo, tc.EGRESS, netns)
        tc.drop_empty_clsact(lo, netns)
    set_accept_local(lo, 0, netns)
    return removed
