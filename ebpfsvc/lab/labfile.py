"""The lab file: which nodes, pod CIDRs, zones and external clients a local lab has.

A lab file describes the cluster a lab stands in for (see docs/lab.md).  It is
validated here, before anything is created, so a typo costs an error message
naming the field (`nodes[1].podCIDR: ...`) rather than a half-built lab.

Every address must lie in 198.18.0.0/15 (RFC 2544, reserved for benchmarking):
the lab must never be able to shadow a real network of the machine it runs on.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The only range a lab may use (RFC 2544): no lab route can ever capture real traffic.
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
# Nodes and external clients share one L2 segment, the fabric.
FABRIC_CIDR = ipaddress.ip_network("198.18.0.0/24")
DEFAULT_LABFILE = "default.yaml"
#: The lab's address plan for clusterIPs (kube-apiserver --service-cluster-ip-range); benches use it too.
DEFAULT_SERVICE_CIDR = "198.19.0.0/16"

# Names become parts of namespace names and file names: keep them DNS-label-like.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class LabFileError(ValueError):
    """The lab file is invalid; the message names the offending field."""


@dataclass(frozen=True)
class Route:
    to: ipaddress.IPv4Network
    via: str                     # a node's name: the client's "upstream router" for `to`


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: ipaddress.IPv4Address          # on the fabric, the node's InternalIP
    pod_cidr: ipaddress.IPv4Network
    zone: str

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The pods' default gateway: the CIDR's first host."""
        return self.pod_cidr.network_address + 1


@dataclass(frozen=True)
class ExternalSpec:
    name: str
    address: ipaddress.IPv4Address
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class ControlPlaneSpec:
    """Where the lab's API server sits on the fabric (its namespace is `<prefix>-cp`)."""
    address: ipaddress.IPv4Address = ipaddress.IPv4Address("198.18.0.2")


@dataclass(frozen=True)
class LabSpec:
    name: str
    service_cidr: ipaddress.IPv4Network
    nodes: tuple[NodeSpec, ...]
    external: tuple[ExternalSpec, ...] = field(default=())
    control_plane: ControlPlaneSpec = field(default_factory=ControlPlaneSpec)

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
        return {
            "name": self.name,
            "serviceCIDR": str(self.service_cidr),
            "controlPlane": {"address": str(self.control_plane.address)},
            "nodes": [{"name": n.name, "address": str(n.address), "podCIDR": str(n.pod_cidr),
                       "zone": n.zone} for n in self.nodes],
            "external": [{"name": e.name, "address": str(e.address),
                          "routes": [{"to": str(r.to), "via": r.via} for r in e.routes]}
                         for e in self.external],
        }


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
        raise LabFileError("a lab file is a mapping with name, serviceCIDR, nodes, external")
    name = _name(doc.get("name", "demo"), "name")
    service_cidr = _network(doc.get("serviceCIDR", DEFAULT_SERVICE_CIDR), "serviceCIDR")
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise LabFileError("nodes: at least one node is required")
    nodes = tuple(_node(raw, f"nodes[{i}]") for i, raw in enumerate(raw_nodes))
    raw_ext = doc.get("external") or []
    if not isinstance(raw_ext, list):
        raise LabFileError("external: must be a list")
    node_names = {n.name for n in nodes}
    external = tuple(_external(raw, f"external[{i}]", node_names) for i, raw in enumerate(raw_ext))
    raw_cp = doc.get("controlPlane") or {}
    if not isinstance(raw_cp, dict):
        raise LabFileError("controlPlane: must be a mapping with address")
    control_plane = ControlPlaneSpec(_fabric_address(raw_cp.get("address", str(ControlPlaneSpec.address)),
                                                     "controlPlane.address"))
    _check_unique(nodes, external, control_plane)
    _check_no_overlap(service_cidr, nodes)
    return LabSpec(name, service_cidr, nodes, external, control_plane)


def _node(raw: Any, where: str) -> NodeSpec:
    if not isinstance(raw, dict):
        raise LabFileError(f"{where}: must be a mapping")
    name = _name(raw.get("name"), f"{where}.name")
    address = _fabric_address(raw.get("address"), f"{where}.address")
    pod_cidr = _network(raw.get("podCIDR"), f"{where}.podCIDR")
    if pod_cidr.prefixlen > 30:
        raise LabFileError(f"{where}.podCIDR: {pod_cidr} is too small for a gateway and pods")
    zone = raw.get("zone", "")
    if not isinstance(zone, str):
        raise LabFileError(f"{where}.zone: must be a string")
    return NodeSpec(name, address, pod_cidr, zone)


def _external(raw: Any, where: str, node_names: set[str]) -> ExternalSpec:
    if not isinstance(raw, dict):
        raise LabFileError(f"{where}: must be a mapping")
    name = _name(raw.get("name"), f"{where}.name")
    address = _fabric_address(raw.get("address"), f"{where}.address")
    routes = []
    for j, r in enumerate(raw.get("routes") or []):
        rwhere = f"{where}.routes[{j}]"
        if not isinstance(r, dict):
            raise LabFileError(f"{rwhere}: must be a mapping with to and via")
        to = _network(r.get("to"), f"{rwhere}.to")
        via = r.get("via")
        if via not in node_names:
            raise LabFileError(f"{rwhere}.via: {via!r} is not a node of this lab")
        routes.append(Route(to, via))
    return ExternalSpec(name, address, tuple(routes))


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > 40:
        raise LabFileError(f"{where}: {value!r} is not a valid name (lowercase DNS label, <= 40 chars)")
    return value


def _network(value: Any, where: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as exc:
        raise LabFileError(f"{where}: {value!r} is not an IPv4 CIDR ({exc})") from None
    if not net.subnet_of(LAB_RANGE):
        raise LabFileError(f"{where}: {net} is outside the lab range {LAB_RANGE}")
    return net


def _fabric_address(value: Any, where: str) -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.IPv4Address(str(value))
    except ValueError:
        raise LabFileError(f"{where}: {value!r} is not an IPv4 address") from None
    if addr not in LAB_RANGE:
        raise LabFileError(f"{where}: {addr} is outside the lab range {LAB_RANGE}")
    # Nodes and clients are plugged into one bridge: they must share its subnet.
    if addr not in FABRIC_CIDR or addr in (FABRIC_CIDR.network_address, FABRIC_CIDR.broadcast_address):
        raise LabFileError(f"{where}: {addr} is not a host address of the fabric {FABRIC_CIDR}")
    return addr


def _check_unique(nodes: tuple[NodeSpec, ...], external: tuple[ExternalSpec, ...],
                  control_plane: ControlPlaneSpec) -> None:
    seen_names: dict[str, str] = {"fabric": "the fabric namespace", "cp": "the control plane's namespace"}
    seen_addrs: dict[ipaddress.IPv4Address, str] = {control_plane.address: "controlPlane.address"}
    members = [(f"nodes[{i}]", n.name, n.address) for i, n in enumerate(nodes)]
    members += [(f"external[{i}]", e.name, e.address) for i, e in enumerate(external)]
    for where, name, addr in members:
        if name in seen_names:
            raise LabFileError(f"{where}.name: {name!r} is already used by {seen_names[name]}")
        if addr in seen_addrs:
            raise LabFileError(f"{where}.address: {addr} is already used by {seen_addrs[addr]}")
        seen_names[name] = where
        seen_addrs[addr] = where


def _check_no_overlap(service_cidr: ipaddress.IPv4Network, nodes: tuple[NodeSpec, ...]) -> None:
    claimed: list[tuple[str, ipaddress.IPv4Network]] = [("fabric", FABRIC_CIDR), ("serviceCIDR", service_cidr)]
    if service_cidr.overlaps(FABRIC_CIDR):
        raise LabFileError(f"serviceCIDR: {service_cidr} overlaps the fabric {FABRIC_CIDR}")
    for i, node in enumerate(nodes):
        for owner, net in claimed:
            if node.pod_cidr.overlaps(net):
                raise LabFileError(f"nodes[{i}].podCIDR: {node.pod_cidr} overlaps {owner} ({net})")
        claimed.append((f"nodes[{i}].podCIDR", node.pod_cidr))
