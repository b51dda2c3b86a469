"""v1 Service -> a validated, frozen Service holding only what the data plane uses.

Fields the data plane ignores (resourceVersion, selector contents, most
annotations) are left out on purpose: two versions of a Service that differ
only there compare equal, so the change tracker drops the update.

Things the API server would allocate (clusterIP, nodePort) must be present:
here they can only be missing because a manifest left them out, and guessing
one would program an address nobody asked for.

Dual-stack (KEP-563) is read as the API server validates it: `ipFamilyPolicy`
(SingleStack by default; PreferDualStack; RequireDualStack), `ipFamilies` and
`clusterIPs` (at most one per family, clusterIPs[0] == clusterIP, clusterIPs[i] of
family ipFamilies[i]).  The node's families (NodeConfig.ip_families, the agent's
--ip-families) stand for the cluster's: a clusterIP of another family, or
RequireDualStack on a single-stack node, is refused as the API server of such a
cluster would refuse it.  externalIPs, load balancer ingress and source ranges
of either family are kept; ebpfsvc/desired.py serves each with the clusterIP of
its family.
"""

from __future__ import annotations

import enum
from dataclasses import MISSING, dataclass, fields
from typing import NamedTuple

from ebpfsvc.config import IP_FAMILIES, NodeConfig, family_name
from ebpfsvc.k8s.fields import (Fields, Invalid, ObjectMeta, check_int, ip_address, parse_cidr, parse_ip, plain_meta,
                                read_meta)
from ebpfsvc.k8s.names import name_problem
from ebpfsvc.lbmodel import PROTOCOL_NAMES, PROTOCOLS, Algorithm, IPAddress, IPNetwork, Protocol

MAX_PORTS = 100                 # far above any real Service; a bigger list is a generator gone wrong
MAX_EXTERNAL_IPS = 100
MAX_SOURCE_RANGES = 1000
DEFAULT_AFFINITY_TIMEOUT = 10800  # v1.DefaultClientIPServiceAffinitySeconds (3 hours)
MAX_AFFINITY_TIMEOUT = 86400      # v1.MaxClientIPServiceAffinitySeconds (1 day)

LABEL_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
ANNOTATION_TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_HINTS = "service.kubernetes.io/topology-aware-hints"   # before Kubernetes 1.27
ANNOTATION_SOURCE_RANGES = "service.beta.kubernetes.io/load-balancer-source-ranges"
ANNOTATION_ALGORITHM = "ebpfsvc.io/lb-algorithm"
# Opt-in: loadBalancerSourceRanges also guard the Service's externalIPs. kube-proxy applies them to
# load balancer addresses only; an operator exposing a Service on externalIPs may want the same fence.
ANNOTATION_EXTERNAL_IP_SOURCE_RANGES = "ebpfsvc.io/external-ips-source-ranges"


class ServiceType(str, enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(str, enum.Enum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class IPFamilyPolicy(str, enum.Enum):
    SINGLE_STACK = "SingleStack"
    PREFER_DUAL_STACK = "PreferDualStack"     # both families where the cluster has both
    REQUIRE_DUAL_STACK = "RequireDualStack"   # both families, or the Service is refused


class ServicePort(NamedTuple):
    name: str                       # "" for a single unnamed port
    protocol: Protocol
    port: int
    target_port: int | str          # a number, or the name of a container port (resolved by EndpointSlices)
    node_port: int = 0              # 0 = none
    app_protocol: str = ""


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ip: IPAddress | None = None               # clusterIPs[0], the primary family; None: headless, ExternalName
    headless: bool = False                            # clusterIP: None
    ports: tuple[ServicePort, ...] = ()
    has_selector: bool = False
    external_ips: tuple[IPAddress, ...] = ()          # either family: served with the clusterIP of theirs
    load_balancer_ips: tuple[IPAddress, ...] = ()     # status.loadBalancer.ingress[].ip (ipMode VIP)
    source_ranges: tuple[IPNetwork, ...] = ()
    affinity_timeout: int = 0                         # seconds of ClientIP affinity; 0 = sessionAffinity None
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    publish_not_ready_addresses: bool = False
    # topology-mode: Auto (or the older hints annotation, or trafficDistribution PreferClose): what
    # the Service asks of the EndpointSlice controller. Routing follows the hints the slices carry,
    # as kube-proxy's does, not this (k8s/topology.py).
    topology_aware: bool = False
    algorithm: Algorithm | None = None                # None = the node's default
    external_ip_source_ranges: bool = False           # ANNOTATION_EXTERNAL_IP_SOURCE_RANGES: "true"
    proxy_name: str | None = None                     # value of service.kubernetes.io/service-proxy-name; None: no label
    headless_label: bool = False                      # service.kubernetes.io/headless present
    health_check_node_port: int = 0                   # LoadBalancer + externalTrafficPolicy Local; 0 = none
    created: str = ""                                 # metadata.creationTimestamp (UTC, sortable); "" = absent
    # spec.clusterIPs: one per family, primary first (() with cluster_ip set: just that one).
    cluster_ips: tuple[IPAddress, ...] = ()
    ip_family_policy: IPFamilyPolicy = IPFamilyPolicy.SINGLE_STACK

    def __post_init__(self) -> None:
        if not self.cluster_ips and self.cluster_ip is not None:
            object.__setattr__(self, "cluster_ips", (self.cluster_ip,))

    @property
    def ip_families(self) -> tuple[str, ...]:
        """spec.ipFamilies as allocated: the families of the clusterIPs, primary first."""
        return tuple(family_name(a.version) for a in self.cluster_ips)

    @property
    def seniority(self) -> tuple[str, str, str]:
        """Sort key of "oldest first": creationTimestamp, then namespace/name.  Two Services claiming
        one frontend, or competing for the last room in the maps, are decided by it, the same way on
        every node (objects without a timestamp, from a manifest directory, go by name)."""
        return (self.created, self.namespace, self.name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def skip_reason(self, node: NodeConfig) -> str:
        """Why this node programs nothing for the Service ("" = it does), like kube-proxy's ShouldSkipService."""
        if self.type is ServiceType.EXTERNAL_NAME:
            return "ExternalName (DNS only)"
        if self.headless or self.headless_label:
            return "headless"
        # kube-proxy watches only Services WITHOUT the label (selection.DoesNotExist), so a label with
        # an empty value is another proxy's too; --proxy-name NAME serves the label's value NAME.
        if self.proxy_name != (node.proxy_name or None):
            ours = f"--proxy-name {node.proxy_name!r}" if node.proxy_name else "unlabelled Services only"
            label = "no service-proxy-name label" if self.proxy_name is None else \
                f"service-proxy-name {self.proxy_name!r}"
            return f"{label}: not ours ({ours})"
        if not self.cluster_ips:
            return "no clusterIP"
        return ""


# Each enum's members by value, and the values a field may take: looked up per Service and port,
# not rebuilt (a full sync reads 10,000 Services).
_SERVICE_TYPES = {t.value: t for t in ServiceType}
_SERVICE_TYPE_NAMES = tuple(_SERVICE_TYPES)
_IP_FAMILY_POLICY_NAMES = tuple(p.value for p in IPFamilyPolicy)


def parse_service(obj: dict, config: NodeConfig) -> Service:
    """Validate a v1 Service; raises Invalid naming the first bad field."""
    svc = _plain_service(obj, config)
    return svc if svc is not None else _read_service(obj, config)


def _read_service(obj: dict, config: NodeConfig) -> Service:
    """parse_service through the field readers: every field read by path, the bad one named."""
    top, meta = read_meta(obj, "Service", ("v1",), name_rule="dns1035-label")
    spec = top.obj("spec")
    svc_type = _SERVICE_TYPES[spec.str("type", "ClusterIP", _SERVICE_TYPE_NAMES)]
    cluster_ips, policy, headless = _cluster_ips(spec, svc_type, config)
    ports = _ports(spec, svc_type, config)
    if not ports and not headless and svc_type is not ServiceType.EXTERNAL_NAME:
        raise Invalid("spec.ports", "is required: a Service with a clusterIP needs at least one port")
    lb_ips = _load_balancer_ips(top) if svc_type is ServiceType.LOAD_BALANCER else ()
    external_policy = _policy(spec, "externalTrafficPolicy")
    return Service(
        namespace=meta.namespace,
        name=meta.name,
        type=svc_type,
        cluster_ip=cluster_ips[0] if cluster_ips else None,
        cluster_ips=cluster_ips,
        ip_family_policy=policy,
        headless=headless,
        ports=ports,
        has_selector=bool(spec.string_map("selector")),
        external_ips=_external_ips(spec),
        load_balancer_ips=lb_ips,
        source_ranges=_source_ranges(spec, meta, config.legacy_source_ranges),
        affinity_timeout=_affinity_timeout(spec),
        external_traffic_policy=external_policy,
        internal_traffic_policy=_policy(spec, "internalTrafficPolicy"),
        publish_not_ready_addresses=spec.bool("publishNotReadyAddresses", False),
        topology_aware=_topology_aware(spec, meta),
        algorithm=_algorithm(meta),
        external_ip_source_ranges=_opt_in(meta, ANNOTATION_EXTERNAL_IP_SOURCE_RANGES),
        proxy_name=meta.labels.get(LABEL_PROXY_NAME),
        headless_label=LABEL_HEADLESS in meta.labels,
        health_check_node_port=_health_check_node_port(spec, svc_type, external_policy),
        created=meta.created,
    )


# What the plain path reads, and how (_plain_service).  Annotations the field readers interpret,
# and spec fields it leaves to them, send a Service their way when present.
_PLAIN_TYPES = {None: ServiceType.CLUSTER_IP, **{t.value: t for t in (ServiceType.CLUSTER_IP, ServiceType.NODE_PORT)}}
_PLAIN_POLICIES = {None: TrafficPolicy.CLUSTER, **{p.value: p for p in TrafficPolicy}}     # what _policy takes
_READ_ANNOTATIONS = frozenset({ANNOTATION_TOPOLOGY_MODE, ANNOTATION_TOPOLOGY_HINTS, ANNOTATION_SOURCE_RANGES,
                               ANNOTATION_ALGORITHM, ANNOTATION_EXTERNAL_IP_SOURCE_RANGES})
_STR_ONLY = frozenset({str})


def _plain_service(obj, config: NodeConfig) -> Service | None:
    """_read_service's result for a Service of the usual shape, or None for anything else, which
    _read_service then reads (or rejects, naming the field): this only decides what it would decide.

    The usual shape: type ClusterIP or NodePort; one clusterIP of a family of the cluster (clusterIPs,
    ipFamilies and ipFamilyPolicy absent or saying the same, SingleStack); ports of the API's types;
    sessionAffinity None; no externalIPs, source ranges, trafficDistribution or annotation that
    ebpfsvc reads.  A full sync reads 10,000 Services: this costs about a third of the field readers
    (tests/unit/test_bulk_paths.py compares the two)."""
    head = plain_meta(obj, "Service", "v1", "dns1035-label")
    spec = obj.get("spec") if head is not None else None
    if type(spec) is not dict or not _READ_ANNOTATIONS.isdisjoint(head.annotations):
        return None
    namespace, name, labels, _, created = head

    get = spec.get
    svc_type, external, internal = get("type"), get("externalTrafficPolicy"), get("internalTrafficPolicy")
    # (A str, or absent: anything else, e.g. a list, is the field readers' to name.)
    svc_type = _PLAIN_TYPES.get(svc_type) if svc_type is None or type(svc_type) is str else None
    external = _PLAIN_POLICIES.get(external) if external is None or type(external) is str else None
    internal = _PLAIN_POLICIES.get(internal) if internal is None or type(internal) is str else None
    publish = get("publishNotReadyAddresses")
    publish = False if publish is None else publish
    selector = get("selector")
    selector = {} if selector is None else selector     # absent is empty, as string_map reads it
    external_ips, source_ranges = get("externalIPs"), get("loadBalancerSourceRanges")
    if (svc_type is None or external is None or internal is None or type(publish) is not bool
            or get("sessionAffinity") not in (None, "None") or type(selector) is not dict
            or (selector and not _STR_ONLY.issuperset(map(type, selector.values())))
            or (external_ips is not None and external_ips != [])
            or (source_ranges is not None and source_ranges != [])
            or get("trafficDistribution") is not None):
        return None

    address = _plain_cluster_ip(spec, config)
    ports = _plain_ports(spec.get("ports"), svc_type, config) if address is not None else None
    if ports is None:
        return None
    return _plain(namespace=namespace, name=name, type=svc_type, cluster_ip=address, cluster_ips=(address,),
                  ports=ports, has_selector=bool(selector), external_traffic_policy=external,
                  internal_traffic_policy=internal, publish_not_ready_addresses=publish,
                  proxy_name=labels.get(LABEL_PROXY_NAME), headless_label=LABEL_HEADLESS in labels,
                  created=created)


_DEFAULTS = {f.name: f.default for f in fields(Service) if f.default is not MISSING}     # (none a factory)


def _plain(**values) -> Service:
    """Service(**values), made as its fields at once: a frozen dataclass's __init__ sets each of
    the 23 through object.__setattr__ (1.6 µs a Service, 0.4 this way; a full sync makes 10,000).
    For the plain path only, which gives cluster_ips (all __post_init__ would derive)."""
    made = object.__new__(Service)
    made.__dict__.update(_DEFAULTS, **values)
    return made


def _plain_cluster_ip(spec: dict, config: NodeConfig) -> IPAddress | None:
    """The one clusterIP of a single-stack Service, when _cluster_ips would take it as it is."""
    primary, ips, families = spec.get("clusterIP"), spec.get("clusterIPs"), spec.get("ipFamilies")
    if (type(primary) is not str or primary == "None" or spec.get("ipFamilyPolicy") not in (None, "SingleStack")
            or not (ips is None or ips == [] or ips == [primary])
            or not (families is None or families == [] or (type(families) is list and len(families) == 1))):
        return None
    try:
        address = ip_address(primary)       # (one with spaces to strip is _cluster_ips' to read)
    except ValueError:
        return None
    family = family_name(address.version)
    if ((families and families[0] != family) or family not in config.ip_families
            or (address.version == 4 and config.service_cidr is not None and address not in config.service_cidr)
            or not _assignable(address)):
        return None
    return address


def _plain_ports(items, svc_type: ServiceType, config: NodeConfig) -> tuple[ServicePort, ...] | None:
    """_ports' result for ports of the API's types, each valid, names and port/protocol distinct."""
    if type(items) is not list or not 0 < len(items) <= MAX_PORTS:
        return None
    lo, hi = config.nodeport_range
    ports, names, seen = [], set(), set()
    for p in items:
        if type(p) is not dict:
            return None
        name, protocol, port = p.get("name"), p.get("protocol"), p.get("port")
        target, node_port, app = p.get("targetPort"), p.get("nodePort"), p.get("appProtocol")
        name = "" if name is None else name
        protocol = Protocol.TCP if protocol is None else PROTOCOLS.get(protocol) if type(protocol) is str else None
        app = "" if app is None else app
        if (type(name) is not str or (name and name_problem(name, "dns1123-label")) or (not name and len(items) > 1)
                or name in names or protocol is None or type(port) is not int or not 0 < port <= 65535
                or (port, protocol) in seen or type(app) is not str):
            return None
        if target is None or target == 0:
            target = port
        elif type(target) is int:
            if not 0 < target <= 65535:
                return None
        elif type(target) is not str or not target or len(target) > 15 or target.isdigit():
            return None
        if svc_type is ServiceType.CLUSTER_IP:
            if node_port is not None:
                return None
            node_port = 0
        elif type(node_port) is not int or not lo <= node_port <= hi:
            return None
        names.add(name)
        seen.add((port, protocol))
        ports.append(ServicePort(name, protocol, port, target, node_port, app))
    return tuple(ports)


def _cluster_ips(spec: Fields, svc_type: ServiceType, config: NodeConfig
                 ) -> tuple[tuple[IPAddress, ...], IPFamilyPolicy, bool]:
    """(clusterIPs, ipFamilyPolicy, headless), validated as the API server validates them (module docstring)."""
    policy_text = spec.str("ipFamilyPolicy", "", _IP_FAMILY_POLICY_NAMES)
    families = spec.list("ipFamilies", 2)
    for i, (path, value) in enumerate(families):
        if value not in IP_FAMILIES:
            raise Invalid(path, f"{value!r} is not one of {', '.join(IP_FAMILIES)}")
        if any(value == other for _, other in families[:i]):
            raise Invalid(path, f"{value} appears twice: at most one of each family")
    if svc_type is ServiceType.EXTERNAL_NAME:
        if not spec.str("externalName"):
            raise Invalid("spec.externalName", "is required for type ExternalName")
        return (), IPFamilyPolicy.SINGLE_STACK, False
    primary = spec.str("clusterIP")
    ips = spec.list("clusterIPs", 2)
    if primary and ips and ips[0][1] != primary:
        raise Invalid(ips[0][0], f"{ips[0][1]} must equal spec.clusterIP {primary}")
    if primary:     # clusterIPs[0] is spec.clusterIP: named as before dual-stack, when both are set
        ips = [("spec.clusterIP", primary), *ips[1:]]
    if not ips:
        raise Invalid("spec.clusterIP", "is required (the API server allocates it; a manifest must set it, "
                      "or None for a headless Service)")
    # Without a policy, the API server defaults SingleStack, or RequireDualStack for two clusterIPs.
    policy = IPFamilyPolicy(policy_text) if policy_text else (
        IPFamilyPolicy.REQUIRE_DUAL_STACK if len(ips) == 2 or len(families) == 2 else IPFamilyPolicy.SINGLE_STACK)
    if ips[0][1] == "None":
        if len(ips) > 1:
            raise Invalid(ips[1][0], "must not be set: a headless Service (clusterIP None) has no other clusterIP")
        return (), policy, True     # headless: no frontend, so no family to check
    if policy is IPFamilyPolicy.SINGLE_STACK and (len(ips) == 2 or len(families) == 2):
        what = "clusterIPs" if len(ips) == 2 else "ipFamilies"
        raise Invalid("spec.ipFamilyPolicy", f"SingleStack, but spec.{what} has two; "
                      f"use PreferDualStack or RequireDualStack")
    if policy is IPFamilyPolicy.REQUIRE_DUAL_STACK and len(config.ip_families) < 2:
        raise Invalid("spec.ipFamilyPolicy", f"RequireDualStack, but this cluster serves "
                      f"{config.ip_families[0]} only (--ip-families)")
    if policy is IPFamilyPolicy.REQUIRE_DUAL_STACK and len(ips) < 2:
        raise Invalid("spec.clusterIPs", "RequireDualStack needs a clusterIP of each family (the API server "
                      "allocates them; a manifest must set both)")
    if families and families[0][1] not in config.ip_families:
        raise Invalid(families[0][0], f"{families[0][1]} is not a family of this cluster "
                      f"({','.join(config.ip_families)}: --ip-families)")
    out: list[IPAddress] = []
    for i, (path, value) in enumerate(ips):
        addr = parse_ip(value, path)
        family = family_name(addr.version)
        if any(a.version == addr.version for a in out):
            raise Invalid(path, f"{addr} is of the same family as spec.clusterIPs[0] ({family}): "
                          f"at most one clusterIP per family")
        if i < len(families) and families[i][1] != family:
            raise Invalid(path, f"{addr} is {family}, but {families[i][0]} is {families[i][1]}")
        if family not in config.ip_families:
            raise Invalid(path, f"{addr} is an {family} clusterIP, but this cluster serves "
                          f"{','.join(config.ip_families)} only (--ip-families)")
        if addr.version == 4 and config.service_cidr is not None and addr not in config.service_cidr:
            raise Invalid(path, f"{addr} is outside the service CIDR {config.service_cidr}")
        if not _assignable(addr):
            raise Invalid(path, f"{addr} cannot be a clusterIP (loopback, link-local, multicast or reserved)")
        out.append(addr)
    return tuple(out), policy, False


def _assignable(addr) -> bool:
    """An address the API server could allocate from some service CIDR: a unicast one a packet
    can carry to another host (kube-apiserver refuses these ranges for ServiceCIDRs)."""
    return not (addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved)


def _ports(spec: Fields, svc_type: ServiceType, config: NodeConfig) -> tuple[ServicePort, ...]:
    ports = []
    seen: dict[tuple[int, Protocol], str] = {}
    names: dict[str, str] = {}
    items = list(spec.objects("ports", MAX_PORTS))
    for p in items:
        name = p.name("name", "dns1123-label")
        protocol = PROTOCOLS[p.str("protocol", "TCP", PROTOCOL_NAMES)]
        port = p.int("port", 1, 65535)
        if port is None:
            raise Invalid(f"{p.path}.port", "is required")
        if len(items) > 1 and not name:
            raise Invalid(f"{p.path}.name", "is required when a Service has more than one port")
        if name in names:
            raise Invalid(f"{p.path}.name", f"{name!r} duplicates {names[name]}")
        if (port, protocol) in seen:
            raise Invalid(p.path, f"port {port}/{protocol.value} duplicates {seen[port, protocol]}")
        names[name] = seen[port, protocol] = p.path
        node_port = _node_port(p, svc_type, config)
        ports.append(ServicePort(name, protocol, port, _target_port(p, port), node_port, p.str("appProtocol")))
    return tuple(ports)


def _target_port(p: Fields, port: int) -> int | str:
    value = p.raw("targetPort")
    if value is None or value == 0:
        return port                      # the API defaults targetPort to port
    if isinstance(value, str):
        if value.isdigit():              # IntOrString "8080" from YAML quoting is still a number
            return check_int(int(value), f"{p.path}.targetPort", 1, 65535)
        if not value or len(value) > 15:
            raise Invalid(f"{p.path}.targetPort", f"{value!r} is not a valid port name (1-15 characters)")
        return value
    return check_int(value, f"{p.path}.targetPort", 1, 65535)


def _node_port(p: Fields, svc_type: ServiceType, config: NodeConfig) -> int:
    lo, hi = config.nodeport_range
    if svc_type not in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
        if p.has("nodePort"):
            raise Invalid(f"{p.path}.nodePort", "is only allowed for type NodePort or LoadBalancer")
        return 0
    node_port = p.int("nodePort", lo, hi)
    if node_port is None:
        if svc_type is ServiceType.NODE_PORT:
            raise Invalid(f"{p.path}.nodePort", "is required for type NodePort (the API server allocates it; "
                          "a manifest must set it)")
        return 0                         # LoadBalancer with allocateLoadBalancerNodePorts: false
    return node_port


def _health_check_node_port(spec: Fields, svc_type: ServiceType, policy: TrafficPolicy) -> int:
    # The API server allocates one only for a LoadBalancer Service that keeps traffic on local
    # endpoints (and drops it when the Service stops being one): elsewhere a leftover is not served.
    if svc_type is not ServiceType.LOAD_BALANCER or policy is not TrafficPolicy.LOCAL:
        return 0
    return spec.int("healthCheckNodePort", 1, 65535, 0)


def _external_ips(spec: Fields) -> tuple[IPAddress, ...]:
    out = []
    for path, value in spec.list("externalIPs", MAX_EXTERNAL_IPS):
        addr = parse_ip(value, path)
        if addr not in out:
            out.append(addr)
    return tuple(out)


def _load_balancer_ips(top: Fields) -> tuple[IPAddress, ...]:
    out = []
    for ing in top.obj("status").obj("loadBalancer").objects("ingress", MAX_EXTERNAL_IPS):
        if not ing.str("ip"):
            continue                     # hostname-only ingress: the cloud LB is reached by name, nothing to program
        addr = parse_ip(ing.str("ip"), f"{ing.path}.ip")
        # ipMode Proxy: the load balancer rewrites the destination to the node itself, so
        # kube-proxy must not capture the LB IP (KEP-1860).
        if ing.str("ipMode", "VIP", ("VIP", "Proxy")) == "VIP" and addr not in out:
            out.append(addr)
    return tuple(out)


def _source_ranges(spec: Fields, meta: ObjectMeta, legacy: bool) -> tuple[IPNetwork, ...]:
    items = spec.list("loadBalancerSourceRanges", MAX_SOURCE_RANGES)
    if legacy and not items and meta.annotations.get(ANNOTATION_SOURCE_RANGES, "").strip():
        # The older annotation counts only when the field is empty (as in the API's validation).
        field = f"metadata.annotations[{ANNOTATION_SOURCE_RANGES}]"
        items = [(field, part) for part in meta.annotations[ANNOTATION_SOURCE_RANGES].split(",")]
    nets = []
    for path, value in items:
        net = parse_cidr(value, path)
        if net not in nets:
            nets.append(net)
    return tuple(nets)


def _affinity_timeout(spec: Fields) -> int:
    if spec.str("sessionAffinity", "None", ("None", "ClientIP")) == "None":
        return 0
    client_ip = spec.obj("sessionAffinityConfig").obj("clientIP")
    return client_ip.int("timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT, DEFAULT_AFFINITY_TIMEOUT)


def _policy(spec: Fields, field: str) -> TrafficPolicy:
    # "Local"/"Cluster"; the pre-1.14 spellings OnlyLocal/Global were removed from the API.
    return TrafficPolicy(spec.str(field, "Cluster", ("Cluster", "Local")))


def _topology_aware(spec: Fields, meta: ObjectMeta) -> bool:
    # As kube-proxy: topology-mode, else the older annotation when it is empty; only Auto/auto turns
    # hints on ("Disabled" and anything else leave them off).  spec.trafficDistribution: PreferClose
    # (Kubernetes 1.31+) asks for the same zone-hint routing.
    mode = meta.annotations.get(ANNOTATION_TOPOLOGY_MODE) or meta.annotations.get(ANNOTATION_TOPOLOGY_HINTS, "")
    return mode in ("Auto", "auto") or spec.str("trafficDistribution") == "PreferClose"


def _opt_in(meta: ObjectMeta, annotation: str) -> bool:
    value = meta.annotations.get(annotation)
    if value is None:
        return False
    if value.strip().lower() not in ("true", "false"):
        raise Invalid(f"metadata.annotations[{annotation}]", f"{value!r} is not \"true\" or \"false\"")
    return value.strip().lower() == "true"


def _algorithm(meta: ObjectMeta) -> Algorithm | None:
    value = meta.annotations.get(ANNOTATION_ALGORITHM)
    if value is None:
        return None
    try:
        return Algorithm(value.strip().lower())
    except ValueError:
        choices = "|".join(a.value for a in Algorithm)
        raise Invalid(f"metadata.annotations[{ANNOTATION_ALGORITHM}]", f"{value!r} is not one of {choices}") from None
