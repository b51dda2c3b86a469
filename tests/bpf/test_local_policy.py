"""Traffic policy Local without a local endpoint, from the real control plane to the packet: the
state comes from desired_state() over parsed objects, written by the real MapWriter, and
BPF_PROG_TEST_RUN shows what a client gets (exact bytes).

kube-proxy v1.37.2 (hasAnyEndpoints in CategorizeEndpoints): a Service with no usable endpoint
anywhere is rejected (TCP RST / ICMP port unreachable) whatever its policies; a Local policy
drops only when endpoints exist on other nodes (this node has none to give)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from ebpfsvc import abi
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath import stats
from ebpfsvc.desired import desired_state
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

from . import northsouth as ns
from .packets import CLIENT, OK, REDIRECT, SHOT, VIP, Case, check, from_pod, tcp, to_pod, udp
from .test_reject import port_unreachable

pytestmark = pytest.mark.root

NODE_PORT = 30420


def snapshot(endpoint_node: str | None, protocol: str = "TCP"):
    """A NodePort Service with both policies Local; its one endpoint on `endpoint_node` (None: the
    slice lists it not ready, so no usable endpoint anywhere)."""
    ready = endpoint_node is not None
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"type": "NodePort", "clusterIP": VIP, "internalTrafficPolicy": "Local",
                  "externalTrafficPolicy": "Local",
                  "ports": [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT, "protocol": protocol}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "", "protocol": protocol, "port": 8080}],
         "endpoints": [{"addresses": [ns.REMOTE_BE], "conditions": {"ready": ready},
                        "nodeName": endpoint_node or "node-2"}]},
    ]
    state = ClusterState(NodeConfig("any"))
    for doc in docs:
        state.on_event(Event(doc["kind"], EventType.ADDED, doc))
    assert state.problems == []
    return state.snapshot()


NODE1 = NodeConfig("node-1", node_addresses=(ns.A(ns.NODE),))


def test_internal_policy_local_from_a_pod(datapath, writer):
    writer.apply(desired_state(snapshot(None), NODE1))
    check(datapath, Case("itp=Local, no endpoint anywhere: RST+ACK from the clusterIP", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000)), REDIRECT,
                         to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64) /
                                TCP(sport=80, dport=40000, seq=0, ack=1001, flags="RA", window=0))))
    assert (stats.drops(datapath.maps)["no_backend"], stats.drops(datapath.maps)["no_local_backend"]) == (1, 0)
    writer.apply(desired_state(snapshot("node-2"), NODE1))
    check(datapath, Case("itp=Local, the endpoint on node-2: dropped here", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40001, 80, "S")), SHOT))
    assert (stats.drops(datapath.maps)["no_backend"], stats.drops(datapath.maps)["no_local_backend"]) == (1, 1)
    writer.apply(desired_state(snapshot("node-1"), NODE1))
    check(datapath, Case("itp=Local, the endpoint on node-1: served (not our concern here)", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40002, 80, "S")), OK,
                         from_pod(tcp(CLIENT, ns.REMOTE_BE, 40002, 8080, "S"))))


def test_internal_policy_local_udp_from_a_pod(datapath, writer):
    writer.apply(desired_state(snapshot(None, "UDP"), NODE1))
    query = udp(CLIENT, VIP, 5000, 80, b"q" * 16)
    check(datapath, Case("itp=Local UDP, no endpoint anywhere: ICMP port unreachable from the clusterIP",
                         "from_pod", from_pod(query), REDIRECT, port_unreachable(query)))
    writer.apply(desired_state(snapshot("node-2", "UDP"), NODE1))
    check(datapath, Case("itp=Local UDP, the endpoint on node-2: dropped here", "from_pod",
                         from_pod(udp(CLIENT, VIP, 5001, 80)), SHOT))
    assert (stats.drops(datapath.maps)["no_backend"], stats.drops(datapath.maps)["no_local_backend"]) == (1, 1)


def test_external_policy_local_at_the_uplink(uplink):
    uplink.writer.apply(desired_state(snapshot(None), NODE1))
    uplink.check("etp=Local, no endpoint anywhere: RST from NodeIP:nodePort, back out the uplink", "from_uplink",
                 ns.from_client(tcp(ns.CLIENT, ns.NODE, 40000, NODE_PORT, "S", seq=5)), REDIRECT,
                 ns.to_client(IP(src=ns.NODE, dst=ns.CLIENT, id=0) /
                              TCP(sport=NODE_PORT, dport=40000, flags="RA", seq=0, ack=6, window=0)))
    assert (uplink.drops(abi.REASON_NO_BACKEND), uplink.drops(abi.REASON_NO_LOCAL_BACKEND)) == (1, 0)
    uplink.writer.apply(desired_state(snapshot("node-2"), NODE1))
    uplink.check("etp=Local, the endpoint on node-2: dropped here (the load balancer's health check "
                 "steers clients away)", "from_uplink",
                 ns.from_client(tcp(ns.CLIENT, ns.NODE, 40001, NODE_PORT, "S")), SHOT)
    assert (uplink.drops(abi.REASON_NO_BACKEND), uplink.drops(abi.REASON_NO_LOCAL_BACKEND)) == (1, 1)
