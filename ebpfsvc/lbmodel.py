"""The load-balancer state the datapath serves, in names rather than map ids.

This is the contract between the control plane and the map writer:

    Services + EndpointSlices --(ebpfsvc.desired, pure)--> LBState --(ebpfsvc.datapath.writer)--> BPF maps

An LBState says, for every frontend (address, port, protocol, scope) this node
must answer, which backends are usable *after* every Kubernetes rule was applied
(traffic policies, endpoint conditions, topology hints), how to choose among
them and how long client affinity lasts.  It knows nothing of map ids, Maglev
slots or byte layouts: the writer derives those, so this stays easy to build in
unit tests and to compare.

All types are frozen and hashable, so two states compare with ==, and diffs are
set operations.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Union

# Either family: a dual-stack Service has one frontend per family, each with backends of its own family.
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class Protocol(str, enum.Enum):
    """L4 protocols a Service port may use (v1 ServicePort.protocol)."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        """IANA protocol number, as in the IP header."""
        return _PROTOCOL_NUMBERS[self._value_]


_PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
# The members by their API spelling, and those spellings: what parsers look a field's value up in.
PROTOCOLS = {p.value: p for p in Protocol}
PROTOCOL_NAMES = tuple(PROTOCOLS)


class Scope(enum.IntEnum):
    """Which side of the node a packet came from (bpf/include/abi.h LB_SCOPE_*).

    A Service with a Local traffic policy has different backend sets for traffic
    from pods on this node (internalTrafficPolicy) and traffic from outside
    (externalTrafficPolicy), so each address:port can have one frontend per scope.
    """

    EXTERNAL = 0
    INTERNAL = 1


class Algorithm(str, enum.Enum):
    """How a new flow picks a backend."""

    MAGLEV = "maglev"   # consistent hash of the 5-tuple over the Maglev table
    RANDOM = "random"   # a random slot of the same table (kube-proxy's iptables behaviour)


class FrontendKind(str, enum.Enum):
    """Where a frontend address comes from in the Service object."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


class ServicePortName(NamedTuple):
    """One port of one Service: the unit that owns a backend set (kube-proxy's ServicePortName).

    A NamedTuple, as FrontendKey: both are keys of every map of the control plane, and a
    tuple's hash and comparisons run in C (a frozen dataclass builds a tuple in Python for each)."""

    namespace: str
    name: str
    port: str = ""          # the ServicePort's name; "" for a single unnamed port
    protocol: Protocol = Protocol.TCP

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


class _BackendFields(NamedTuple):
    address: IPAddress
    port: int
    protocol: Protocol = Protocol.TCP
    terminating: bool = False
    not_ready: bool = False
    local: bool = False     # the endpoint runs on this node
    node: str = ""          # endpoint nodeName, for display
    zone: str = ""
    name: str = ""          # backend_name(address, port, protocol): made with the Backend


class DerivedLast:
    """For a NamedTuple whose last field is derived from the others, which its __new__ takes
    (Backend.name, the endpoints' address text): copy and pickle pass the others to __new__, and
    _replace makes the field again, so it always says what it is derived from."""

    __slots__ = ()

    def __getnewargs__(self) -> tuple:
        return tuple(self)[:-1]

    def _replace(self, **changes):
        derived = self._fields[-1]
        if derived in changes:
            raise ValueError(f"{type(self).__name__}.{derived} is derived from the other fields")
        made = type(self)(*[changes.pop(f, v) for f, v in zip(self._fields[:-1], self)])
        if changes:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}")
        return made


class Backend(DerivedLast, _BackendFields):
    """One endpoint address with its resolved target port.

    `terminating` backends (serving but terminating endpoints) keep their
    established flows but get no new ones unless no other backend is left
    (kube-proxy's terminating fallback). `not_ready` backends (endpoints whose
    readiness fails, or terminating and no longer serving) never get new flows;
    they are listed only so that their established TCP connections carry on, as
    kube-proxy leaves their conntrack entries alone (UDP flows move on). The
    writer builds the Maglev table from `table_backends` and keeps every backend
    in the backends map.

    A NamedTuple, as the endpoints it is made from (made, hashed and compared in C, no
    __dict__).  Its last field, `name`, is derived: Backend(...) takes the others and makes it
    (backend_name), and _replace makes it again, so it always says the address, port and protocol.
    """

    __slots__ = ()

    def __new__(cls, address: IPAddress, port: int, protocol: Protocol = Protocol.TCP, terminating: bool = False,
                not_ready: bool = False, local: bool = False, node: str = "", zone: str = "") -> "Backend":
        return tuple.__new__(cls, (address, port, protocol, terminating, not_ready, local, node, zone,
                                   backend_name(address, port, protocol)))


def backend_name(address: IPAddress, port: int, protocol: Protocol) -> str:
    """The stable name Maglev sorts and hashes a backend by, so every node builds the same table:
    ADDRESS:PORT/PROTO, the dotted quad by inet_ntoa (as str(IPv4Address) writes it, in C), an
    IPv6 address bracketed as in a URL: [2001:2::1]:80/TCP."""
    if address.version == 4:
        return f"{socket.inet_ntoa(address.packed)}:{port}/{protocol._value_}"
    return f"[{address}]:{port}/{protocol._value_}"


def backend_names(texts: Sequence[str], ports: Sequence[int], protocol: Protocol, family: int) -> list[str]:
    """backend_name() of each (address, port) of one family and one protocol, from the addresses as
    str() writes them (the endpoints carry that text: Endpoint.text), in a comprehension: desired
    state names every backend of a full sync."""
    proto = protocol._value_
    if family == 6:
        return [f"[{t}]:{p}/{proto}" for t, p in zip(texts, ports)]
    if ports and ports.count(ports[0]) == len(ports):       # one port number (one slice's): one suffix
        suffix = f":{ports[0]}/{proto}"
        return [t + suffix for t in texts]
    return [f"{t}:{p}/{proto}" for t, p in zip(texts, ports)]


def table_backends(backends: Iterable[Backend]) -> list[Backend]:
    """The backends new flows may reach, which a frontend's Maglev table is built from: the
    ready ones, or the serving-but-terminating ones when none is ready (KEP-1669's fallback);
    never the not-ready ones.  In name order."""
    rows = backend_rows(backends)
    return [rows[i] for i in rows.table_rows()]


# A backend's state in BackendRows.flags, one bit each (Backend.terminating, not_ready, local).
TERMINATING, NOT_READY, LOCAL = 1, 2, 4


class BackendRows(Sequence):
    """A frontend's backends, as columns in name order (the order Maglev sorts them in).

    What desired state hands on for every frontend: admission counts the names, the writer takes
    the names, map keys and flags, and none of them needs a Backend object per endpoint (a full
    sync has 100,000).  It is still a sequence of Backend: indexing or iterating makes them, one
    at a time, for whoever wants objects (inspection, tests, the general paths), and it equals the
    tuple of those Backends, with the same hash.

    Columns: names (unique, sorted), addresses, ports, protocols, flags (TERMINATING | NOT_READY
    | LOCAL), nodes, zones; `family` is the IP version of every address, 0 if empty or mixed.
    Immutable as the model's other types are: nothing changes a column once the rows are made."""

    __slots__ = ("names", "addresses", "ports", "protocols", "flags", "nodes", "zones", "family")

    def __init__(self, names: tuple, addresses: tuple, ports: tuple, protocols: tuple, flags: tuple,
                 nodes: tuple, zones: tuple, family: int):
        self.names, self.addresses, self.ports, self.protocols = names, addresses, ports, protocols
        self.flags, self.nodes, self.zones, self.family = flags, nodes, zones, family

    @classmethod
    def of(cls, backends: Iterable[Backend]) -> "BackendRows":
        """Rows of any Backends, sorted by name; one row per name.  A repeated name keeps its first
        copy's node and zone; it is terminating or local if any copy is, and not ready only if
        every copy is (as the writer merges a backend listed by several frontends)."""
        by_name: dict[str, list] = {}
        for b in backends:
            flags = (TERMINATING if b.terminating else 0) | (NOT_READY if b.not_ready else 0) | (LOCAL if b.local else 0)
            row = by_name.get(b.name)
            if row is None:
                by_name[b.name] = [b.name, b.address, b.port, b.protocol, flags, b.node, b.zone]
            else:
                row[4] = (row[4] | flags) & ~NOT_READY | (row[4] & flags & NOT_READY)
        if not by_name:
            return _NO_BACKENDS
        columns = tuple(zip(*sorted(by_name.values())))
        versions = {a.version for a in columns[1]}
        return cls(*columns, versions.pop() if len(versions) == 1 else 0)

    @property
    def plain(self) -> bool:
        """No backend terminating or not ready: the Maglev table is built from all of them."""
        flags = self.flags
        return flags.count(0) + flags.count(LOCAL) == len(flags)      # (counted in C)

    def table_rows(self) -> list[int]:
        """The indices of table_backends(): not the not-ready, and not the terminating unless
        nothing else is left."""
        flags = self.flags
        if self.plain:
            return list(range(len(flags)))
        usable = [i for i, f in enumerate(flags) if not f & NOT_READY]
        return [i for i in usable if not flags[i] & TERMINATING] or usable

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self)[i]
        f = self.flags[i]
        return Backend(self.addresses[i], self.ports[i], self.protocols[i], bool(f & TERMINATING),
                       bool(f & NOT_READY), bool(f & LOCAL), self.nodes[i], self.zones[i])

    def __iter__(self):
        for i in range(len(self.names)):
            yield self[i]

    def __eq__(self, other) -> bool:
        if type(other) is BackendRows:
            # A name says the address, port and protocol: the other columns need no comparing.
            return (self.names == other.names and self.flags == other.flags and self.nodes == other.nodes
                    and self.zones == other.zones)
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))        # as the equal tuple's

    def __reduce__(self):
        return BackendRows, (self.names, self.addresses, self.ports, self.protocols, self.flags, self.nodes,
                             self.zones, self.family)

    def __repr__(self) -> str:
        return f"BackendRows({tuple(self)!r})"


_NO_BACKENDS = BackendRows((), (), (), (), (), (), (), 0)


def backend_rows(backends: Iterable[Backend]) -> BackendRows:
    """`backends` as BackendRows: themselves if they are, else BackendRows.of them."""
    return backends if type(backends) is BackendRows else BackendRows.of(backends)


class FrontendKey(NamedTuple):
    """What a packet's destination is matched against (struct lb4_key, or lb6_key for IPv6)."""

    address: IPAddress
    port: int
    protocol: Protocol = Protocol.TCP
    scope: Scope = Scope.INTERNAL


class Frontend(NamedTuple):
    """A frontend and everything the datapath needs to serve it (struct lb4_service)."""

    key: FrontendKey
    service: ServicePortName
    kind: FrontendKind = FrontendKind.CLUSTER_IP
    backends: Sequence[Backend] = ()         # BackendRows from desired state (or a tuple); empty = reject new flows
    algorithm: Algorithm = Algorithm.MAGLEV
    affinity_timeout: int = 0                # seconds; 0 = sessionAffinity None
    local_only: bool = False                 # traffic policy Local with endpoints elsewhere: drop, don't reject, when empty
    source_ranges: tuple[IPNetwork, ...] = ()  # loadBalancerSourceRanges; () = all
    app_protocol: str = ""                   # carried through for display


@dataclass(frozen=True)
class LBState:
    """Every frontend this node serves. The writer makes the maps equal to this."""

    frontends: dict[FrontendKey, Frontend] = field(default_factory=dict)

    def __hash__(self) -> int:  # dict field: hash by content, for caching
        return hash(frozenset(self.frontends.items()))

    @classmethod
    def of(cls, frontends) -> "LBState":
        """Build a state from an iterable of Frontend; a repeated key is a bug upstream."""
        out: dict[FrontendKey, Frontend] = {}
        for fe in frontends:
            if fe.key in out:
                raise ValueError(f"duplicate frontend {fe.key} ({fe.service} and {out[fe.key].service})")
            out[fe.key] = fe
        return cls(out)
