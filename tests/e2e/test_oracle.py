"""The oracle: the same scenarios observed with the real kube-proxy (v1.37.2, the binary the lab
builds; iptables and nftables mode) and with ebpfsvc on the same lab, and the observations
compared (issue 17): 22 rows on the default lab, kube-proxy's answers pinned in EXPECTED, ebpfsvc's the same but
for DIFFERENCES.

Five rows differ on purpose (DIFFERENCES, docs/semantics.md "Kept on purpose"): an established
TCP connection whose endpoint leaves the Service (a selector change) goes on with kube-proxy and is
reset by ebpfsvc (#3); the legacy source-ranges annotation, which kube-proxy ignores, fences a
LoadBalancer IP with ebpfsvc; publishNotReadyAddresses on a hand-written slice that says
`ready: false`, which kube-proxy leaves to the EndpointSlice controller; the client address a
backend on the receiving node sees with externalTrafficPolicy Cluster (#8), and for the same
reason with a ClusterIP routed to the node from outside (#2).

One lab without agents: kube-proxy runs on both nodes, every row is observed; kube-proxy stops
and `kube-proxy --cleanup` removes its rules (docs/deploy.md); the ebpfsvc agents start and
every row is observed again; then once more with the options that give kube-proxy's behaviour
(KUBE_PROXY_OPTIONS in the ConfigMap), where four of the five differences must vanish (all but
publishNotReadyAddresses, which has no option). An observation is what a client sees: "refused" (a RST or an ICMP
port unreachable), "timeout" (dropped), an HTTP status and the body fields kube-proxy defines.

A second lab (examples/lab/cluster-cidr.yaml: three nodes, a cluster CIDR) checks issue 17 item 8,
externalTrafficPolicy Local traffic from pods with kube-proxy's default `--detect-local-mode
ClusterCIDR`: 4 rows (CC_EXPECTED), kube-proxy in both modes on the same lab, then ebpfsvc. Two
differ on purpose (CC_DIFFERENCES): kube-proxy sends a pod of another node to an endpoint on a
third node without masquerading it, so the reply bypasses the node that translated it (TCP never
connects; a UDP answer comes from the backend's address), while ebpfsvc SNATs it to the node.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml
from pyroute2 import IPRoute

from ebpfsvc.datapath import nsenter
from ebpfsvc.inspect.node import AgentOptions, NodeMaps
from ebpfsvc.lab import Lab, agents, apps, kubeproxy, names
from ebpfsvc.lab.network import UPLINK

from .helpers import (TcpStream, bare_pod, cluster_ip, connect_outcome, http_get, service, udp_socket,
                      wait_agents_attached, wait_for, wait_programmed, wait_ready, wait_udp_bound)

pytestmark = pytest.mark.root

CLIENT = "or-client"             # a client pod on node-1
EXTERNAL = "client"              # the lab's external client (outside the cluster)
NODE1 = "198.18.0.11"
SERVICE_CIDR, UPSTREAM = "198.19.0.0/16", "198.18.0.100"     # the lab's service CIDR; its external client
TO_BE_DELETED = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1764650000", "effect": "NoSchedule"}


def echo(name: str, node: str) -> dict:
    return apps.pod(name, "http-echo", 8080, node=node, labels={"pod": name, "app": "or-echo"})


def hinted(lab: Lab, svc: str, field: str) -> bool:
    """The controller has written `field` hints on both of the Service's endpoints."""
    eps = [ep for sl in lab.endpoint_slices(svc) for ep in sl.get("endpoints") or []]
    return len(eps) == 2 and all((ep.get("hints") or {}).get(field) for ep in eps)


def kube_proxy_topology(lab: Lab) -> str:
    """What kube-proxy said about topology (its log at --v=2 names a Service whose hints it ignores,
    and why), and the zone hints and node labels it was given: the evidence if its topology rows
    differ. In CI on 2026-12-04 and -05 both zones answered PreferSameZone for 60 s, and this showed
    "node is missing label" while node-1 had it: kube-proxy's start race (kubeproxy.start_knowing_zone)."""
    lines = [f"{node}: {line}" for node in ("node-1", "node-2")
             for line in kubeproxy.log(lab, node).splitlines() if "topology" in line.lower()]
    hints = {ep["addresses"][0]: (ep.get("zone"), ep.get("hints")) for sl in lab.endpoint_slices("or-same-zone")
             for ep in sl.get("endpoints") or []}
    labels = (lab.api.get("Node", None, "node-1") or {}).get("metadata", {}).get("labels")
    return "\n".join(["kube-proxy's log on topology:", *lines[-20:], f"or-same-zone's endpoints: {hints}",
                      f"node-1's labels: {labels}"])


def answering(lab: Lab, svc: str) -> str:
    vip = cluster_ip(lab, svc)
    return " ".join(sorted({http_get(lab, CLIENT, vip, 80)["pod"] for _ in range(CONNECTIONS)}))


SERVICES = [
    # Both traffic policies Local, no endpoint anywhere (nothing has this label).
    service("or-none", [{"port": 80, "targetPort": 8080, "nodePort": 30470}], selector={"pod": "nobody"},
            type="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local"),
    # Both traffic policies Local, the only endpoint on node-2.
    service("or-remote", [{"port": 80, "targetPort": 8080, "nodePort": 30471}], selector={"pod": "or-b"},
            type="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local"),
    # healthCheckNodePorts: a LoadBalancer Service with ETP Local and an endpoint on node-1, and the
    # same labelled service-proxy-name with an empty value (kube-proxy: not its Service).
    service("or-lb", [{"port": 80, "targetPort": 8080, "nodePort": 30472}], selector={"pod": "or-a"},
            type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30473),
    {**service("or-other", [{"port": 80, "targetPort": 8080, "nodePort": 30474}], selector={"pod": "or-a"},
               type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30475),
     "metadata": {"name": "or-other", "labels": {"service.kubernetes.io/service-proxy-name": ""}}},
]

# trafficDistribution: the EndpointSlice controller writes node hints (PreferSameNode) or zone hints
# (PreferSameZone); both endpoints, or-a on node-1 (zone-a) and or-b on node-2 (zone-b).
TOPOLOGY = {"or-same-node": ("PreferSameNode", "forNodes"), "or-same-zone": ("PreferSameZone", "forZones")}
SERVICES += [service(name, [{"port": 80, "targetPort": 8080}], selector={"app": "or-echo"},
                     trafficDistribution=mode) for name, (mode, _) in TOPOLOGY.items()]
CONNECTIONS = 12    # a backend of two missed 12 times by plain balancing: 2 * 2^-12


def moved(selector: dict) -> dict:
    """The Service whose only endpoint (tcp-echo pod or-c) leaves it when its selector changes."""
    return service("or-moved", [{"port": 7000}], selector=selector)


SERVICES.append(moved({"pod": "or-c"}))
LB_IP = "198.18.200.20"          # the lab's external client routes 198.18.200.0/24 via node-1
SERVICES += [
    # The legacy annotation only (the field empty), a range without the external client.
    {**service("or-fenced", [{"port": 80, "targetPort": 8080}], selector={"pod": "or-a"}, type="LoadBalancer"),
     "metadata": {"name": "or-fenced", "annotations": {
         "lab.ebpfsvc.io/lb-ip": LB_IP, "service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.0.200/32"}}},
    # externalTrafficPolicy Cluster, the only endpoint on node-1, reached through node-1's NodePort.
    service("or-cluster", [{"port": 80, "targetPort": 8080, "nodePort": 30476}], selector={"pod": "or-a"},
            type="NodePort"),
    # Selectorless: its slice is hand-written (pnr_slice), or-a listed as not ready.
    service("or-pnr", [{"port": 80, "targetPort": 8080}], publishNotReadyAddresses=True),
    # A plain ClusterIP whose only endpoint is or-b on node-2, reached from outside through node-1
    # (with or-cluster for an endpoint on node-1): issue 17 item 2.
    service("or-offnode", [{"port": 80, "targetPort": 8080}], selector={"pod": "or-b"}),
]
STICKY_NODE_PORT = 30477


def sticky(selector: dict) -> dict:
    """sessionAffinity ClientIP, internalTrafficPolicy Local (its clusterIP: node-local endpoints),
    a NodePort with externalTrafficPolicy Cluster (all endpoints): two sets in use for one Service."""
    return service("or-sticky", [{"port": 80, "targetPort": 8080, "nodePort": STICKY_NODE_PORT}], selector=selector,
                   type="NodePort", internalTrafficPolicy="Local", sessionAffinity="ClientIP")


SERVICES.append(sticky({"pod": "or-b"}))
# Selectorless, each with a manual v1 Endpoints naming or-a (manual_endpoints): the mirroring
# controller copies the first into an EndpointSlice, not the second (labelled skip-mirror); kube-proxy
# reads EndpointSlices only.
SERVICES += [service(name, [{"port": 80, "targetPort": 8080}]) for name in ("or-manual", "or-skip-mirror")]
# Selectorless, its slice hand-written with zone hints (zone_hinted_slice): or-a for zone-a, or-b
# for zone-b. Observed while node-1 carries only the beta zone label (issue 17 item 4).
SERVICES.append(service("or-beta-zone", [{"port": 80, "targetPort": 8080}]))
ZONE_LABEL, BETA_ZONE_LABEL = "topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"
BETA_ZONE_ROW = "zone hints, node-1 with the beta zone label only: who answers a pod on node-1"
AFFINITY_ROWS = ("sessionAffinity ClientIP: pod on node-1 -> node-1's NodePort (ETP Cluster), or-b the only endpoint",
                 "... or-a added; the same pod -> the clusterIP (ITP Local): who answers")


def pnr_slice(address: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "or-pnr-1", "labels": {"kubernetes.io/service-name": "or-pnr"}},
            "addressType": "IPv4", "ports": [{"name": "", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": False}, "nodeName": "node-1"}]}

def zone_hinted_slice(zone_a: str, zone_b: str) -> dict:
    """or-beta-zone's slice: `zone_a` (or-a, node-1) hinted for zone-a, `zone_b` (or-b) for zone-b."""
    def endpoint(address: str, node: str, zone: str) -> dict:
        return {"addresses": [address], "conditions": {"ready": True}, "nodeName": node, "zone": zone,
                "hints": {"forZones": [{"name": zone}]}}

    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "or-beta-zone-1", "labels": {"kubernetes.io/service-name": "or-beta-zone"}},
            "addressType": "IPv4", "ports": [{"name": "", "protocol": "TCP", "port": 8080}],
            "endpoints": [endpoint(zone_a, "node-1", "zone-a"), endpoint(zone_b, "node-2", "zone-b")]}


def manual_endpoints(name: str, address: str, skip_mirror: bool) -> dict:
    labels = {"endpointslice.kubernetes.io/skip-mirror": "true"} if skip_mirror else {}
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "labels": labels},
            "subsets": [{"addresses": [{"ip": address, "nodeName": "node-1"}], "ports": [{"port": 8080}]}]}


# What both proxies must show (kube-proxy v1.37.2's behaviour, checked against it by this test).
EXPECTED = {
    "Local policies, no endpoint anywhere: pod -> clusterIP": "refused",
    "Local policies, no endpoint anywhere: outside -> NodePort": "refused",
    "Local policies, endpoint on node-2 only: pod on node-1 -> clusterIP": "timeout",
    "Local policies, endpoint on node-2 only: outside -> node-1's NodePort": "timeout",
    "healthCheckNodePort, ETP Local, endpoint on node-1": "200 localEndpoints=1",
    "healthCheckNodePort, service-proxy-name label with an empty value": "refused",
    "trafficDistribution PreferSameNode: who answers a pod on node-1": "or-a",
    "trafficDistribution PreferSameZone: who answers a pod on node-1": "or-a",
    "established TCP, its endpoint leaves the Service (selector change)": "survives",
    "legacy source-ranges annotation without the client: outside -> LoadBalancer IP": "HTTP 200",
    "publishNotReadyAddresses, hand-written slice with ready: false: pod -> clusterIP": "refused",
    "ETP Cluster, backend on the receiving node: the source it sees": "masqueraded",
    "ClusterIP routed to node-1 from outside, backend on node-1: the source it sees": "masqueraded",
    "ClusterIP routed to node-1 from outside, backend on node-2: the source it sees": "masqueraded",
    "manual Endpoints, mirrored to an EndpointSlice: pod -> clusterIP": "connected",
    "manual Endpoints labelled skip-mirror: pod -> clusterIP": "refused",
    AFFINITY_ROWS[0]: "or-b",
    AFFINITY_ROWS[1]: "or-a",
    BETA_ZONE_ROW: "or-a or-b",
    "/healthz on node-1": "200 nodeEligible=True",
    "/healthz on node-1, Node tainted ToBeDeletedByClusterAutoscaler": "503 nodeEligible=False",
    "/healthz on node-1, taint removed": "200 nodeEligible=True",
}


# Where ebpfsvc observes something else on purpose (docs/semantics.md, "Kept on purpose").
DIFFERENCES = {
    "established TCP, its endpoint leaves the Service (selector change)": "reset",     # item 3
    "legacy source-ranges annotation without the client: outside -> LoadBalancer IP": "timeout",
    "publishNotReadyAddresses, hand-written slice with ready: false: pod -> clusterIP": "connected",
    "ETP Cluster, backend on the receiving node: the source it sees": "the client",
    "ClusterIP routed to node-1 from outside, backend on node-1: the source it sees": "the client",   # as #8
}


# The agent options (the ConfigMap's config.yaml keys) that give kube-proxy's behaviour where ebpfsvc
# differs on purpose, and the rows they make the same (docs/semantics.md, "Kept on purpose").
KUBE_PROXY_OPTIONS = {"reset-removed-endpoint-tcp": False, "legacy-source-ranges-annotation": False,
                      "masquerade-external-to-local-backends": True}
MADE_THE_SAME_BY_OPTIONS = ("established TCP, its endpoint leaves the Service (selector change)",
                            "legacy source-ranges annotation without the client: outside -> LoadBalancer IP",
                            "ETP Cluster, backend on the receiving node: the source it sees",
                            "ClusterIP routed to node-1 from outside, backend on node-1: the source it sees")
WITH_OPTIONS = "ebpfsvc with kube-proxy's options"


def http(lab: Lab, url: str, where: str = "external") -> tuple[int, dict]:
    """(status, JSON body) of a GET from the external client or, where="node-1", the node itself;
    (0, {"outcome": ...}) when nothing answers with HTTP."""
    argv = ["curl", "-s", "--max-time", "3", "-w", "\n%{http_code}", url]
    out = lab.external_exec(EXTERNAL, argv) if where == "external" else lab.node_exec(where, argv)
    if out.returncode:
        return 0, {"outcome": {7: "refused", 28: "timeout"}.get(out.returncode, f"curl exit {out.returncode}")}
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body or "{}")


def source_seen(lab: Lab, url: str) -> str:
    """Whom the http-echo backend saw as its client, for a GET from the external client."""
    code, body = http(lab, url)
    if code != 200:
        return body.get("outcome", f"HTTP {code}")
    return "the client" if body["client"] == UPSTREAM else "masqueraded"


def outside(lab: Lab, url: str) -> str:
    code, body = http(lab, url)
    return body["outcome"] if code == 0 else f"HTTP {code}"


def health_check(lab: Lab, port: int) -> str:
    code, body = http(lab, f"http://{NODE1}:{port}/")
    return body["outcome"] if code == 0 else f"{code} localEndpoints={body.get('localEndpoints')}"


def healthz(lab: Lab) -> str:
    code, body = http(lab, "http://127.0.0.1:10256/healthz", where="node-1")
    return body["outcome"] if code == 0 else f"{code} nodeEligible={body.get('nodeEligible')}"


def settle(observe: Callable[[], str], want: str, timeout: float = 20.0) -> str:
    """The observation once it shows `want`, or the last one after `timeout` (a proxy that never
    reacts shows its own answer in the comparison)."""
    deadline = time.monotonic() + timeout
    while True:
        got = observe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def taint(lab: Lab, node: str, taints: list | None) -> None:
    lab.api.request("PATCH", f"/api/v1/nodes/{node}", {"spec": {"taints": taints}},
                    content_type="application/merge-patch+json")


def zone_labels(lab: Lab, node: str, labels: dict) -> None:
    """Set (a value) or remove (None) zone labels of `node`'s Node."""
    lab.api.request("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": labels}},
                    content_type="application/merge-patch+json")


def answers_with_the_beta_zone_label_only(lab: Lab) -> str:
    """Item 4: node-1's zone label replaced by the beta one (an older cluster's); who answers a pod on
    node-1 through or-beta-zone, whose endpoints are hinted zone-a (or-a) and zone-b (or-b). The
    labels are put back afterwards, and the controller's hints of or-same-zone awaited again."""
    zone_labels(lab, "node-1", {ZONE_LABEL: None, BETA_ZONE_LABEL: "zone-a"})
    try:
        return settle(lambda: answering(lab, "or-beta-zone"), EXPECTED[BETA_ZONE_ROW])
    finally:
        zone_labels(lab, "node-1", {ZONE_LABEL: "zone-a", BETA_ZONE_LABEL: None})
        wait_for(lambda: hinted(lab, "or-same-zone", "forZones"), what="or-same-zone's zone hints back")
        settle(lambda: answering(lab, "or-beta-zone"), "or-a")


@contextmanager
def upstream_route(lab: Lab) -> Iterator[None]:
    """A real node has a default route to its upstream router, so a pod's packet to a ClusterIP
    that kube-proxy does not DNAT (no endpoints; a Local policy without one here) is routed and
    then meets kube-proxy's filter rules (REJECT, DROP). Lab nodes have no default route: the
    kernel would answer "network unreachable" before kube-proxy's rules see the packet. So, for
    kube-proxy's turn, the service CIDR is routed to the external client as the nodes' upstream
    (in the lab's node namespaces); gone before the agents start, which route it to their device."""
    def route(action: str) -> None:
        with IPRoute() as ipr:
            ipr.route(action, dst=SERVICE_CIDR, gateway=UPSTREAM, oif=ipr.link_lookup(ifname=UPLINK)[0])

    nodes = [lab.node_netns(n.name) for n in lab.spec.nodes]
    for netns in nodes:
        nsenter.run_in(netns, lambda: route("add"))
    try:
        yield
    finally:
        for netns in nodes:
            nsenter.run_in(netns, lambda: route("del"))


@contextmanager
def service_cidr_via_node1(lab: Lab) -> Iterator[None]:
    """The external client's upstream sends the service CIDR to node-1 (a static route, or a
    BGP-advertised service range): a route in the client's lab namespace, removed after."""
    def route(action: str) -> None:
        with IPRoute() as ipr:
            ipr.route(action, dst=SERVICE_CIDR, gateway=NODE1)

    netns = lab.external_netns(EXTERNAL)
    nsenter.run_in(netns, lambda: route("add"))
    try:
        yield
    finally:
        nsenter.run_in(netns, lambda: route("del"))


def stream_after_endpoint_left(lab: Lab) -> str:
    """A stream to or-c through or-moved; the selector changes so or-c leaves the Service; once
    the proxy has synced that (a new connection is refused: no endpoint left), what the stream
    gets for its next line. The selector is put back afterwards."""
    vip = cluster_ip(lab, "or-moved")
    stream = TcpStream(lab, CLIENT, vip, 7000, timeout=5)
    try:
        assert stream.backend() == "or-c"
        lab.apply([moved({"pod": "nobody"})])
        wait_for(lambda: connect_outcome(lab, CLIENT, vip, 7000, timeout=1) == "refused",
                 what="the proxy has removed or-c from or-moved")
        try:
            answer = stream.ask("still there?")
        except TimeoutError:
            return "timeout"
        except OSError:                  # ConnectionError: reset or closed
            return "reset"
        return "survives" if answer == "or-c: still there?" else f"answered {answer!r}"
    finally:
        stream.close()
        lab.apply([moved({"pod": "or-c"})])
        wait_for(lambda: connect_outcome(lab, CLIENT, vip, 7000, timeout=1) == "connected",
                 what="or-c back in or-moved")


def answers(lab: Lab, host: str, port: int) -> str:
    """The pods answering CONNECTIONS new connections from CLIENT, or the first failure."""
    try:
        return " ".join(sorted({http_get(lab, CLIENT, host, port, timeout=2)["pod"] for _ in range(CONNECTIONS)}))
    except (OSError, ValueError) as exc:
        return type(exc).__name__


def affinity_scope(lab: Lab) -> tuple[str, str]:
    """Item 7: the pod is pinned to or-b through the NodePort (the cluster-wide set); or-a (node-1)
    joins the Service; through the clusterIP, whose set is node-1's endpoints only, the pin must not
    take the pod to or-b (kube-proxy's affinity lives in the KUBE-SVL chain of the set in use).
    The selector is put back afterwards."""
    pinned = settle(lambda: answers(lab, NODE1, STICKY_NODE_PORT), "or-b")
    try:
        lab.apply([sticky({"app": "or-echo"})])
        wait_for(lambda: sum(len(sl.get("endpoints") or []) for sl in lab.endpoint_slices("or-sticky")) == 2,
                 what="or-a and or-b in or-sticky's slices")
        return pinned, settle(lambda: answers(lab, cluster_ip(lab, "or-sticky"), 80), "or-a")
    finally:
        lab.apply([sticky({"pod": "or-b"})])
        wait_for(lambda: sum(len(sl.get("endpoints") or []) for sl in lab.endpoint_slices("or-sticky")) == 1,
                 what="or-b alone in or-sticky's slices again")


def observe(lab: Lab, proxy: str) -> dict[str, str]:
    none_vip, remote_vip = cluster_ip(lab, "or-none"), cluster_ip(lab, "or-remote")

    def expected(row: str) -> str:
        if proxy == "kube-proxy" or (proxy == WITH_OPTIONS and row in MADE_THE_SAME_BY_OPTIONS):
            return EXPECTED[row]
        return DIFFERENCES.get(row, EXPECTED[row])

    fenced = "legacy source-ranges annotation without the client: outside -> LoadBalancer IP"
    pnr = "publishNotReadyAddresses, hand-written slice with ready: false: pod -> clusterIP"
    same_node, same_zone = (f"trafficDistribution {mode}: who answers a pod on node-1"
                            for mode, _ in TOPOLOGY.values())
    got = {
        fenced: settle(lambda: outside(lab, f"http://{LB_IP}/"), expected(fenced)),
        pnr: connect_outcome(lab, CLIENT, cluster_ip(lab, "or-pnr"), 80),
        "ETP Cluster, backend on the receiving node: the source it sees": source_seen(lab, f"http://{NODE1}:30476/"),
        "Local policies, no endpoint anywhere: pod -> clusterIP": connect_outcome(lab, CLIENT, none_vip, 80),
        "Local policies, no endpoint anywhere: outside -> NodePort": outside(lab, f"http://{NODE1}:30470/"),
        "Local policies, endpoint on node-2 only: pod on node-1 -> clusterIP":
            connect_outcome(lab, CLIENT, remote_vip, 80, timeout=2),
        "Local policies, endpoint on node-2 only: outside -> node-1's NodePort": outside(lab, f"http://{NODE1}:30471/"),
        "healthCheckNodePort, ETP Local, endpoint on node-1":
            settle(lambda: health_check(lab, 30473), EXPECTED["healthCheckNodePort, ETP Local, endpoint on node-1"]),
        "healthCheckNodePort, service-proxy-name label with an empty value": health_check(lab, 30475),
        # kube-proxy learns its node's zone from its Node informer, which may deliver after the first
        # sync (OnTopologyChange then syncs again): until then it ignores zone hints. 20 s was not
        # always enough in CI (2026-12-04: iptables mode still answered from both zones after it).
        same_node: settle(lambda: answering(lab, "or-same-node"), expected(same_node), timeout=60),
        same_zone: settle(lambda: answering(lab, "or-same-zone"), expected(same_zone), timeout=60),
        "established TCP, its endpoint leaves the Service (selector change)": stream_after_endpoint_left(lab),
        "/healthz on node-1": settle(lambda: healthz(lab), EXPECTED["/healthz on node-1"]),
        "manual Endpoints, mirrored to an EndpointSlice: pod -> clusterIP":
            connect_outcome(lab, CLIENT, cluster_ip(lab, "or-manual"), 80),
        "manual Endpoints labelled skip-mirror: pod -> clusterIP":
            connect_outcome(lab, CLIENT, cluster_ip(lab, "or-skip-mirror"), 80),
    }
    pin, scope = AFFINITY_ROWS
    got[pin], got[scope] = affinity_scope(lab)
    got[BETA_ZONE_ROW] = answers_with_the_beta_zone_label_only(lab)
    with service_cidr_via_node1(lab):
        for node, svc in (("node-1", "or-cluster"), ("node-2", "or-offnode")):
            row = f"ClusterIP routed to node-1 from outside, backend on {node}: the source it sees"
            got[row] = source_seen(lab, f"http://{cluster_ip(lab, svc)}/")
    try:
        taint(lab, "node-1", [TO_BE_DELETED])
        key = "/healthz on node-1, Node tainted ToBeDeletedByClusterAutoscaler"
        got[key] = settle(lambda: healthz(lab), EXPECTED[key])
    finally:
        taint(lab, "node-1", None)
    key = "/healthz on node-1, taint removed"
    got[key] = settle(lambda: healthz(lab), EXPECTED[key])
    return got


def table(results: dict[str, dict[str, str]]) -> str:
    width = max(map(len, EXPECTED))
    lines = [f"{'scenario':<{width}}  " + "".join(f"{name:<24} " for name in results).rstrip()]
    lines += [f"{row:<{width}}  " + "".join(f"{got.get(row, ''):<24} " for got in results.values()).rstrip()
              for row in EXPECTED]
    return "\n".join(lines)


def published_options(lab: Lab, node: str):
    """The datapath options `node`'s agent wrote for its programs to read (lb_agent_config), or None."""
    with NodeMaps.open(names.pin_dir(lab.prefix, node)) as maps:
        return maps.agent_options()


def restart_agents_with(lab: Lab, options: dict) -> None:
    """The operator sets `options` in the ConfigMap; every agent restarts with them and serves them.
    The datapath options are a word the programs read (lb_agent_config), not compiled in: the new
    agent writes it before it attaches anything, and the programs (the old agent's, still attached,
    or the same ones again from the program cache) follow it from their next packet. A restarted agent
    answers /healthz from its first sync, which may come before that write: wait for the word too."""
    config = lab.state.path / agents.CONFIG_FILE
    config.write_text(yaml.safe_dump({**(yaml.safe_load(config.read_text()) or {}), **options}))
    want = {key.replace("-", "_"): value for key, value in options.items()
            if key.replace("-", "_") in AgentOptions.__dataclass_fields__}
    for node in ("node-1", "node-2"):
        lab.agent("stop", node)
    for node in ("node-1", "node-2"):
        lab.agent("start", node)
    for node in ("node-1", "node-2"):       # the old agents are gone: a 200 is the new one's first sync
        wait_for(lambda: lab.node_exec(node, ["curl", "-sf", "--max-time", "2", "http://127.0.0.1:10256/healthz"]
                                       ).returncode == 0, what=f"{node}'s agent serving with {options}")
        wait_for(lambda: (published := published_options(lab, node)) is not None and all(
            getattr(published, name) == value for name, value in want.items()), timeout=120,
            what=f"{node}'s agent's datapath options {want} in lb_agent_config")


# Three observations of 22 rows, two agent starts that compile: past pytest's 300 s on a loaded machine.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", kubeproxy.MODES)
def test_oracle_kube_proxy_and_ebpfsvc_observe_the_same(unique_prefix, mode):
    with Lab.up(prefix=unique_prefix, agents=False) as lab:
        lab.apply([bare_pod(CLIENT, "node-1"), echo("or-a", "node-1"), echo("or-b", "node-2"),
                   apps.pod("or-c", "tcp-echo", 7000, node="node-2", labels={"pod": "or-c"}), *SERVICES])
        wait_ready(lab, ["or-a", "or-b", "or-c"])
        lab.apply([pnr_slice(lab.pod_ip("or-a")), manual_endpoints("or-manual", lab.pod_ip("or-a"), False),
                   manual_endpoints("or-skip-mirror", lab.pod_ip("or-a"), True),
                   zone_hinted_slice(lab.pod_ip("or-a"), lab.pod_ip("or-b"))])
        wait_for(lambda: lab.endpoint_slices("or-manual"), what="the mirroring controller's slice of or-manual")
        for svc, (_, field) in TOPOLOGY.items():
            wait_for(lambda: hinted(lab, svc, field), what=f"{field} hints on {svc}'s endpoints")
        results: dict[str, dict[str, str]] = {}

        # kube-proxy v1.37.2 can lose its zone at start (kubeproxy.start_knowing_zone): it is
        # restarted until its proxier has it, and the restarts are printed with the table.
        restarts = {node: kubeproxy.start_knowing_zone(lab, node, mode, lab.spec.node(node).zone,
                                                       cluster_ip(lab, "or-lb"), 80)
                    for node in ("node-1", "node-2")}
        with upstream_route(lab):
            results["kube-proxy"] = observe(lab, "kube-proxy")
        topology_seen = kube_proxy_topology(lab) + \
            f"\nkube-proxy restarts until its proxier had the node's zone: {restarts}"

        for node in ("node-1", "node-2"):
            kubeproxy.stop(lab, node)
            cleaned = kubeproxy.cleanup(lab, node)
            assert cleaned.returncode == 0, cleaned.stderr[-2000:]
            lab.agent("start", node)
        # Every object was there before the agents started: their first sync programs them all. Generous:
        # a first start compiles both programs (no program cache yet), minutes on a loaded machine.
        wait_programmed(lab, "or-lb", 80, backends=1, timeout=300)
        wait_programmed(lab, "or-remote", 80, backends=1, nodes=["node-2"], timeout=300)
        wait_agents_attached(lab, [CLIENT, "or-a", "or-b", "or-c"])
        results["ebpfsvc"] = observe(lab, "ebpfsvc")
        restart_agents_with(lab, KUBE_PROXY_OPTIONS)
        results[WITH_OPTIONS] = observe(lab, WITH_OPTIONS)

        print(f"\nkube-proxy --proxy-mode={mode}\n" + table(results) + "\n" + topology_seen)
        assert not lab.endpoint_slices("or-skip-mirror"), "the mirroring controller skipped the labelled Endpoints"
        assert results["kube-proxy"] == EXPECTED, "kube-proxy v1.37.2 is not what docs/semantics.md says\n" + \
            table(results) + "\n" + topology_seen
        assert results["ebpfsvc"] == {**results["kube-proxy"], **DIFFERENCES}, \
            "ebpfsvc differs from kube-proxy other than as documented\n" + table(results)
        kept = {row: got for row, got in DIFFERENCES.items() if row not in MADE_THE_SAME_BY_OPTIONS}
        assert results[WITH_OPTIONS] == {**results["kube-proxy"], **kept}, \
            f"ebpfsvc with {KUBE_PROXY_OPTIONS} differs from kube-proxy other than as documented\n" + table(results)


# -- issue 17 item 8: externalTrafficPolicy Local traffic from pods, with a cluster CIDR -------------
#
# kube-proxy's external chain of an ETP Local Service sends sources its local-traffic detector
# matches (here: --cluster-cidr, its default ClusterCIDR mode) to the cluster-wide chain, and does
# not masquerade them. That needs a lab whose pod CIDRs share a prefix without the fabric:
# examples/lab/cluster-cidr.yaml (node-1 .65, node-2 .66, node-3 .67 in 198.18.64.0/18), whose
# agents get the same --cluster-cidr (ebpfsvc/lab/agents.py).

CC_LAB = Path(__file__).resolve().parents[2] / "examples" / "lab" / "cluster-cidr.yaml"
CC_NODES = ("node-1", "node-2", "node-3")
CC_CLIENTS = {"cc-client-1": "node-1", "cc-client-2": "node-2"}
CC_UDP_PORT = 9000
# ETP Local NodePorts: the only endpoint on node-1 (cc-a), or on node-3 (cc-c; cc-u for UDP).
CC_SERVICES = [service("cc-local-1", [{"port": 80, "targetPort": 8080, "nodePort": 30480}], selector={"pod": "cc-a"},
                       type="NodePort", externalTrafficPolicy="Local"),
               service("cc-local-3", [{"port": 80, "targetPort": 8080, "nodePort": 30481}], selector={"pod": "cc-c"},
                       type="NodePort", externalTrafficPolicy="Local"),
               service("cc-udp-3", [{"port": CC_UDP_PORT, "protocol": "UDP", "nodePort": 30482}],
                       selector={"pod": "cc-u"}, type="NodePort", externalTrafficPolicy="Local")]
CC_ROWS = {  # row -> (client pod, NodePort): always node-1's address
    "ETP Local, endpoint on node-1 only: pod on node-2 -> node-1's NodePort": ("cc-client-2", 30480),
    "ETP Local, endpoint on node-3 only: pod on node-2 -> node-1's NodePort": ("cc-client-2", 30481),
    "ETP Local, endpoint on node-3 only: pod on node-1 -> node-1's NodePort": ("cc-client-1", 30481),
}
# The TCP row above times out whether the flow was sent to node-3 (short-circuit) or dropped (Local,
# no endpoint on node-1): a UDP datagram tells them apart, since an unconnected socket takes a reply
# from any address and the answer names the backend and the source it saw.
CC_UDP_ROW = "ETP Local, endpoint on node-3 only: pod on node-2 -> node-1's UDP NodePort"
# kube-proxy v1.37.2 with --cluster-cidr (both modes): "<backend> sees <the pod | a node | the address>"
# (UDP: and whence the answer came), or refused / timeout.
CC_EXPECTED = {
    "ETP Local, endpoint on node-1 only: pod on node-2 -> node-1's NodePort": "cc-a sees the pod",
    "ETP Local, endpoint on node-3 only: pod on node-2 -> node-1's NodePort": "timeout",
    "ETP Local, endpoint on node-3 only: pod on node-1 -> node-1's NodePort": "cc-c sees the pod",
    CC_UDP_ROW: "cc-u sees the pod, answers from the backend",
}
# ebpfsvc SNATs a pod's flow that the uplink sends to another node, so the reply comes back through
# node-1 (docs/semantics.md, "Kept on purpose").
CC_DIFFERENCES = {
    "ETP Local, endpoint on node-3 only: pod on node-2 -> node-1's NodePort": "cc-c sees node-1",
    CC_UDP_ROW: "cc-u sees node-1, answers from the NodePort",
}


def who(lab: Lab, client: str, address: str) -> str:
    names_of = {lab.pod_ip(client): "the pod", **{str(n.address): n.name for n in lab.spec.nodes}}
    return names_of.get(address, address)


def seen_by_backend(lab: Lab, client: str, host: str, port: int) -> str:
    """Which backend answers `client`'s request and whom it sees as the client, or the failure."""
    try:
        body = http_get(lab, client, host, port, timeout=3)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except (OSError, ValueError) as exc:
        return type(exc).__name__
    return f"{body['pod']} sees {who(lab, client, body['client'])}"


def udp_seen_by_backend(lab: Lab, client: str, host: str, port: int) -> str:
    """One datagram from `client` on an unconnected socket: the backend, whom it saw, and whether
    the answer came from host:port (translated back) or from the backend's own address."""
    sock = udp_socket(lab, client, timeout=3)
    try:
        sock.sendto(b"hi", (host, port))
        data, source = sock.recvfrom(65535)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()
    body = json.loads(data)
    whence = {(host, port): "the NodePort", (body["podIP"], CC_UDP_PORT): "the backend"}.get(source, str(source))
    return f"{body['pod']} sees {who(lab, client, body['client'])}, answers from {whence}"


def observe_cluster_cidr(lab: Lab) -> dict[str, str]:
    got = {row: seen_by_backend(lab, client, NODE1, port) for row, (client, port) in CC_ROWS.items()}
    got[CC_UDP_ROW] = udp_seen_by_backend(lab, "cc-client-2", NODE1, 30482)
    return got


# One lab, kube-proxy in each mode (cleaned up in between), then the agents: one compile.
@pytest.mark.timeout(900)
def test_oracle_etp_local_from_pods_of_other_nodes_with_a_cluster_cidr(unique_prefix):
    with Lab.up(CC_LAB, prefix=unique_prefix, agents=False) as lab:
        assert str(lab.spec.cluster_cidr) == "198.18.64.0/18"
        lab.apply([*(bare_pod(name, node) for name, node in CC_CLIENTS.items()),
                   apps.pod("cc-a", "http-echo", 8080, node="node-1", labels={"pod": "cc-a"}),
                   apps.pod("cc-c", "http-echo", 8080, node="node-3", labels={"pod": "cc-c"}),
                   apps.pod("cc-u", "udp-echo", CC_UDP_PORT, node="node-3", labels={"pod": "cc-u"}), *CC_SERVICES])
        wait_ready(lab, ["cc-a", "cc-c", "cc-u"])
        wait_udp_bound(lab, "cc-client-2", ["cc-u"], CC_UDP_PORT)
        results: dict[str, dict[str, str]] = {}
        for mode in kubeproxy.MODES:
            began = time.monotonic()
            for node in CC_NODES:
                kubeproxy.start(lab, node, mode)
            for node in CC_NODES:
                for svc in ("cc-local-1", "cc-local-3"):
                    kubeproxy.wait_serving(lab, node, mode, cluster_ip(lab, svc), 80, since=began)
            results[f"kube-proxy {mode}"] = observe_cluster_cidr(lab)
            for node in CC_NODES:
                kubeproxy.stop(lab, node)
                cleaned = kubeproxy.cleanup(lab, node)
                assert cleaned.returncode == 0, cleaned.stderr[-2000:]
        for node in CC_NODES:
            lab.agent("start", node)
        for svc in ("cc-local-1", "cc-local-3"):
            wait_programmed(lab, svc, 80, backends=1, timeout=300)
        wait_programmed(lab, "cc-udp-3", CC_UDP_PORT, backends=1, proto="UDP")
        wait_agents_attached(lab, [*CC_CLIENTS, "cc-a", "cc-c", "cc-u"])
        results["ebpfsvc"] = observe_cluster_cidr(lab)

        width = max(map(len, CC_EXPECTED))
        text = "\n".join([f"{'scenario':<{width}}  " + "".join(f"{name:<44} " for name in results).rstrip()] +
                         [f"{row:<{width}}  " + "".join(f"{got[row]:<44} " for got in results.values()).rstrip()
                          for row in CC_EXPECTED])
        print("\n" + text)
        for mode in kubeproxy.MODES:
            assert results[f"kube-proxy {mode}"] == CC_EXPECTED, \
                f"kube-proxy v1.37.2 ({mode}) is not what docs/semantics.md says\n{text}"
        assert results["ebpfsvc"] == {**CC_EXPECTED, **CC_DIFFERENCES}, \
            f"ebpfsvc differs from kube-proxy other than as documented\n{text}"
