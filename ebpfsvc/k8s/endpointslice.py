"""discovery.k8s.io/v1 EndpointSlice -> a validated, frozen EndpointSlice.

EndpointSlices are where Kubernetes resolves a Service's targetPort: the
EndpointSlice controller writes, per Service port name, the port number the
selected Pods really listen on.  So a slice's ports are authoritative for its
endpoints, exactly as in kube-proxy.

IPv4 and IPv6 slices are read (a dual-stack Service has a slice of each, and its
frontends of each family take the endpoints of that family: ebpfsvc/desired.py);
every address of a slice must be of its addressType, as the API server checks.
FQDN slices are kept as empty placeholders (valid, just nothing to program), not
reported as errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from sys import intern
from typing import NamedTuple

from ebpfsvc.k8s.fields import Fields, Invalid, check_name, ip_address, parse_ip, plain_meta, read_meta
from ebpfsvc.k8s.names import name_problem
from ebpfsvc.lbmodel import PROTOCOL_NAMES, PROTOCOLS, DerivedLast, IPAddress, Protocol

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
# Set by the EndpointSlice and Endpoints controllers: when the change this version carries was
# triggered (a Pod or Service changed); kube-proxy measures network programming latency from it.
ANNOTATION_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
MAX_ENDPOINTS = 1000      # the API allows 1000 per slice; the controller writes at most 100
MAX_PORTS = 100           # the API's limit per slice
MAX_ADDRESSES = 100
MAX_ZONE_HINTS = 8        # the API's limit on hints.forZones
MAX_NODE_HINTS = 8        # the API's limit on hints.forNodes


class EndpointPort(NamedTuple):
    name: str                   # matches a ServicePort's name
    protocol: Protocol
    port: int | None            # None: the API allows it, kube-proxy ignores such ports
    app_protocol: str = ""


class _EndpointFields(NamedTuple):
    address: IPAddress               # addresses[0]: the API says consumers use the first
    port: int | None = None          # the port number it serves (see Endpoint)
    ready: bool = True               # unset = ready
    serving: bool = True             # unset = serving (discovery/v1)
    terminating: bool = False        # unset = not terminating
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()     # hints.forNodes (trafficDistribution: PreferSameNode)
    hostname: str = ""
    text: str = ""                   # str(address): made with the endpoint


class Endpoint(DerivedLast, _EndpointFields):
    """One endpoint, with its conditions decoded as the API defines them: of a slice as parsed, and
    of one service port as merged (kube-proxy's Endpoint, endpointmerge.py).

    `port` is the port number it serves.  A merged endpoint always has one.  A slice's endpoints
    carry the slice's port number when the slice has exactly one port (most slices, one per
    Service port), else None: so the merge hands such a slice's endpoints on as they are, where it
    would make an Endpoint of each for its port (a full sync's 100,000).

    A NamedTuple: a tuple is made, hashed and compared in C, in about half the memory of a
    dataclass (no __dict__).  Its last field, `text`, is derived, as Backend.name is: the address as
    str() writes it, which names the backend (lbmodel.backend_names).  The plain path keeps the
    API's own text of an IPv4 address, which inet_pton took (a dotted quad as str() writes it,
    nothing else): no text made per endpoint."""

    __slots__ = ()

    def __new__(cls, address: IPAddress, port: int | None = None, ready: bool = True, serving: bool = True,
                terminating: bool = False, node_name: str = "", zone: str = "",
                zone_hints: frozenset[str] = frozenset(), node_hints: frozenset[str] = frozenset(),
                hostname: str = "") -> "Endpoint":
        return tuple.__new__(cls, (address, port, ready, serving, terminating, node_name, zone, zone_hints,
                                   node_hints, hostname, str(address)))

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.address.version, int(self.address), self.port)


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str               # label kubernetes.io/service-name; "" = belongs to no Service
    address_type: str = "IPv4"
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()    # their `port` is the slice's when it has one (Endpoint)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def service_key(self) -> tuple[str, str] | None:
        return (self.namespace, self.service_name) if self.service_name else None


def parse_endpoint_slice(obj: dict) -> EndpointSlice:
    """Validate an EndpointSlice; raises Invalid naming the first bad field."""
    sl = _plain_slice(obj)
    return sl if sl is not None else _read_slice(obj)


def _plain_slice(obj) -> EndpointSlice | None:
    """_read_slice's result for a slice of the usual shape, or None for anything else, which
    _read_slice then reads (or rejects, naming the field): this only decides what it would decide.
    The usual shape: metadata as fields.plain_meta takes it, addressType IPv4 or IPv6, ports that
    are dicts of the API's types with a port number each.  Its endpoints are read as _read_slice
    reads them (_endpoints), and a bad one is named the same way."""
    head = plain_meta(obj, "EndpointSlice", "discovery.k8s.io/v1", "dns1123-subdomain")
    address_type = obj.get("addressType") if head is not None else None
    if address_type != "IPv4" and address_type != "IPv6":
        return None
    service_name = head.labels.get(LABEL_SERVICE_NAME, "")
    if service_name and name_problem(service_name, "label-value"):
        return None
    items = obj.get("ports")
    items = [] if items is None else items
    if type(items) is not list or len(items) > MAX_PORTS:
        return None
    ports, seen = [], set()
    for p in items:
        if type(p) is not dict:
            return None
        name, protocol, port, app = p.get("name"), p.get("protocol"), p.get("port"), p.get("appProtocol")
        name = "" if name is None else name
        protocol = Protocol.TCP if protocol is None else PROTOCOLS.get(protocol) if type(protocol) is str else None
        app = "" if app is None else app
        if (type(name) is not str or (name and name_problem(name, "dns1123-label")) or protocol is None
                or type(port) is not int or not 0 < port <= 65535 or type(app) is not str or (name, protocol) in seen):
            return None
        seen.add((name, protocol))
        ports.append(EndpointPort(name, protocol, port, app))
    return EndpointSlice(head.namespace, head.name, service_name, address_type, tuple(ports),
                         _endpoints(Fields(obj), 4 if address_type == "IPv4" else 6, _slice_port(ports)))


def _read_slice(obj: dict) -> EndpointSlice:
    """parse_endpoint_slice through the field readers: every field read by path, the bad one named."""
    top, meta = read_meta(obj, "EndpointSlice", ("discovery.k8s.io/v1",))
    address_type = top.str("addressType", "", ("IPv4", "IPv6", "FQDN"))
    if not address_type:
        raise Invalid("addressType", "is required")
    service_name = meta.labels.get(LABEL_SERVICE_NAME, "")
    if service_name:
        check_name(service_name, f"metadata.labels[{LABEL_SERVICE_NAME}]", "label-value")
    if address_type == "FQDN":
        return EndpointSlice(meta.namespace, meta.name, service_name, address_type)
    ports = tuple(parse_endpoint_port(p) for p in top.objects("ports", MAX_PORTS))
    _check_unique_ports(ports, "ports")
    version = 4 if address_type == "IPv4" else 6
    return EndpointSlice(meta.namespace, meta.name, service_name, address_type, ports,
                         _endpoints(top, version, _slice_port(ports)))


def _slice_port(ports) -> int | None:
    """The port number a slice's endpoints carry (Endpoint.port): its one port's, else None."""
    return ports[0].port if len(ports) == 1 else None


def _endpoints(top: Fields, version: int, port: int | None) -> tuple[Endpoint, ...]:
    """The slice's endpoints: each one of the usual shape read by _plain_endpoint, anything else
    (a hint, a value of an odd type, a bad address) by _endpoint, which reads every field through
    Fields and names the bad one.  A full sync reads 100,000 endpoints: this costs about a
    microsecond each where _endpoint costs several."""
    items = top.raw("endpoints")
    if type(items) is not list or len(items) > MAX_ENDPOINTS:
        items = [item for _, item in top.list("endpoints", MAX_ENDPOINTS)]     # raises the problem
    out = list(map(_plain_endpoint, items, repeat(version), repeat(port)))
    if None in out:     # one the plain path left to the field readers (to read, or to name)
        out = [ep if ep is not None else _endpoint(Fields(item, f"endpoints[{i}]"), version, port)
               for i, (ep, item) in enumerate(zip(out, items))]
    return tuple(out)


_NO_HINTS: frozenset[str] = frozenset()


def _plain_endpoint(e, version: int, port: int | None = None) -> Endpoint | None:
    """_endpoint's result for an endpoint of the usual shape: a dict with one address or more of the
    slice's family, conditions of bools, string nodeName, zone and hostname, no hints.  None for
    anything else, which _endpoint then reads (or rejects, naming the field): this only decides
    what _endpoint would decide the same way."""
    if type(e) is not dict or e.get("hints") is not None:
        return None
    addresses = e.get("addresses")
    if type(addresses) is not list or not 0 < len(addresses) <= MAX_ADDRESSES:
        return None
    first = None
    for text in addresses:
        # The parse itself, not parse_ip's checks around it: an address that is not a plain string
        # (or has spaces to strip) is _endpoint's to read.
        try:
            addr = ip_address(text)
        except (ValueError, TypeError):
            return None
        if addr.version != version:
            return None
        if first is None:
            first, first_text = addr, text if version == 4 and type(text) is str else str(addr)
    cond = e.get("conditions")
    if cond is None:
        ready = serving = True
        terminating = False
    elif type(cond) is dict:
        ready, serving, terminating = cond.get("ready"), cond.get("serving"), cond.get("terminating")
        ready = True if ready is None else ready
        serving = True if serving is None else serving
        terminating = False if terminating is None else terminating
        # An int 1 or a string "true" is _endpoint's to refuse.
        if type(ready) is not bool or type(serving) is not bool or type(terminating) is not bool:
            return None
    else:
        return None
    node_name, zone, hostname = e.get("nodeName"), e.get("zone"), e.get("hostname")
    node_name = "" if node_name is None else node_name
    zone = "" if zone is None else zone
    hostname = "" if hostname is None else hostname
    if type(node_name) is not str or type(zone) is not str or type(hostname) is not str:
        return None
    # Interned: the same few node and zone names recur in every endpoint.  Endpoint._make
    # without its length check (its fields are all here, the text the API's: see Endpoint).
    return tuple.__new__(Endpoint, (first, port, ready, serving, terminating, intern(node_name), intern(zone),
                                    _NO_HINTS, _NO_HINTS, hostname, first_text))


def parse_endpoint_port(p: Fields) -> EndpointPort:
    """A port of an EndpointSlice or of a v1 Endpoints subset (same shape)."""
    protocol = PROTOCOLS[p.str("protocol", "TCP", PROTOCOL_NAMES)]
    return EndpointPort(p.name("name", "dns1123-label"), protocol, p.int("port", 1, 65535), p.str("appProtocol"))


def _check_unique_ports(ports: tuple[EndpointPort, ...], path: str) -> None:
    seen = set()
    for i, port in enumerate(ports):
        if (port.name, port.protocol) in seen:
            raise Invalid(f"{path}[{i}].name", f"{port.name!r}/{port.protocol.value} appears twice")
        seen.add((port.name, port.protocol))


def _endpoint(e: Fields, version: int, port: int | None = None) -> Endpoint:
    addresses = e.list("addresses", MAX_ADDRESSES)
    if not addresses:
        raise Invalid(f"{e.path}.addresses", "needs at least one address")
    address = _address(*addresses[0], version)
    for path, other in addresses[1:]:
        _address(path, other, version)
    cond = e.obj("conditions")
    ready = cond.bool("ready", True)
    hints = frozenset(z.str("name") for z in e.obj("hints").objects("forZones", MAX_ZONE_HINTS)) - {""}
    node_hints = frozenset(n.str("name") for n in e.obj("hints").objects("forNodes", MAX_NODE_HINTS)) - {""}
    return Endpoint(
        address=address,
        port=port,
        ready=ready,
        serving=cond.bool("serving", True),
        terminating=cond.bool("terminating", False),
        node_name=e.str("nodeName"),
        zone=e.str("zone"),
        zone_hints=hints,
        node_hints=node_hints,
        hostname=e.str("hostname"),
    )


def _address(path: str, value, version: int) -> IPAddress:
    """An address of the slice's addressType: one slice never mixes families."""
    addr = parse_ip(value, path)
    if addr.version != version:
        raise Invalid(path, f"{value} is not an IPv{version} address")
    return addr


def last_change_trigger_time(obj: dict) -> float | None:
    """ANNOTATION_TRIGGER_TIME of an EndpointSlice or Endpoints as a Unix time; None when absent or
    unreadable (it only times the change: a bad one costs the measurement, not the object)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    value = annotations.get(ANNOTATION_TRIGGER_TIME) if isinstance(annotations, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
