"""--masquerade-external-to-local-backends (issue 17 item 1): kube-proxy masquerades external
traffic under externalTrafficPolicy Cluster even to a backend on the receiving node; ebpfsvc keeps
the client's address there by default (docs/semantics.md, "Kept on purpose"), and SNATs it to the
node with the option: the uplink (bpf/lib/nodeport.h np4_keeps_client) sends the SNATed packet to
the pod's veth itself, and the pod's reply, addressed to the node, is translated back where it
leaves the pod (bpf/lib/flow.h lb4_reply_to_node -> np4_snat_reply) and sent out of the uplink.

Exact bytes through BPF_PROG_TEST_RUN, in the `uplink` fixture's namespace (node-1's view of the
fabric) with a pod veth for LOCAL_BE; both programs on the same maps, compiled as the agent
compiles them. The option off is tests/bpf/test_nodeport.py::test_nodeport_local_backend_keeps_the_client_address.
"""

from __future__ import annotations

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import nsenter
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.lbmodel import LBState

from .northsouth import (
    CLIENT, LIMITS, LOCAL_BE, NODE, OK, REDIRECT, XDP_PASS, be, ext_frontend, forwarded_to_client, from_client, hop,
    local_tcp_flow, pod_veth, snat_port, to_local_pod,
)
from .packets import HAIRPIN, from_pod, tcp

pytestmark = pytest.mark.root

MASQUERADE = {"masquerade_external_to_local_backends": True}
LOCAL = ext_frontend(NODE, 30081, [be(LOCAL_BE, local=True)], name="local")
LOCAL_POLICY = ext_frontend(NODE, 30082, [be(LOCAL_BE, local=True)], local_only=True, name="etp-local")

__all__ = ["pod_veth"]      # a fixture


@pytest.fixture
def pod_side(uplink, compiled):
    """The pod programs (lb_pod.c) on the uplink's maps, with the node address compiled in, as the
    agent compiles them when the option is on."""
    return compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE)


def from_pod_veth(uplink, pod_side, ifindex, packet):
    """from_pod on the pod veth (skb->ifindex), in the test namespace, where its FIB lookup runs."""
    fd = pod_side.programs["from_pod"].fd
    res = nsenter.run_in(uplink.netns, lambda: prog_test_run(fd, bytes(packet), ifindex=ifindex))
    return res.verdict, res.data


@pytest.mark.parametrize("uplink", [MASQUERADE], indirect=True)
def test_cluster_policy_to_a_local_backend_is_masqueraded_with_the_option(uplink, pod_veth, pod_side):
    uplink.writer.apply(LBState.of([LOCAL]))
    port = snat_port(CLIENT, NODE, 40000, 30081)
    uplink.check("SYN to the NodePort, backend on this node: SNAT to the node + DNAT, sent to the pod's veth",
                 "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30081, "S")), REDIRECT,
                 to_local_pod(hop(tcp(NODE, LOCAL_BE, port, 8080, "S"))))
    sent = to_local_pod(hop(tcp(NODE, LOCAL_BE, port, 8080, "S")))
    res = prog_test_run(pod_side.programs["to_pod"].fd, bytes(sent))
    assert (res.verdict, res.data) == ("TC_ACT_OK", bytes(sent)), "to_pod on the veth leaves the SNATed SYN alone"
    assert from_pod_veth(uplink, pod_side, pod_veth, from_pod(tcp(LOCAL_BE, NODE, 8080, port, "SA", seq=7000,
                                                                  ack=1001))) == \
        ("TC_ACT_REDIRECT", bytes(forwarded_to_client(tcp(NODE, CLIENT, 30081, 40000, "SA", seq=7000, ack=1001)))), \
        "the pod's SYN-ACK to the node: back to the client from node:nodePort, out of the uplink"
    uplink.check("the next client segment keeps its SNAT port and backend", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30081, "A", seq=1001, ack=7001)), REDIRECT,
                 to_local_pod(hop(tcp(NODE, LOCAL_BE, port, 8080, "A", seq=1001, ack=7001))))
    fwd = {k.dir: v for k, v in uplink.dp.maps["ct4"].items()}[abi.CT_DIR_FORWARD]
    assert fwd.flags & abi.CT_F_NODEPORT and fwd.flags & abi.CT_F_SNAT and fwd.flags & abi.CT_F_ESTABLISHED


@pytest.mark.parametrize("uplink", [MASQUERADE], indirect=True)
def test_local_policy_keeps_the_client_address_with_the_option(uplink):
    """externalTrafficPolicy Local keeps the client's address whatever the option (kube-proxy too)."""
    uplink.writer.apply(LBState.of([LOCAL_POLICY]))
    local_tcp_flow(uplink, NODE, 30082)


@pytest.mark.parametrize("uplink", [MASQUERADE], indirect=True)
def test_xdp_leaves_a_masqueraded_local_flow_to_tc(uplink, pod_veth):
    """XDP cannot hand a frame to a veth whose pod runs no XDP program: the flow's packets pass to
    TC, which sends them (the first and a tracked one)."""
    uplink.writer.apply(LBState.of([LOCAL]))
    syn = from_client(tcp(CLIENT, NODE, 40001, 30081, "S"))
    uplink.check_xdp("SYN: passed untouched", syn, XDP_PASS)
    port = snat_port(CLIENT, NODE, 40001, 30081)
    uplink.check("TC serves it", "from_uplink", syn, REDIRECT, to_local_pod(hop(tcp(NODE, LOCAL_BE, port, 8080, "S"))))
    uplink.check_xdp("a tracked segment: passed untouched too",
                     from_client(tcp(CLIENT, NODE, 40001, 30081, "A", seq=1001)), XDP_PASS)
