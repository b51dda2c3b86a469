"""The lab file: which nodes, pod CIDRs, zones, external clients and IP families a local lab has.

A lab file describes the cluster a lab stands in for (see docs/lab.md).  It is
validated here, before anything is created, so a typo costs an error message
naming the field (`nodes[1].podCIDR: ...`) rather than a half-built lab.

Every address must lie in 198.18.0.0/15 (RFC 2544) or 2001:2::/48 (RFC 5180), the
ranges reserved for benchmarking: the lab must never be able to shadow a real
network of the machine it runs on.

`ipFamilies` says which families the lab has, the primary first, as a Service's
`spec.ipFamilies` does: [IPv4] (the default), [IPv4, IPv6] or [IPv6, IPv4]
(dual-stack), [IPv6] (single-stack IPv6).  `address`, `podCIDR`, `serviceCIDR` and
a route's `to` take one value or a list with one per family.  An IPv6 value the file
leaves out is the twin of its IPv4 one in the lab's address plan (`ipv6_twin`), so
the default lab file plus `ipFamilies: [IPv4, IPv6]` is a dual-stack lab.

`clusterCIDR` (optional, IPv4) is the cluster's pod range, kube-proxy's `--cluster-cidr`: every
node's IPv4 podCIDR inside it, and nothing else of the lab (the fabric with its node and client
addresses, the service range) in it, since kube-proxy and the agents take any source in it for
a pod.  Without it the lab's kube-proxy tells pods by the Node's podCIDR (kubeproxy.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The only ranges a lab may use (RFC 2544, RFC 5180): no lab route can ever capture real traffic.
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
LAB_RANGE6 = ipaddress.ip_network("2001:2::/48")
LAB_RANGES = {4: LAB_RANGE, 6: LAB_RANGE6}
# Nodes and external clients share one L2 segment, the fabric.
FABRIC_CIDR = ipaddress.ip_network("198.18.0.0/24")
FABRIC_CIDR6 = ipaddress.ip_network("2001:2::/64")
FABRIC_CIDRS = {4: FABRIC_CIDR, 6: FABRIC_CIDR6}
DEFAULT_LABFILE = "default.yaml"
#: The lab's address plan for clusterIPs (kube-apiserver --service-cluster-ip-range); benches use it too.
DEFAULT_SERVICE_CIDR = "198.19.0.0/16"
# /108: kube-apiserver refuses a service range of more than 2^20 addresses (its allocator's bitmap
# lives in etcd), /108 for IPv6 as /12 for IPv4. "ffff" is no decimal octet, so no derived pod
# CIDR (ipv6_twin) can ever overlap it.
DEFAULT_SERVICE_CIDR6 = "2001:2:0:ffff::/108"
DEFAULT_SERVICE_CIDRS = {4: DEFAULT_SERVICE_CIDR, 6: DEFAULT_SERVICE_CIDR6}
MAX_SERVICE_HOST_BITS = 20
DEFAULT_CONTROL_PLANE = {4: "198.18.0.2", 6: "2001:2::2"}
FAMILIES = {"IPv4": 4, "IPv6": 6}
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
# The IPv4 plan's /16 that has IPv6 twins (ipv6_twin): 198.18.c.d -> 2001:2:0:c::d.
_TWINNED = ipaddress.ip_network("198.18.0.0/16")

# Names become parts of namespace names and file names: keep them DNS-label-like.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class LabFileError(ValueError):
    """The lab file is invalid; the message names the offending field."""


def ipv6_twin(value: IPAddress | IPNetwork) -> IPAddress | IPNetwork | None:
    """The IPv6 twin of an IPv4 address or /24 of the lab's plan, None if it has none.

    198.18.c.d -> 2001:2:0:c::d and 198.18.c.0/24 -> 2001:2:0:c::/64 (c is the /64's subnet
    id: 2001:2::/48 leaves 16 bits), with c and d written with the same (decimal) digits, so
    the twins read like the originals: node 198.18.0.11 is 2001:2::11 on the fabric
    2001:2::/64, pod 198.18.1.5 of 198.18.1.0/24 is 2001:2:0:1::5 of 2001:2:0:1::/64,
    externalIP 198.18.200.7 is 2001:2:0:200::7.
    """
    if isinstance(value, ipaddress.IPv4Address) and value in _TWINNED:
        _, _, c, d = value.packed
        return ipaddress.IPv6Address(f"2001:2:0:{c}::{d}")
    if isinstance(value, ipaddress.IPv4Network) and value.subnet_of(_TWINNED) and value.prefixlen == 24:
        return ipaddress.IPv6Network(f"2001:2:0:{value.network_address.packed[2]}::/64")
    return None


@dataclass(frozen=True)
class Route:
    to: IPNetwork
    via: str                     # a node's name: the client's "upstream router" for `to`


@dataclass(frozen=True)
class NodeSpec:
    name: str
    addresses: tuple[IPAddress, ...]      # on the fabric, one per lab family (primary first): its InternalIPs
    pod_cidrs: tuple[IPNetwork, ...]      # one per lab family, primary first: the Node's spec.podCIDRs
    zone: str

    @property
    def address(self) -> IPAddress:
        """The primary address (the Node's first InternalIP)."""
        return self.addresses[0]

    @property
    def pod_cidr(self) -> IPNetwork:
        return self.pod_cidrs[0]

    def address_of(self, version: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == version), None)

    def pod_cidr_of(self, version: int) -> IPNetwork | None:
        return next((c for c in self.pod_cidrs if c.version == version), None)

    @property
    def gateway(self) -> ipaddress.IPv4Address | None:
        """The pods' IPv4 default gateway: the IPv4 pod CIDR's first host (on the node's `lo`).
        IPv6 pods route via the link-local fe80::1 of their host veth (network.py); the IPv6
        CIDR's first host is kept free all the same."""
        cidr = self.pod_cidr_of(4)
        return cidr.network_address + 1 if cidr is not None else None

    def reserved(self, cidr: IPNetwork) -> set[IPAddress]:
        """The addresses of a pod CIDR no pod gets: network, first host, (IPv4) broadcast."""
        return {cidr.network_address, cidr.network_address + 1, cidr.broadcast_address}


@dataclass(frozen=True)
class ExternalSpec:
    name: str
    addresses: tuple[IPAddress, ...]
    routes: tuple[Route, ...] = ()

    @property
    def address(self) -> IPAddress:
        return self.addresses[0]


@dataclass(frozen=True)
class ControlPlaneSpec:
    """Where the lab's API server sits on the fabric (its namespace is `<prefix>-cp`)."""
    addresses: tuple[IPAddress, ...] = (ipaddress.IPv4Address(DEFAULT_CONTROL_PLANE[4]),)

    @property
    def address(self) -> IPAddress:
        """The primary address: kube-apiserver's --advertise-address, of the primary service
        range's family as the API server requires."""
        return self.addresses[0]


@dataclass(frozen=True)
class LabSpec:
    name: str
    service_cidrs: tuple[IPNetwork, ...]
    nodes: tuple[NodeSpec, ...]
    external: tuple[ExternalSpec, ...] = field(default=())
    control_plane: ControlPlaneSpec = field(default_factory=ControlPlaneSpec)
    ip_families: tuple[str, ...] = ("IPv4",)
    cluster_cidr: ipaddress.IPv4Network | None = None    # kube-proxy's --cluster-cidr; None: none

    @property
    def service_cidr(self) -> IPNetwork:
        """The primary service range (the `kubernetes` Service's ClusterIP is its first host)."""
        return self.service_cidrs[0]

    @property
    def versions(self) -> tuple[int, ...]:
        """The lab's IP versions, primary first: (4,), (4, 6), (6, 4) or (6,)."""
        return tuple(FAMILIES[f] for f in self.ip_families)

    @property
    def has_ipv6(self) -> bool:
        return 6 in self.versions

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in lab (nodes: {', '.join(n.name for n in self.nodes)})")

    def external_client(self, name: str) -> ExternalSpec:
        for ext in self.external:
            if ext.name == name:
                return ext
        raise KeyError(f"no external client {name!r} in lab")

    def to_dict(self) -> dict[str, Any]:
        """The lab file form again, so the state dir can keep the exact spec a lab was built from."""
        def one_or_all(values) -> str | list[str]:
            return str(values[0]) if len(values) == 1 else [str(v) for v in values]

        doc: dict[str, Any] = {
            "name": self.name,
            "ipFamilies": list(self.ip_families),
            "serviceCIDR": one_or_all(self.service_cidrs),
            "controlPlane": {"address": one_or_all(self.control_plane.addresses)},
            "nodes": [{"name": n.name, "address": one_or_all(n.addresses), "podCIDR": one_or_all(n.pod_cidrs),
                       "zone": n.zone} for n in self.nodes],
            "external": [{"name": e.name, "address": one_or_all(e.addresses),
                          "routes": [{"to": str(r.to), "via": r.via} for r in e.routes]}
                         for e in self.external],
        }
        if self.cluster_cidr is not None:
            doc["clusterCIDR"] = str(self.cluster_cidr)
        return doc


def default_labfile() -> Path:
    return Path(str(resources.files("ebpfsvc.lab").joinpath(DEFAULT_LABFILE)))


def load(path: str | Path | None = None) -> LabSpec:
    """Read and validate a lab file (the shipped default when `path` is None)."""
    path = Path(path) if path else default_labfile()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LabFileError(f"{path}: {exc}") from exc
    try:
        return parse(doc)
    except LabFileError as exc:
        raise LabFileError(f"{path}: {exc}") from None


def parse(doc: Any) -> LabSpec:
    if not isinstance(doc, dict):
        raise LabFileError("a lab file is a mapping with name, ipFamilies, serviceCIDR, nodes, external")
    name = _name(doc.get("name", "demo"), "name")
    families = _families(doc.get("ipFamilies", ["IPv4"]))
    versions = tuple(FAMILIES[f] for f in families)
    service_cidrs = _per_family(doc.get("serviceCIDR", DEFAULT_SERVICE_CIDR), "serviceCIDR", versions,
                                _network, derive=False, defaults=DEFAULT_SERVICE_CIDRS)
    for i, cidr in enumerate(service_cidrs):
        if cidr.max_prefixlen - cidr.prefixlen > MAX_SERVICE_HOST_BITS:
            where = "serviceCIDR" if len(service_cidrs) == 1 else f"serviceCIDR[{i}]"
            raise LabFileError(f"{where}: {cidr} is too large for kube-apiserver (at most 2^{MAX_SERVICE_HOST_BITS} "
                               f"addresses: /{cidr.max_prefixlen - MAX_SERVICE_HOST_BITS} or smaller)")
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise LabFileError("nodes: at least one node is required")
    nodes = tuple(_node(raw, f"nodes[{i}]", versions) for i, raw in enumerate(raw_nodes))
    raw_ext = doc.get("external") or []
    if not isinstance(raw_ext, list):
        raise LabFileError("external: must be a list")
    by_name = {n.name: n for n in nodes}
    external = tuple(_external(raw, f"external[{i}]", by_name, versions) for i, raw in enumerate(raw_ext))
    raw_cp = doc.get("controlPlane") or {}
    if not isinstance(raw_cp, dict):
        raise LabFileError("controlPlane: must be a mapping with address")
    control_plane = ControlPlaneSpec(_per_family(raw_cp.get("address", [DEFAULT_CONTROL_PLANE[v] for v in versions]),
                                                 "controlPlane.address", versions, _fabric_address))
    _check_unique(nodes, external, control_plane)
    _check_no_overlap(service_cidrs, nodes)
    cluster_cidr = None
    if doc.get("clusterCIDR") is not None:
        cluster_cidr = _cluster_cidr(doc["clusterCIDR"], versions, service_cidrs, nodes)
    return LabSpec(name, service_cidrs, nodes, external, control_plane, families, cluster_cidr)


def _cluster_cidr(value: Any, versions: tuple[int, ...], service_cidrs: tuple[IPNetwork, ...],
                  nodes: tuple[NodeSpec, ...]) -> ipaddress.IPv4Network:
    """kube-proxy's --cluster-cidr: it must hold every pod and nothing that is not a pod, or the
    proxies would take a node or an external client for a pod (and skip its masquerade)."""
    cidr = _network(value, "clusterCIDR")
    if cidr.version != 4:
        raise LabFileError(f"clusterCIDR: {cidr} is not IPv4 (the lab's cluster CIDR is IPv4 only)")
    if 4 not in versions:
        raise LabFileError(f"clusterCIDR: {cidr} is IPv4, and the lab's ipFamilies have no IPv4")
    # Every node, external client and the control plane has its address on the fabric (_fabric_address).
    if cidr.overlaps(FABRIC_CIDR):
        raise LabFileError(f"clusterCIDR: {cidr} overlaps the fabric {FABRIC_CIDR} "
                           "(the addresses of the nodes and the external clients)")
    for i, service_cidr in enumerate(service_cidrs):
        if service_cidr.version == 4 and service_cidr.overlaps(cidr):
            where = "serviceCIDR" if len(service_cidrs) == 1 else f"serviceCIDR[{i}]"
            raise LabFileError(f"clusterCIDR: {cidr} overlaps {where} ({service_cidr})")
    for i, node in enumerate(nodes):
        pod_cidr = node.pod_cidr_of(4)
        if pod_cidr is not None and not pod_cidr.subnet_of(cidr):
            raise LabFileError(f"nodes[{i}].podCIDR: {pod_cidr} is outside clusterCIDR ({cidr})")
    return cidr


def _families(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not 1 <= len(value) <= 2 or any(v not in FAMILIES for v in value)
            or len(set(value)) != len(value)):
        raise LabFileError(f"ipFamilies: {value!r} is not one of [IPv4], [IPv4, IPv6], [IPv6, IPv4], [IPv6]")
    return tuple(value)


def _per_family(value: Any, where: str, versions: tuple[int, ...], parse_one, derive: bool = True,
                defaults: dict[int, str] | None = None) -> tuple:
    """One value per lab family, in the lab's family order, from a value or a list of one per family.

    A missing IPv6 value is the IPv4 one's twin (ipv6_twin) when `derive`, else the family's
    default; a given value of a family the lab does not have only serves to derive the other."""
    raw = value if isinstance(value, list) else [value]
    if not 1 <= len(raw) <= 2:
        raise LabFileError(f"{where}: one value, or a list of one per IP family")
    given = {}
    for i, item in enumerate(raw):
        parsed = parse_one(item, where if len(raw) == 1 else f"{where}[{i}]")
        if parsed.version in given:
            raise LabFileError(f"{where}: two {FAMILY_NAMES[parsed.version]} values ({given[parsed.version]}, {parsed})")
        given[parsed.version] = parsed
    out = []
    for version in versions:
        if version in given:
            out.append(given[version])
            continue
        twin = ipv6_twin(given[4]) if derive and version == 6 and 4 in given else None
        if twin is not None:
            out.append(parse_one(str(twin), where))
        elif defaults and version in defaults and not derive:
            out.append(parse_one(defaults[version], where))
        else:
            raise LabFileError(f"{where}: no {FAMILY_NAMES[version]} value (the lab's ipFamilies have it); "
                               f"give one per family, e.g. [{', '.join(map(str, given.values()))}, ...]")
    return tuple(out)


def _node(raw: Any, where: str, versions: tuple[int, ...]) -> NodeSpec:
    if not isinstance(raw, dict):
        raise LabFileError(f"{where}: must be a mapping")
    name = _name(raw.get("name"), f"{where}.name")
    addresses = _per_family(raw.get("address"), f"{where}.address", versions, _fabric_address)
    pod_cidrs = _per_family(raw.get("podCIDR"), f"{where}.podCIDR", versions, _network)
    for cidr in pod_cidrs:
        if cidr.max_prefixlen - cidr.prefixlen < 2:
            raise LabFileError(f"{where}.podCIDR: {cidr} is too small for a gateway and pods")
    zone = raw.get("zone", "")
    if not isinstance(zone, str):
        raise LabFileError(f"{where}.zone: must be a string")
    return NodeSpec(name, addresses, pod_cidrs, zone)


def _external(raw: Any, where: str, nodes: dict[str, NodeSpec], versions: tuple[int, ...]) -> ExternalSpec:
    if not isinstance(raw, dict):
        raise LabFileError(f"{where}: must be a mapping")
    name = _name(raw.get("name"), f"{where}.name")
    addresses = _per_family(raw.get("address"), f"{where}.address", versions, _fabric_address)
    given: list[tuple[IPNetwork, str]] = []
    for j, r in enumerate(raw.get("routes") or []):
        rwhere = f"{where}.routes[{j}]"
        if not isinstance(r, dict):
            raise LabFileError(f"{rwhere}: must be a mapping with to and via")
        via = r.get("via")
        if via not in nodes:
            raise LabFileError(f"{rwhere}.via: {via!r} is not a node of this lab")
        tos = r.get("to") if isinstance(r.get("to"), list) else [r.get("to")]
        given += [(_network(to, f"{rwhere}.to"), via) for to in tos]
    # A client whose file names no IPv6 route gets the twins of its IPv4 ones in a lab with IPv6
    # (the stored lab.yaml lists both, so reading it again derives nothing twice).
    if 6 in versions and not any(to.version == 6 for to, _ in given):
        given += [(twin, via) for to, via in given if (twin := ipv6_twin(to)) is not None]
    routes = [Route(to, via) for to, via in given if to.version in versions]
    return ExternalSpec(name, addresses, tuple(routes))


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > 40:
        raise LabFileError(f"{where}: {value!r} is not a valid name (lowercase DNS label, <= 40 chars)")
    return value


def _network(value: Any, where: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise LabFileError(f"{where}: {value!r} is not a CIDR ({exc})") from None
    if not net.subnet_of(LAB_RANGES[net.version]):
        raise LabFileError(f"{where}: {net} is outside the lab range {LAB_RANGES[net.version]}")
    return net


def _fabric_address(value: Any, where: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(str(value))
    except ValueError:
        raise LabFileError(f"{where}: {value!r} is not an IP address") from None
    if addr not in LAB_RANGES[addr.version]:
        raise LabFileError(f"{where}: {addr} is outside the lab range {LAB_RANGES[addr.version]}")
    # Nodes and clients are plugged into one bridge: they must share its subnet.
    fabric = FABRIC_CIDRS[addr.version]
    if addr not in fabric or addr in (fabric.network_address, fabric.broadcast_address):
        raise LabFileError(f"{where}: {addr} is not a host address of the fabric {fabric}")
    return addr


def _check_unique(nodes: tuple[NodeSpec, ...], external: tuple[ExternalSpec, ...],
                  control_plane: ControlPlaneSpec) -> None:
    seen_names: dict[str, str] = {"fabric": "the fabric namespace", "cp": "the control plane's namespace"}
    seen_addrs: dict[IPAddress, str] = {a: "controlPlane.address" for a in control_plane.addresses}
    members = [(f"nodes[{i}]", n.name, n.addresses) for i, n in enumerate(nodes)]
    members += [(f"external[{i}]", e.name, e.addresses) for i, e in enumerate(external)]
    for where, name, addrs in members:
        if name in seen_names:
            raise LabFileError(f"{where}.name: {name!r} is already used by {seen_names[name]}")
        seen_names[name] = where
        for addr in addrs:
            if addr in seen_addrs:
                raise LabFileError(f"{where}.address: {addr} is already used by {seen_addrs[addr]}")
            seen_addrs[addr] = where


def _check_no_overlap(service_cidrs: tuple[IPNetwork, ...], nodes: tuple[NodeSpec, ...]) -> None:
    claimed: list[tuple[str, IPNetwork]] = [("fabric", FABRIC_CIDR), ("fabric", FABRIC_CIDR6)]
    for cidr in service_cidrs:
        fabric = FABRIC_CIDRS[cidr.version]
        if cidr.overlaps(fabric):
            raise LabFileError(f"serviceCIDR: {cidr} overlaps the fabric {fabric}")
        claimed.append(("serviceCIDR", cidr))
    for i, node in enumerate(nodes):
        for pod_cidr in node.pod_cidrs:
            for owner, net in claimed:
                if pod_cidr.version == net.version and pod_cidr.overlaps(net):
                    raise LabFileError(f"nodes[{i}].podCIDR: {pod_cidr} overlaps {owner} ({net})")
            claimed.append((f"nodes[{i}].podCIDR", pod_cidr))
