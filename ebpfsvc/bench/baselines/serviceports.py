"""An LBState regrouped per service port, the unit kube-proxy writes rules for.

An LBState is keyed by frontend (address, port, protocol, scope), because that
is what the eBPF datapath looks up.  kube-proxy instead walks its service ports
and writes, for each, one ClusterIP match, its NodePort / externalIP /
load-balancer matches, and one endpoint-selection chain per traffic policy.
This module turns the first view into the second, once, so the iptables and
nftables renderers share the same reading of the model:

- Cluster endpoints: the backends of a frontend without `local_only` (all of
  the service's usable endpoints, kube-proxy's KUBE-SVC / service- chain).
- Local endpoints: the backends of a `local_only` frontend (a Local traffic
  policy: this node's endpoints, kube-proxy's KUBE-SVL / local- chain).
- internalTrafficPolicy Local = the ClusterIP frontend is `local_only`;
  externalTrafficPolicy Local = an EXTERNAL-scope external frontend is.

When every frontend of a port is `local_only`, the LBState does not say what the
remote endpoints are; the local set then stands in for the cluster set too
(only the "short-circuit" rules for pod and host traffic use it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ebpfsvc.lbmodel import Backend, FrontendKind, LBState, Scope, ServicePortName
from ebpfsvc.bench.baselines import names


@dataclass
class ServicePortView:
    """Everything kube-proxy knows about one service port, in rule-writing order."""

    name: ServicePortName
    cluster_ips: list[tuple[str, int]] = field(default_factory=list)    # (address, port)
    external_ips: list[tuple[str, int]] = field(default_factory=list)
    load_balancer_ips: list[tuple[str, int]] = field(default_factory=list)
    node_ports: list[int] = field(default_factory=list)
    cluster_endpoints: tuple[Backend, ...] | None = None
    local_endpoints: tuple[Backend, ...] | None = None
    internal_local: bool = False
    external_local: bool = False
    affinity_timeout: int = 0
    source_ranges: tuple[str, ...] = ()

    @property
    def protocol(self) -> str:
        return names.protocol(self.name)

    @property
    def label(self) -> str:
        """The comment kube-proxy puts on the service's rules: "ns/name:port"."""
        return str(self.name)

    @property
    def cluster(self) -> tuple[Backend, ...]:
        """Endpoints of the Cluster-policy chain (see the module note on all-local ports)."""
        if self.cluster_endpoints is not None:
            return self.cluster_endpoints
        return self.local_endpoints or ()

    @property
    def local(self) -> tuple[Backend, ...]:
        return self.local_endpoints or ()

    @property
    def has_endpoints(self) -> bool:
        """Any usable endpoint anywhere: without one, every frontend rejects."""
        return bool(self.cluster or self.local)

    @property
    def has_internal_endpoints(self) -> bool:
        return bool(self.local if self.internal_local else self.cluster)

    @property
    def has_external_endpoints(self) -> bool:
        return bool(self.local if self.external_local else self.cluster)

    @property
    def externally_accessible(self) -> bool:
        return bool(self.external_ips or self.load_balancer_ips or self.node_ports)

    @property
    def uses_cluster_chain(self) -> bool:
        # An externally reachable port needs the cluster chain even with an
        # external Local policy: pod and host traffic short-circuit to it.
        return bool(self.cluster) and (not self.internal_local or self.externally_accessible)

    @property
    def uses_local_chain(self) -> bool:
        return bool(self.local) and (self.internal_local or
                                     (self.external_local and self.externally_accessible))

    def endpoint_selections(self, cluster_chain: str, local_chain: str) -> list[tuple[str, tuple[Backend, ...]]]:
        """(chain, endpoints) for each endpoint-selection chain this port uses, cluster then local:
        what both renderers declare and fill, named in each one's own scheme."""
        chains = ((cluster_chain, self.cluster, self.uses_cluster_chain),
                  (local_chain, self.local, self.uses_local_chain))
        return [(chain, endpoints) for chain, endpoints, used in chains if used]

    @property
    def uses_external_chain(self) -> bool:
        return self.has_endpoints and self.externally_accessible

    @property
    def uses_firewall(self) -> bool:
        """loadBalancerSourceRanges apply (only to load-balancer IPs, never to NodePorts)."""
        return bool(self.load_balancer_ips and self.source_ranges)

    def _no_endpoints(self, has_them: bool) -> str | None:
        if not self.has_endpoints:
            return "reject"     # nothing anywhere: tell the client at once
        return None if has_them else "drop"   # Local policy, none here: others may still serve

    @property
    def internal_no_endpoints(self) -> str | None:
        """What the filter does with new ClusterIP connections: None (let them through), "reject" or "drop"."""
        return self._no_endpoints(self.has_internal_endpoints)

    @property
    def external_no_endpoints(self) -> str | None:
        """The same for NodePort, externalIPs and load-balancer IPs."""
        return self._no_endpoints(self.has_external_endpoints)

    def endpoints_in_use(self) -> tuple[Backend, ...]:
        """Every endpoint some chain of this port selects, each once, in order.

        Once per address and port: the same endpoint may appear in the cluster
        and the local set with different flags, but it has one endpoint chain.
        """
        seen: dict[tuple, Backend] = {}
        for b in (self.cluster if self.uses_cluster_chain else ()) + (self.local if self.uses_local_chain else ()):
            seen.setdefault((b.address, b.port), b)
        return tuple(seen.values())


def _set_endpoints(view: ServicePortView, attr: str, backends: tuple[Backend, ...]) -> None:
    current = getattr(view, attr)
    if current is not None and current != backends:
        kind = "cluster" if attr == "cluster_endpoints" else "local"
        raise ValueError(f"{view.name}: frontends disagree on the {kind} endpoints "
                         f"({len(current)} vs {len(backends)} backends)")
    setattr(view, attr, backends)


def _append_once(items: list, item) -> None:
    if item not in items:
        items.append(item)


def service_ports(state: LBState) -> list[ServicePortView]:
    """The service ports of `state`, in the order their first frontend appears."""
    views: dict[ServicePortName, ServicePortView] = {}
    for fe in state.frontends.values():
        view = views.get(fe.service)
        if view is None:
            view = views[fe.service] = ServicePortView(fe.service)
        addr_port = (str(fe.key.address), fe.key.port)
        if fe.kind is FrontendKind.CLUSTER_IP:
            _append_once(view.cluster_ips, addr_port)
            view.internal_local = view.internal_local or fe.local_only
        elif fe.kind is FrontendKind.NODE_PORT:
            _append_once(view.node_ports, fe.key.port)
        elif fe.kind is FrontendKind.EXTERNAL_IP:
            _append_once(view.external_ips, addr_port)
        else:
            _append_once(view.load_balancer_ips, addr_port)
            if fe.source_ranges:
                view.source_ranges = tuple(str(n) for n in fe.source_ranges)
        if fe.kind is not FrontendKind.CLUSTER_IP and fe.local_only and fe.key.scope is Scope.EXTERNAL:
            view.external_local = True
        # Terminating backends beside serving ones only drain their established flows: kube-proxy
        # writes rules for them only when nothing else is left (as the map writer builds tables).
        serving = tuple(b for b in fe.backends if not b.terminating)
        _set_endpoints(view, "local_endpoints" if fe.local_only else "cluster_endpoints",
                       serving or fe.backends)
        view.affinity_timeout = max(view.affinity_timeout, fe.affinity_timeout)
    return list(views.values())
