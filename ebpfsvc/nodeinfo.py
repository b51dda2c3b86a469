"""What this node is, found out as kube-proxy does: no per-node flag is needed.

From the node's own Node object (status.addresses), the addresses its interfaces carry and the
agent's cluster-wide settings, resolve() derives:

- the node addresses: the Node's InternalIP/ExternalIP of the families this node serves
  (--ip-families: IPv4 by default, IPv6 too on a dual-stack node) that are really on an interface
  here; without a Node object (a manifest directory that has none, or an API server with no such
  Node), every non-loopback interface address of those families (IPv6: not link-local, which
  needs a zone a frontend cannot carry);
- the primary address: the Node's first IPv4 InternalIP (else the first IPv4 node address). The source of
  the node's own translated traffic: NodePort SNAT, node clients to ClusterIPs (hostpath.py), and
  hairpin flows when no --hairpin-address is given, as kube-proxy's masquerade picks a node
  address; `primary6` is its IPv6 twin, chosen the same way among the IPv6 addresses (on a node that
  serves IPv6), the source of IPv6 hairpin flows unless --hairpin-address6 names another;
- the NodePort addresses (kube-proxy's --nodeport-addresses): empty = every node address; CIDRs =
  the interface addresses inside them; `primary` = the primary address. Explicit --node-address
  values are always served, and alone when nodeport-addresses is empty (an override);
- the uplinks: the interfaces that carry those addresses (never `lo` or a pod interface), unless
  --uplink names them; a named one that does not exist is reported (`missing_uplinks`), for
  /healthz.

resolve() is pure, so every rule is unit-tested without a kernel; read_interfaces() is the one
netlink read. The agent resolves again when its Node changes and at every full resync (an
address or uplink that appears later), and reconfigures the datapath when the result differs.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ebpfsvc.config import DEFAULT_IP_FAMILIES, family_name
from ebpfsvc.k8s.node import Node
from ebpfsvc.lbmodel import IPAddress

log = logging.getLogger(__name__)

PRIMARY = "primary"          # --nodeport-addresses primary: the node's primary address only
LOOPBACK_DEVICE = "lo"


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class NodeSettings:
    """The agent's cluster-wide settings that resolve() applies (flags or --config keys)."""

    node_addresses: tuple[IPAddress, ...] = ()       # --node-address: NodePort addresses, always served
    nodeport_addresses: tuple[str, ...] = ()         # --nodeport-addresses: CIDRs, ("primary",) or () = all
    uplinks: tuple[str, ...] | None = None           # --uplink; None: the interfaces of the node addresses
    hairpin_address: IPv4Address | None = None       # --hairpin-address; None: the primary address
    hairpin_address6: IPv6Address | None = None      # --hairpin-address6; None: the IPv6 primary address
    pod_interfaces: tuple[str, ...] = ()             # patterns of pod veths: never uplinks
    ip_families: tuple[str, ...] = DEFAULT_IP_FAMILIES   # --ip-families: node addresses of these only

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_addresses", tuple(ipaddress.ip_address(a) for a in self.node_addresses))
        object.__setattr__(self, "nodeport_addresses", parse_nodeport_addresses(self.nodeport_addresses))
        if self.hairpin_address is not None:
            object.__setattr__(self, "hairpin_address", IPv4Address(self.hairpin_address))
        if self.hairpin_address6 is not None:
            object.__setattr__(self, "hairpin_address6", IPv6Address(self.hairpin_address6))


@dataclass(frozen=True)
class NodeInfo:
    """Everything resolve() found; equal results mean nothing needs reconfiguring."""

    addresses: tuple[IPAddress, ...] = ()            # the node's own addresses (served families)
    primary: IPv4Address | None = None               # SNAT / node-client source address
    nodeport_addresses: tuple[IPAddress, ...] = ()
    hairpin: IPv4Address | None = None               # source of hairpin flows
    uplinks: tuple[str, ...] = ()                    # existing uplink interfaces
    missing_uplinks: tuple[str, ...] = ()            # --uplink names with no such interface
    origin: str = ""                                 # where the addresses came from, for logs
    primary6: IPv6Address | None = None              # IPv6 twin of primary (IPv6 served)
    hairpin6: IPv6Address | None = None              # source of IPv6 hairpin flows

    def describe(self) -> str:
        addrs = ", ".join(map(str, self.addresses)) or "none"
        nodeports = ", ".join(map(str, self.nodeport_addresses)) or "none"
        primary6 = f", {self.primary6}" if self.primary6 else ""
        hairpin6 = f", {self.hairpin6}" if self.hairpin6 else ""
        return (f"node addresses {addrs} ({self.origin}); primary {self.primary or 'none'}{primary6}; "
                f"NodePorts on {nodeports}; hairpin source {self.hairpin or 'none'}{hairpin6}; "
                f"uplinks {', '.join(self.uplinks) or 'none'}"
                + (f"; missing uplinks {', '.join(self.missing_uplinks)}" if self.missing_uplinks else ""))


def parse_nodeport_addresses(values) -> tuple[str, ...]:
    """Validate --nodeport-addresses: CIDRs (of a family the node does not serve: ignored), or `primary` alone.
    Returns the normalised values; raises ValueError naming the bad one."""
    values = tuple(str(v).strip() for v in values)
    if PRIMARY in values:
        if len(values) > 1:
            raise ValueError(f"{PRIMARY!r} cannot be combined with CIDRs: {', '.join(values)}")
        return values
    out = []
    for value in values:
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR (or {PRIMARY!r})") from None
        out.append(str(net))
    return tuple(out)


def read_interfaces(netns=None) -> tuple[Interface, ...]:
    """Every interface of this namespace (or `netns`) with its IPv4, then IPv6 addresses (link-local
    ones left out), in index order."""
    from ebpfsvc.datapath import nsenter

    def read(ipr) -> tuple[Interface, ...]:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addrs: dict[int, list[IPAddress]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_addr(family=family):
                addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if not addr.is_link_local:
                    addrs.setdefault(msg["index"], []).append(addr)
        return tuple(Interface(names[i], tuple(addrs.get(i, ()))) for i in sorted(names) if names[i])

    return nsenter.netlink(netns, read)


def resolve(settings: NodeSettings, interfaces: tuple[Interface, ...], node: Node | None,
            node_listed: bool) -> NodeInfo:
    """This node's addresses, NodePort addresses and uplinks (module docstring).

    `node`: the node's own Node object, if known; `node_listed`: whether the source has listed
    Nodes at all (False while the API's first list is pending: the addresses are then left
    empty rather than guessed from the interfaces, and come with the Node)."""
    # Addresses of a family this node does not serve are not node addresses here at all.
    families = settings.ip_families
    interfaces = tuple(Interface(i.name, tuple(a for a in i.addresses if family_name(a.version) in families))
                       for i in interfaces)
    local = {a for i in interfaces for a in i.addresses}
    addresses: list[IPAddress] = []
    primary = primary6 = None
    origin = ""
    if node is not None:
        addresses = _unique(a for _, a in node.addresses if a in local)
        # The source of the node's own translated traffic, per family (the datapath's SNAT and hairpin).
        primary, primary6 = (_primary_of(node, local, addresses, version) for version in (4, 6))
        origin = f"Node {node.name}"
        if not addresses:
            origin += (" has no address on this node's interfaces"
                       if node.addresses else " has no address") + "; using the interfaces'"
    if not addresses and (node is not None or node_listed):
        addresses = _unique(a for i in interfaces if i.name != LOOPBACK_DEVICE
                            for a in i.addresses if not a.is_loopback)
        origin = origin or "no Node object; the interfaces'"
    if primary is None:
        primary = _first_explicit(settings, interfaces, 4) or next((a for a in addresses if a.version == 4), None)
    if primary6 is None:
        primary6 = _first_explicit(settings, interfaces, 6) or next((a for a in addresses if a.version == 6), None)
    if not origin:
        origin = "the Node is not listed yet"

    nodeports = list(settings.node_addresses)
    selection = settings.nodeport_addresses
    if selection == (PRIMARY,):
        nodeports += [primary] if primary is not None else []
    elif selection:
        nets = [ipaddress.ip_network(c) for c in selection]
        nodeports += [a for a in _unique(a for i in interfaces for a in i.addresses)
                      if not a.is_loopback and any(a in n for n in nets if n.version == a.version)]
    elif not settings.node_addresses:
        nodeports += addresses

    if settings.uplinks is not None:
        names = {i.name for i in interfaces}
        uplinks = tuple(u for u in settings.uplinks if u in names)
        missing = tuple(u for u in settings.uplinks if u not in names)
    else:
        carried = set(addresses) | set(nodeports)
        uplinks = tuple(i.name for i in interfaces
                        if i.name != LOOPBACK_DEVICE and carried.intersection(i.addresses)
                        and not any(fnmatch.fnmatchcase(i.name, p) for p in settings.pod_interfaces))
        missing = ()
    hairpin = settings.hairpin_address if settings.hairpin_address is not None else primary
    hairpin6 = settings.hairpin_address6 if settings.hairpin_address6 is not None else primary6
    return NodeInfo(tuple(addresses), primary, tuple(_unique(nodeports)), hairpin, uplinks, missing, origin,
                    primary6, hairpin6)


def _primary_of(node: Node, local: set, addresses: list, version: int) -> IPAddress | None:
    """The Node's first InternalIP of that IP version found here, else its first node address of it."""
    internal = [a for t, a in node.addresses if t == "InternalIP" and a in local and a.version == version]
    return internal[0] if internal else next((a for a in addresses if a.version == version), None)


def _first_explicit(settings: NodeSettings, interfaces: tuple[Interface, ...], version: int) -> IPAddress | None:
    """Without a usable Node: the first address of that IP version of the first named uplink (the
    address flows leaving through it carry), else the first --node-address of it."""
    by_name = {i.name: i for i in interfaces}
    for name in settings.uplinks or ():
        iface = by_name.get(name)
        first = next((a for a in iface.addresses if a.version == version), None) if iface is not None else None
        if first is not None:
            return first
    return next((a for a in settings.node_addresses if a.version == version), None)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def node_problem(node: Node, interfaces: tuple[Interface, ...]) -> str:
    """A line for the log when some of the Node's addresses are on no interface here ("" if none)."""
    local = {a for i in interfaces for a in i.addresses}
    away = [f"{t} {a}" for t, a in node.addresses if a not in local and t == "InternalIP" and a.version == 4]
    if not away:
        return ""
    return (f"Node {node.name}: status.addresses: {', '.join(away)} is on no interface of this node; "
            f"not served")


__all__ = ["Interface", "NodeInfo", "NodeSettings", "PRIMARY", "node_problem", "parse_nodeport_addresses",
           "read_interfaces", "resolve"]
