"""--masquerade-external-to-local-backends (issue 17 item 1): kube-proxy masquerades external
traffic under externalTrafficPolicy Cluster even to a backend on the receiving node; ebpfsvc keeps
the client's address there by default (docs/semantics.md, "Kept on purpose"), and SNATs it to the
node with the option: the uplink (bpf/lib/nodeport.h np4_keeps_client) sends the SNATed packet to
the pod's veth itself, and the pod's reply, addressed to the node, is translated back where it
leaves the pod (bpf/lib/flow.h lb4_reply_to_node -> np4_snat_reply) and sent out of the uplink.

Exact bytes through BPF_PROG_TEST_RUN, in the `uplink` fixture's namespace (node-1's view of the
fabric) with a pod veth for LOCAL_BE; both programs on the same maps, compiled as the agent
compiles them. The option off is tests/bpf/test_nodeport.py::test_nodeport_local_backend_keeps_the_client_address.
The last test sends a real TCP connection through both programs attached in namespaces of its own.
IPv6 takes the same walk, SNATed to the node's IPv6 address (np6_* / lb6_reply_to_node).
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import loader, nsenter
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName

from .northsouth import (
    CLIENT, CLIENT6, LIMITS, LOCAL_BE, LOCAL_BE6, LOCAL_POD_MAC, NODE, NODE6, REDIRECT, XDP_PASS, be,
    ext_frontend, forwarded_to_client, from_client, hop,
    local_tcp_flow, pod_veth, snat_port, to_local_pod,
)
from .packets import HAIRPIN, from_pod, tcp, tcp6
from .packets import be as any_be   # a backend of either family

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


# ---- IPv6: the same option, the node's IPv6 address (node_snat6()) as source ----------------------------

LOCAL6 = Frontend(key=FrontendKey(ip_address(NODE6), 30081, Protocol.TCP, Scope.EXTERNAL),
                  service=ServicePortName("default", "local6", "", Protocol.TCP), kind=FrontendKind.NODE_PORT,
                  backends=(any_be(LOCAL_BE6, local=True),))


@pytest.fixture
def pod_veth6(uplink, pod_veth):
    """pod_veth with LOCAL_BE6/128 routed to it too, its neighbour resolved."""
    from pyroute2 import IPRoute

    def build():
        with IPRoute() as ipr:
            ipr.route("add", dst=f"{LOCAL_BE6}/128", oif=pod_veth)
            ipr.neigh("add", dst=LOCAL_BE6, lladdr=LOCAL_POD_MAC, ifindex=pod_veth, state=0x80)  # NUD_PERMANENT

    nsenter.run_in(uplink.netns, build)
    return pod_veth


@pytest.mark.parametrize("uplink", [MASQUERADE], indirect=True)
def test_cluster_policy_to_a_local_ipv6_backend_is_masqueraded_with_the_option(uplink, pod_veth6, compiled):
    pod_side = compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE, snat6=NODE6)
    uplink.writer.apply(LBState.of([LOCAL6]))
    syn = from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "S"))
    uplink.check_xdp("XDP leaves a masqueraded local flow to TC", syn, XDP_PASS)
    uplink.check("SYN to [node]:30081, backend on this node: SNAT to the node (the client's port kept) + DNAT, "
                 "sent to the pod's veth", "from_uplink", syn, REDIRECT,
                 to_local_pod(hop(tcp6(NODE6, LOCAL_BE6, 40000, 8080, "S"))))
    assert from_pod_veth(uplink, pod_side, pod_veth6, from_pod(tcp6(LOCAL_BE6, NODE6, 8080, 40000, "SA", seq=7000,
                                                                    ack=1001))) == \
        ("TC_ACT_REDIRECT", bytes(forwarded_to_client(tcp6(NODE6, CLIENT6, 30081, 40000, "SA", seq=7000, ack=1001)))), \
        "the pod's SYN-ACK to the node: back to the client from [node]:nodePort, out of the uplink"
    segment = from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "A", seq=1001, ack=7001))
    uplink.check_xdp("a tracked segment: to TC as well", segment, XDP_PASS)
    uplink.check("the next client segment keeps its SNAT port and backend", "from_uplink", segment, REDIRECT,
                 to_local_pod(hop(tcp6(NODE6, LOCAL_BE6, 40000, 8080, "A", seq=1001, ack=7001))))
    fwd = {k.dir: v for k, v in uplink.dp.maps["ct6"].items()}[abi.CT_DIR_FORWARD]
    assert fwd.flags & abi.CT_F_NODEPORT and fwd.flags & abi.CT_F_SNAT and fwd.flags & abi.CT_F_ESTABLISHED


# ---- real traffic: the kernel's own packets through both programs, attached as the agent does ----

POD_GATEWAY = "198.18.1.1"


@pytest.fixture
def node_with_a_pod(unique_prefix, compiled):
    """Namespaces `<prefix>-mn` (node: uplink up0 198.18.0.11/24, pod veth h-pod), `<prefix>-mc`
    (the external client 198.18.0.100 on up0's peer) and `<prefix>-mp` (the pod LOCAL_BE, default
    route via the node); the pod programs on h-pod, removed afterwards (also on failure).
    Yields (namespaces, attach_uplink(dp)): the test attaches the uplink programs it compiled."""
    from pyroute2 import netns as netns_mod
    from ebpfsvc.datapath import tc

    node, client, pod = f"{unique_prefix}-mn", f"{unique_prefix}-mc", f"{unique_prefix}-mp"
    made: list[str] = []
    try:
        for ns in (node, client, pod):
            netns_mod.create(ns)
            made.append(ns)
        nsenter.write_sysctls(node, {"net.ipv4.ip_forward": 1})
        pod_side = compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE)

        def build_node(ipr):
            for host, peer_ns, addr in (("up0", client, NODE), ("h-pod", pod, POD_GATEWAY)):
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": peer_ns})
                idx = ipr.link_lookup(ifname=host)[0]
                ipr.addr("add", index=idx, address=addr, prefixlen=24)
                ipr.link("set", index=idx, state="up")
            return {name: ipr.link_lookup(ifname=name)[0] for name in ("up0", "h-pod")}

        links = nsenter.netlink(node, build_node)
        tc.attach(links["h-pod"], pod_side.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=node)
        tc.attach(links["h-pod"], pod_side.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns=node)
        for ns, addr, gateway in ((client, CLIENT, None), (pod, LOCAL_BE, POD_GATEWAY)):
            def build(ipr, addr=addr, gateway=gateway):
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=idx, address=addr, prefixlen=24)
                ipr.link("set", index=idx, state="up")
                if gateway:
                    ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=idx)
            nsenter.netlink(ns, build)

        def attach_uplink(dp):
            tc.attach(links["up0"], dp.programs["from_uplink"].fd, "from_uplink", tc.INGRESS, netns=node)
            tc.attach(links["up0"], dp.programs["to_uplink"].fd, "to_uplink", tc.EGRESS, netns=node)

        yield (node, client, pod), attach_uplink
    finally:
        for ns in made:
            netns_mod.remove(ns)


def peer_seen_by_the_pod(client_ns: str, pod_ns: str, attempts: int = 3) -> str:
    """One TCP connection from the client to NODE:30081; the address the pod's server saw it from
    (its answer), or the error. A bounded number of tries: the first SYN may wait on ARP."""
    import socket
    import threading

    server = nsenter.socket_in(pod_ns, socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOCAL_BE, 8080))
    server.listen(4)
    server.settimeout(30)

    def serve():
        try:
            conn, peer = server.accept()
            with conn:
                conn.sendall(peer[0].encode())
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        last = ""
        for _ in range(attempts):
            c = nsenter.socket_in(client_ns, socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(10)
            try:
                c.connect((NODE, 30081))
                return c.recv(64).decode()
            except OSError as exc:
                last = type(exc).__name__
            finally:
                c.close()
        return last
    finally:
        server.close()
        thread.join(timeout=30)


@pytest.mark.parametrize("masquerade", [False, True], ids=["default", "masquerade"])
def test_a_real_connection_to_a_local_backend_sees_the_client_or_the_node(node_with_a_pod, compiled, masquerade):
    """Real sockets, the kernel's own packets (ARP, checksum offloads): an external client's
    connection to NodePort 30081 (externalTrafficPolicy Cluster, its one backend on this node)
    reaches the pod from the client's address by default, and from the node's with the option,
    and the pod's answer comes back either way."""
    (_, client_ns, pod_ns), attach_uplink = node_with_a_pod
    dp = compiled.load(LIMITS, hairpin_addr=HAIRPIN, source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS,
                       snat_addr=NODE, masquerade_external_to_local_backends=masquerade)
    MapWriter(dp.maps).apply(LBState.of([LOCAL]))
    attach_uplink(dp)
    assert peer_seen_by_the_pod(client_ns, pod_ns) == (NODE if masquerade else CLIENT)
