"""The agent's configuration, and the one home of its defaults.

AgentConfig is everything `ebpfsvc agent` is told (flags, --config file); NodeConfig the part
that describes this node and the cluster-wide limits Services are validated against.  The
defaults below are the agent's, and the inspection commands (`drift`, `why`, `service list`...)
take theirs from here too, so they cannot disagree with the agent they inspect.  Map sizes and
conntrack lifetimes are AgentConfig.limits (names of datapath/loader.Limits; their defaults are
bpf/include/abi.h's, the one place the datapath's limits are written).

NodeConfig is what this node is and the cluster-wide limits it validates Services against.

The counterpart of kube-proxy's command line: which addresses serve NodePorts
(--nodeport-addresses, already resolved to addresses: ebpfsvc/nodeinfo.py), the
node's zone for topology hints, the NodePort range and, optionally, a service
CIDR (the API server's --service-node-port-range and --service-cluster-ip-range,
which a manifest cannot be checked against otherwise), and which
service-proxy-name we answer to.  Like kube-proxy, the agent needs no service
CIDR: without one every valid clusterIP is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from ebpfsvc.lbmodel import Algorithm, IPAddress

DEFAULT_PIN_DIR = "/sys/fs/bpf/ebpfsvc"          # bpffs directory of the pinned maps (--pin-dir)
DEFAULT_NODEPORT_RANGE = (30000, 32767)          # the API server's --service-node-port-range default
# The IP families of the cluster's service CIDRs (the API server's --service-cluster-ip-range) that
# this node serves.  By default (--ip-families auto) the agent takes them from the cluster's
# ServiceCIDR objects (k8s/servicecidr.py), so a dual-stack cluster needs no flag; DEFAULT_IP_FAMILIES
# stands in while there is none (an API before Kubernetes 1.33, a manifest directory without any):
# IPv4 alone, as before dual-stack.  An explicit --ip-families overrides them.
IP_FAMILIES = ("IPv4", "IPv6")                   # v1 IPFamily values
DEFAULT_IP_FAMILIES = ("IPv4",)
AUTO_IP_FAMILIES = "auto"                        # --ip-families default: the ServiceCIDRs' families


def family_name(version: int) -> str:
    """4 -> "IPv4", 6 -> "IPv6": an address's version as the API names its family."""
    return f"IPv{version}"


def parse_ip_families(values) -> tuple[str, ...]:
    """"IPv4", "IPv6", "IPv4,IPv6" (or a list of them) -> the families in order, each once; ValueError else."""
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part not in IP_FAMILIES:
                raise ValueError(f"{part or value!r}: not an IP family (IPv4, IPv6, or IPv4,IPv6)")
            if part in out:
                raise ValueError(f"{part} is given twice")
            out.append(part)
    if not out:
        raise ValueError("needs at least one IP family (IPv4, IPv6)")
    return tuple(out)


def parse_port_range(text) -> tuple[int, int]:
    """"LOW-HIGH" (or a (low, high) pair) -> (low, high), 1 <= low <= high <= 65535; ValueError else."""
    if isinstance(text, tuple):
        lo, hi = text
    else:
        try:
            lo, hi = (int(x) for x in str(text).split("-"))
        except ValueError:
            raise ValueError(f"{text}: not LOW-HIGH (like {format_port_range(DEFAULT_NODEPORT_RANGE)})") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{text if not isinstance(text, tuple) else format_port_range(text)}: "
                         f"not a port range (1 <= LOW <= HIGH <= 65535)")
    return int(lo), int(hi)


def format_port_range(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1]}"


@dataclass(frozen=True)
class NodeConfig:
    node_name: str
    node_addresses: tuple[IPAddress, ...] = ()      # NodePort addresses (kube-proxy --nodeport-addresses result)
    zone: str = ""                                    # topology.kubernetes.io/zone; "" = take it from the Node object
    service_cidr: IPv4Network | None = None           # set: IPv4 clusterIPs outside it are refused
    # The families this node serves (DEFAULT_IP_FAMILIES): a clusterIP of another family is refused,
    # and externalIPs, LoadBalancer IPs and NodePort addresses of another family are not served.
    ip_families: tuple[str, ...] = DEFAULT_IP_FAMILIES
    nodeport_range: tuple[int, int] = DEFAULT_NODEPORT_RANGE
    proxy_name: str = ""     # service.kubernetes.io/service-proxy-name we answer to ("" = only unlabelled Services)
    default_algorithm: Algorithm = Algorithm.MAGLEV
    # service.beta.kubernetes.io/load-balancer-source-ranges enforced when the field is empty (as the
    # API's validation and cloud load balancers read it); False: ignored, as kube-proxy does.
    legacy_source_ranges: bool = True

    def __post_init__(self) -> None:
        # Accept strings and lists from callers (CLI, tests) but store the typed, hashable form.
        object.__setattr__(self, "node_addresses", tuple(ip_address(a) for a in self.node_addresses))
        try:
            object.__setattr__(self, "ip_families", parse_ip_families(self.ip_families))
        except ValueError as e:
            raise ValueError(f"ip_families {e}") from None
        if self.service_cidr is not None:
            object.__setattr__(self, "service_cidr", IPv4Network(self.service_cidr))
        object.__setattr__(self, "default_algorithm", Algorithm(self.default_algorithm))
        try:
            object.__setattr__(self, "nodeport_range", parse_port_range(self.nodeport_range))
        except ValueError as e:
            raise ValueError(f"nodeport_range {e}") from None


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig                          # node_addresses: --node-address (always NodePort addresses);
                                              # ip_families: --ip-families, or the ones to start with (auto)
    # --ip-families auto (the default): node.ip_families follow the families of the cluster's ServiceCIDRs
    # (DEFAULT_IP_FAMILIES while the API serves none) as they change; False: node.ip_families as given.
    ip_families_auto: bool = True
    pin_dir: str = DEFAULT_PIN_DIR
    manifests: str | None = None             # a manifest directory instead of the API server
    kubeconfig: str | None = None
    in_cluster: bool = False
    pod_interfaces: tuple[str, ...] = ("lxc*",)
    uplinks: tuple[str, ...] | None = ()      # None: the interfaces of the node addresses (nodeinfo.py)
    uplink_mode: str = "tc"                   # "tc" | "xdp": programs on the uplinks (datapath/uplink.py)
    nodeport_addresses: tuple[str, ...] = ()  # kube-proxy's: () = every node address, CIDRs, ("primary",)
    hairpin_address: IPv4Address | None = None   # None: the node's primary address
    hairpin_address6: IPv6Address | None = None  # None: the node's IPv6 primary address
    snat_keep_client_port: bool = True       # NodePort SNAT: a TCP client's port first (nodeport.h)
    host_clients: bool = True                # node-namespace clients to Services (datapath/hostpath.py)
    # An established TCP flow whose endpoint left its slice: reset (True) or left to go on, as
    # kube-proxy leaves its conntrack entry (bpf/lib/lb.h; docs/semantics.md "Kept on purpose").
    reset_removed_endpoint_tcp: bool = True
    # External traffic (externalTrafficPolicy Cluster) to a backend on this node: the client's address
    # kept (False) or masqueraded to the node, as kube-proxy (bpf/lib/nodeport.h; docs/semantics.md).
    masquerade_external_to_local_backends: bool = False
    # kube-proxy's --cluster-cidr (its default --detect-local-mode ClusterCIDR): sources in it reaching
    # an externalTrafficPolicy Local frontend on the uplink get the cluster-wide endpoints. None: none.
    cluster_cidr: IPv4Network | None = None
    socket_lb: bool = False                  # socket-level LB (datapath/socklb.py) on socket_lb_cgroup
    socket_lb_cgroup: str | None = None      # where; with socket_lb off, a previous run's programs are detached
    program_cache: bool = True               # compiled programs reused across starts (datapath/progcache.py)
    min_sync_interval: float = 0.05          # kube-proxy --iptables-min-sync-period, scaled to maps
    sync_period: float = 30.0                # periodic resync (interfaces re-read; full apply hourly: agent.py)
    # Map sizes and conntrack lifetimes: datapath/loader.Limits field names -> value (absent: abi.h's).
    limits: dict[str, int] = field(default_factory=dict)
    healthz_bind_address: str = "0.0.0.0:10256"   # /healthz, /livez ("" = off); kube-proxy's default
    metrics_bind_address: str = "127.0.0.1:10249"  # /metrics ("" = off); kube-proxy's default
    bind_address_hard_fail: bool = False      # a taken address is fatal, not retried (health.Listener)
