"""The desired state `ebpfsvc drift` compares the maps with: one list of the
cluster (manifest directory or API server) through the agent's own trackers
and desired_state(), so both sides are computed exactly as the agent does,
NodePort addresses included (from the node's Node object and interfaces, as
the agent finds them, when `settings` are given), and with `ip_families_auto` the
IP families of the cluster's ServiceCIDRs, as the agent follows them by default."""

from __future__ import annotations

import time
from dataclasses import replace

from ebpfsvc import nodeinfo
from ebpfsvc.config import IP_FAMILIES, NodeConfig
from ebpfsvc.desired import desired_state
from ebpfsvc.k8s.servicecidr import served_ip_families
from ebpfsvc.lbmodel import LBState
from ebpfsvc.tracker import ClusterState


def load_desired(node: NodeConfig, *, manifests: str | None = None, kubeconfig: str | None = None,
                 in_cluster: bool = False, timeout: float = 30.0,
                 settings: nodeinfo.NodeSettings | None = None, netns: str | None = None,
                 problems: list | None = None, ip_families_auto: bool = False) -> LBState:
    """`netns`: read the node's interfaces there (a lab node's namespace) rather than here.
    `problems`, when given, receives the validation problems of the objects listed (an invalid
    Service keeps its last good version in the agent's maps: drift says so). `ip_families_auto`:
    node.ip_families are the ServiceCIDRs' (the agent's --ip-families auto, agent.py)."""
    state = ClusterState(replace(node, ip_families=IP_FAMILIES) if ip_families_auto else node)
    if manifests:
        from ebpfsvc.sources.manifests import ManifestSource
        ManifestSource(manifests, state).resync_now()     # one synchronous scan, no poller thread
    else:
        from ebpfsvc.sources.kube import KubeSource
        source = KubeSource(state, kubeconfig=kubeconfig, in_cluster=in_cluster or None, node_name=node.node_name)
        source.start()
        try:
            deadline = time.monotonic() + timeout
            # With `settings`, the NodePort addresses come from the Node: wait for its list too, or a
            # quick Service list would make every NodePort frontend look unwanted.
            while not state.synced or (settings is not None and "Node" not in state.synced_kinds) or \
                    (ip_families_auto and "ServiceCIDR" not in state.synced_kinds):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Services and EndpointSlices not listed within {timeout:.0f}s")
                state.wait_changed(0.2)
        finally:
            source.stop()
    if not state.synced:
        raise ValueError("the source did not list Services and EndpointSlices")
    if problems is not None:
        problems.extend(state.problems)
    if ip_families_auto:
        node = replace(node, ip_families=served_ip_families(state.service_cidrs()))
        settings = settings and replace(settings, ip_families=node.ip_families)
    if settings is not None:
        info = nodeinfo.resolve(settings, nodeinfo.read_interfaces(netns), state.node(node.node_name),
                                "Node" in state.synced_kinds)
        node = replace(node, node_addresses=info.nodeport_addresses)
    return desired_state(state.snapshot(), node)
