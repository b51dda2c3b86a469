"""North-south translation on the uplink (bpf/lb_node.c, TC) through BPF_PROG_TEST_RUN:
NodePort to a local and a remote backend, SNAT and its reverse, Local policy,
externalIPs, SNAT port collisions, ICMP errors, and what must pass untouched.

Maps are filled through MapWriter.apply(LBState) only; every row names its input
packet, the exact output packet (MACs from the test namespace's neighbours when
the program redirects) and the verdict.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from ebpfsvc import abi
from ebpfsvc.lbmodel import FrontendKind, LBState, Protocol

from .northsouth import (
    CLIENT, CLIENT2, CLIENT2_MAC, CLUSTER_CIDR, EXT_IP, LOCAL_BE, LOCAL_BE2, NODE, NODE2, NODE2_POD, OK, REDIRECT,
    REMOTE_BE, SHOT, be, ext_frontend, forwarded_to_client, from_client, from_node2,
    local_policy_with_only_a_remote_endpoint, local_tcp_flow, remote_tcp_flow, remote_udp_exchange, snat_port,
    to_client, to_node2,
)
from .packets import expected_backend, tcp, udp

pytestmark = pytest.mark.root

REMOTE = ext_frontend(NODE, 30080, [be(REMOTE_BE)])
LOCAL = ext_frontend(NODE, 30081, [be(LOCAL_BE, local=True)], name="local")
MIXED_LOCAL_POLICY = ext_frontend(NODE, 30082, [be(LOCAL_BE, local=True), be(LOCAL_BE2, local=True)],
                                  local_only=True, name="etp-local")
EMPTY_LOCAL_POLICY = ext_frontend(NODE, 30083, [], local_only=True, name="etp-local-empty")
EMPTY_CLUSTER = ext_frontend(NODE, 30084, [], name="empty")
EXTERNAL_IP = ext_frontend(EXT_IP, 80, [be(LOCAL_BE, local=True)], kind=FrontendKind.EXTERNAL_IP, name="ext")
DNS = ext_frontend(NODE, 30053, [be(REMOTE_BE, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")


def state(*fes) -> LBState:
    return LBState.of(fes)


def test_nodeport_remote_backend_is_snated_and_the_reply_reversed(uplink):
    uplink.writer.apply(state(REMOTE))
    port = remote_tcp_flow(uplink, NODE, 30080)
    uplink.check("the egress program leaves SNATed packets alone", "to_uplink",
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "A")), OK)


def _snated_flow_whose_backend_is_removed(uplink):
    """A NodePort TCP flow SNATed to REMOTE_BE, established; then REMOTE_BE leaves the Service.
    The flow's next client segment and its SNAT port."""
    uplink.writer.apply(state(REMOTE))
    port = snat_port(CLIENT, NODE, 40000, 30080)
    uplink.check("SYN", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    uplink.check("SYN-ACK", "from_uplink", from_node2(tcp(REMOTE_BE, NODE, 8080, port, "SA", seq=7000, ack=1001)),
                 REDIRECT, forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "SA", seq=7000, ack=1001)))
    uplink.writer.apply(state(ext_frontend(NODE, 30080, [be(LOCAL_BE, local=True)])))
    assert uplink.writer.backend_id(be(REMOTE_BE)) is None
    return from_client(tcp(CLIENT, NODE, 40000, 30080, "PA", seq=1001, ack=7001, payload=b"data")), port


def test_nodeport_removed_backend_resets_tcp(uplink):
    seg, _ = _snated_flow_whose_backend_is_removed(uplink)
    uplink.check("the next segment: RST from NodeIP:nodePort", "from_uplink", seg, REDIRECT,
                 to_client(IP(src=NODE, dst=CLIENT, id=0, ttl=64) /
                           TCP(sport=30080, dport=40000, flags="R", seq=7001, ack=0, window=0)))
    assert uplink.drops(abi.REASON_BACKEND_GONE) == 1


@pytest.mark.parametrize("uplink", [{"reset_removed_endpoint_tcp": False}], indirect=True)
def test_nodeport_removed_backend_keeps_tcp_with_the_option(uplink):
    """--no-reset-removed-endpoint-tcp: the SNATed flow goes on to the removed backend, both ways,
    as kube-proxy leaves its conntrack entry."""
    seg, port = _snated_flow_whose_backend_is_removed(uplink)
    uplink.check("the next segment: still to REMOTE_BE, same SNAT port", "from_uplink", seg, REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "PA", seq=1001, ack=7001, payload=b"data")))
    uplink.check("its reply: back to the client", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, port, "A", seq=7001, ack=1005)), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "A", seq=7001, ack=1005)))
    assert uplink.drops(abi.REASON_BACKEND_GONE) == 0


def test_nodeport_udp_snat(uplink):
    uplink.writer.apply(state(DNS))
    remote_udp_exchange(uplink, NODE, 30053)


def test_nodeport_local_backend_keeps_the_client_address(uplink):
    uplink.writer.apply(state(LOCAL))
    local_tcp_flow(uplink, NODE, 30081)


def test_local_policy_balances_over_local_backends_only(uplink):
    uplink.writer.apply(state(MIXED_LOCAL_POLICY))
    for sport in (41000, 41001, 41002, 41003):
        b = expected_backend(MIXED_LOCAL_POLICY, CLIENT, sport)
        uplink.check(f"Local policy, flow {sport}: DNAT to {b}, client kept", "from_uplink",
                     from_client(tcp(CLIENT, NODE, sport, 30082, "S")), OK,
                     from_client(tcp(CLIENT, b, sport, 8080, "S")))


def test_local_policy_without_local_backend_drops_and_counts(uplink):
    uplink.writer.apply(state(EMPTY_LOCAL_POLICY))
    before = uplink.drops(abi.REASON_NO_LOCAL_BACKEND)
    uplink.check("Local policy, no backend on this node: dropped, not forwarded, not rejected", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30083, "S")), SHOT)
    assert uplink.drops(abi.REASON_NO_LOCAL_BACKEND) == before + 1


def test_cluster_policy_without_backends_is_rejected(uplink):
    uplink.writer.apply(state(EMPTY_CLUSTER))
    uplink.check("no endpoints at all: RST from NodeIP:nodePort, back out the uplink", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30084, "S", seq=5)), REDIRECT,
                 to_client(IP(src=NODE, dst=CLIENT, id=0) / TCP(sport=30084, dport=40000, flags="RA", seq=0, ack=6,
                                                                 window=0)))


def test_external_ip(uplink):
    uplink.writer.apply(state(EXTERNAL_IP))
    local_tcp_flow(uplink, EXT_IP, 80)


def test_a_tcp_flow_keeps_the_client_port_and_two_clients_never_share_it(uplink):
    """The first client keeps its own source port (so the backend's TIME_WAIT for that port
    belongs to this client's earlier connection, whose timestamps it continues); a second
    client from the same port cannot have it and gets the range port its hash names."""
    uplink.writer.apply(state(REMOTE))
    second = snat_port(CLIENT2, NODE, 40000, 30080, probe=0)
    assert abi.SNAT_PORT_MIN <= second <= abi.SNAT_PORT_MAX
    uplink.check("first client keeps port 40000", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, 40000, 8080, "S")))
    uplink.check("second client, same port: a port of the SNAT range", "from_uplink",
                 from_client(tcp(CLIENT2, NODE, 40000, 30080, "S"), mac=CLIENT2_MAC), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, second, 8080, "S")))
    uplink.check("each reply finds its own client (first)", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, 40000, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "SA")))
    uplink.check("each reply finds its own client (second)", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, second, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT2, 30080, 40000, "SA"), mac=CLIENT2_MAC))
    uplink.check("a client port below SNAT_KEEP_PORT_MIN is never kept", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 1023, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, snat_port(CLIENT, NODE, 1023, 30080), 8080, "S")))


@pytest.mark.parametrize("uplink", [{"snat_keep_client_port": False}], indirect=True)
def test_keeping_the_client_port_can_be_turned_off(uplink):
    """--no-nodeport-snat-keep-client-port: every SNATed flow gets a port of the range."""
    uplink.writer.apply(state(REMOTE))
    port = snat_port(CLIENT, NODE, 40000, 30080, probe=0)
    assert port != 40000
    uplink.check("SYN: a range port although 40000 is free", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    uplink.check("its reply finds the client", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, port, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "SA")))


def test_two_clients_never_share_a_range_port(uplink):
    """Datagram flows take range ports by hash: two that hash alike get different ports."""
    uplink.writer.apply(state(DNS))
    first = snat_port(CLIENT, NODE, 5000, 30053, 17)
    sport = next(p for p in range(1024, 65536) if snat_port(CLIENT2, NODE, p, 30053, 17) == first)
    uplink.check("first client takes the port its hash names", "from_uplink",
                 from_client(udp(CLIENT, NODE, 5000, 30053, b"q1")), REDIRECT,
                 to_node2(udp(NODE, REMOTE_BE, first, 5353, b"q1")))
    second = snat_port(CLIENT2, NODE, sport, 30053, 17, probe=1)
    assert second != first
    uplink.check("second client, same hash: the next free port", "from_uplink",
                 from_client(udp(CLIENT2, NODE, sport, 30053, b"q2"), mac=CLIENT2_MAC), REDIRECT,
                 to_node2(udp(NODE, REMOTE_BE, second, 5353, b"q2")))
    uplink.check("each answer finds its own client (first)", "from_uplink",
                 from_node2(udp(REMOTE_BE, NODE, 5353, first, b"a1")), REDIRECT,
                 forwarded_to_client(udp(NODE, CLIENT, 30053, 5000, b"a1")))
    uplink.check("each answer finds its own client (second)", "from_uplink",
                 from_node2(udp(REMOTE_BE, NODE, 5353, second, b"a2")), REDIRECT,
                 forwarded_to_client(udp(NODE, CLIENT2, 30053, sport, b"a2"), mac=CLIENT2_MAC))


@pytest.mark.parametrize("close", ["reset by the backend", "FIN both ways"])
def test_a_closed_flows_snat_port_is_reused_at_once(uplink, close):
    """A busy NodePort must not wait CT_TIMEOUT_TCP_CLOSE_S for each closed flow's port."""
    uplink.writer.apply(state(REMOTE))
    first = snat_port(CLIENT, NODE, 40000, 30080)
    sport = 40000                    # the second client wants the same port
    uplink.check("first client keeps its port", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, first, 8080, "S")))
    uplink.check("SYN-ACK", "from_uplink", from_node2(tcp(REMOTE_BE, NODE, 8080, first, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "SA")))
    if close == "reset by the backend":
        uplink.check("the backend resets it", "from_uplink",
                     from_node2(tcp(REMOTE_BE, NODE, 8080, first, "R")), REDIRECT,
                     forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "R")))
    else:
        uplink.check("client FIN", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30080, "FA")), REDIRECT,
                     to_node2(tcp(NODE, REMOTE_BE, first, 8080, "FA")))
        uplink.check("backend FIN", "from_uplink", from_node2(tcp(REMOTE_BE, NODE, 8080, first, "FA")), REDIRECT,
                     forwarded_to_client(tcp(NODE, CLIENT, 30080, 40000, "FA")))
    uplink.check("a second client from that port gets it: the flow holding it is closed",
                 "from_uplink", from_client(tcp(CLIENT2, NODE, sport, 30080, "S"), mac=CLIENT2_MAC), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, first, 8080, "S")))
    uplink.check("and the reply on that port finds the second client", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, first, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT2, 30080, sport, "SA"), mac=CLIENT2_MAC))


def test_a_packet_we_forward_loses_a_hop_and_one_without_hops_left_is_dropped(uplink):
    """bpf_redirect skips the kernel's ip_forward, so the datapath does its TTL work: every
    packet it sends on itself leaves with TTL - 1 (checked above: to_node2 / forwarded_to_client);
    one that arrived with TTL 1 is not forwarded (routing loops end) and is counted."""
    uplink.writer.apply(state(REMOTE))
    before = uplink.drops(abi.REASON_TTL_EXCEEDED)
    uplink.check("TTL 1 to a SNATed NodePort: not forwarded", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S", ttl=1)), SHOT)
    assert uplink.drops(abi.REASON_TTL_EXCEEDED) == before + 1
    uplink.check("TTL 2: forwarded with TTL 1", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40001, 30080, "S", ttl=2)), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, 40001, 8080, "S", ttl=2)))


def _frag_needed(src, quoted):
    return IP(src=src, dst=NODE, id=9) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(quoted))


@pytest.mark.parametrize("sender", ["router", "backend"])
def test_icmp_error_about_a_snated_flow_reaches_the_client(uplink, sender):
    uplink.writer.apply(state(REMOTE))
    port = snat_port(CLIENT, NODE, 40000, 30080)
    uplink.check("SYN", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    payload = b"x" * 64
    src = NODE2 if sender == "router" else REMOTE_BE
    quoted_sent = tcp(NODE, REMOTE_BE, port, 8080, "PA", seq=1001, payload=payload)
    quoted_client = tcp(CLIENT, NODE, 40000, 30080, "PA", seq=1001, payload=payload)
    out_src = NODE2 if sender == "router" else NODE
    want = IP(src=out_src, dst=CLIENT, id=9) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(quoted_client))
    uplink.check(f"fragmentation needed from the {sender}: about client -> NodePort, sent to the client",
                 "from_uplink", from_node2(_frag_needed(src, quoted_sent)), REDIRECT, forwarded_to_client(want))


UNTOUCHED = [
    ("TCP to another port of the node address (ssh)", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 22, "S"))),
    ("UDP to the NodePort number of a TCP-only frontend", "from_uplink",
     from_client(udp(CLIENT, NODE, 40000, 30080))),
    ("TCP to a node address port that is a nodePort of nobody", "from_uplink",
     from_client(tcp(CLIENT, NODE, 40000, 30999, "S"))),
    ("ICMP echo to the node", "from_uplink", from_client(IP(src=CLIENT, dst=NODE) / ICMP())),
    ("a packet to the SNAT port range with no flow", "from_uplink",
     from_node2(tcp(REMOTE_BE, NODE, 8080, 61234, "SA"))),
    ("pod-to-pod traffic arriving from node-2", "from_uplink", from_node2(tcp(REMOTE_BE, LOCAL_BE, 8080, 40000))),
    ("the node's own traffic leaving", "to_uplink", to_client(tcp(NODE, CLIENT, 22, 40000, "SA"))),
]


@pytest.mark.parametrize("row", UNTOUCHED, ids=[r[0] for r in UNTOUCHED])
def test_untouched(uplink, row):
    uplink.writer.apply(state(REMOTE, LOCAL))
    desc, prog, pkt = row
    uplink.check(desc, prog, pkt, OK)


def test_a_direct_connection_reusing_a_closed_flows_ports_is_not_translated(uplink):
    """The client reaches the pod directly (routed) with the ports of a NodePort flow that has
    closed: the pod's SYN-ACK matches the old flow's reply entry but must leave untouched."""
    uplink.writer.apply(state(LOCAL))
    steps = [
        ("from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30081, "S")), from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "S"))),
        ("to_uplink", to_client(tcp(LOCAL_BE, CLIENT, 8080, 40000, "FA")), to_client(tcp(NODE, CLIENT, 30081, 40000, "FA"))),
        ("from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30081, "FA")), from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "FA"))),
    ]
    for prog, pkt, want in steps:
        uplink.check("NodePort flow, closed with FIN both ways", prog, pkt, OK, want)
    uplink.check("SYN-ACK of a direct connection with the same ports: untouched", "to_uplink",
                 to_client(tcp(LOCAL_BE, CLIENT, 8080, 40000, "SA")), OK)


def test_icmp_error_from_a_local_backend_leaves_about_the_frontend(uplink):
    """The local pod answers a datagram with port unreachable: the error leaves the uplink
    from NodeIP, about the client's datagram to NodeIP:nodePort (lb4_icmp_error_rev_nat)."""
    fe = ext_frontend(NODE, 30054, [be(LOCAL_BE, 5353, Protocol.UDP, local=True)], proto=Protocol.UDP, name="dns-l")
    uplink.writer.apply(state(fe))
    uplink.check("datagram to NodePort, local backend", "from_uplink",
                 from_client(udp(CLIENT, NODE, 5000, 30054, b"q")), OK,
                 from_client(udp(CLIENT, LOCAL_BE, 5000, 5353, b"q")))
    quoted = bytes(udp(CLIENT, LOCAL_BE, 5000, 5353, b"q"))
    quoted_client = bytes(udp(CLIENT, NODE, 5000, 30054, b"q"))
    uplink.check("port unreachable from the pod", "to_uplink",
                 to_client(IP(src=LOCAL_BE, dst=CLIENT, id=3) / ICMP(type=3, code=3) / Raw(quoted)), OK,
                 to_client(IP(src=NODE, dst=CLIENT, id=3) / ICMP(type=3, code=3) / Raw(quoted_client)))


def test_icmp_error_about_a_reply_reaches_a_local_backend(uplink):
    """Fragmentation needed on the way back to the client, about a reply that left as
    NodeIP:nodePort -> client: the pod must see it about its own packet, addressed to it."""
    uplink.writer.apply(state(LOCAL))
    uplink.check("SYN", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30081, "S")), OK,
                 from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "S")))
    reply = tcp(NODE, CLIENT, 30081, 40000, "PA", seq=9, payload=b"z" * 64)
    err = IP(src="198.18.0.1", dst=NODE, id=5) / ICMP(type=3, code=4, nexthopmtu=1280) / Raw(bytes(reply))
    want = IP(src="198.18.0.1", dst=LOCAL_BE, id=5) / ICMP(type=3, code=4, nexthopmtu=1280) / \
        Raw(bytes(tcp(LOCAL_BE, CLIENT, 8080, 40000, "PA", seq=9, payload=b"z" * 64)))
    uplink.check("frag needed about the reply: to the pod, about the pod's packet", "from_uplink",
                 from_client(err), OK, from_client(want))


def test_icmp_error_about_a_reply_reaches_a_remote_backend(uplink):
    """The same for a SNATed flow: the error goes to node-2's backend, from this node, about
    backend -> node:SNAT port (the packet the backend sent)."""
    uplink.writer.apply(state(REMOTE))
    port = snat_port(CLIENT, NODE, 40000, 30080)
    uplink.check("SYN", "from_uplink", from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    reply = tcp(NODE, CLIENT, 30080, 40000, "PA", seq=9, payload=b"z" * 64)
    err = IP(src=CLIENT, dst=NODE, id=5) / ICMP(type=3, code=3) / Raw(bytes(reply))
    want = IP(src=NODE, dst=REMOTE_BE, id=5) / ICMP(type=3, code=3) / \
        Raw(bytes(tcp(REMOTE_BE, NODE, 8080, port, "PA", seq=9, payload=b"z" * 64)))
    uplink.check("port unreachable from the client about the reply: to node-2's backend", "from_uplink",
                 from_client(err), REDIRECT, to_node2(want))


def test_a_connection_kube_proxy_translated_is_left_to_the_kernel(uplink):
    """A NodePort connection from before the takeover: kube-proxy's rules DNATed (and, for a remote
    backend, masqueraded) it, nf_conntrack holds that, ebpfsvc has no entry. Its segments pass
    untouched, to a remote or a local backend alike, and so do the masqueraded replies: the kernel
    goes on translating both ways. A SYN still starts a flow of ebpfsvc's own."""
    uplink.writer.apply(state(REMOTE, LOCAL))
    for desc, pkt in [
        ("ACK to a NodePort of a remote backend",
         from_client(tcp(CLIENT, NODE, 40000, 30080, "A", seq=1001, ack=7001))),
        ("data to a NodePort of a local backend",
         from_client(tcp(CLIENT, NODE, 40001, 30081, "PA", seq=1001, ack=7001, payload=b"more"))),
        ("FIN", from_client(tcp(CLIENT, NODE, 40000, 30080, "FA", seq=1005, ack=7001))),
        ("the backend's reply to kube-proxy's masquerade port", from_node2(tcp(REMOTE_BE, NODE, 8080, 40000, "A"))),
    ]:
        uplink.check(f"{desc}, no ebpfsvc conntrack: untouched", "from_uplink", pkt, OK)
    assert list(uplink.dp.maps["ct4"].items()) == [] and list(uplink.dp.maps["lb4_snat"].items()) == []
    port = snat_port(CLIENT, NODE, 40002, 30080)
    uplink.check("a SYN: ebpfsvc's flow, SNAT + DNAT", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40002, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))


# ---- externalTrafficPolicy Local and pods of other nodes (--cluster-cidr, issue 17 item 3) ------

def _local_policy_with_only_a_remote_endpoint():
    return state(*local_policy_with_only_a_remote_endpoint())


@pytest.mark.parametrize("uplink", [{"cluster_cidr": CLUSTER_CIDR}], indirect=True)
def test_local_policy_sends_pods_of_other_nodes_to_cluster_endpoints_with_a_cluster_cidr(uplink):
    """kube-proxy (--cluster-cidr, detect-local-mode ClusterCIDR): "pod traffic" to a Local-policy
    external address goes to the cluster-wide endpoints; anyone else still gets the Local set."""
    uplink.writer.apply(_local_policy_with_only_a_remote_endpoint())
    port = snat_port(NODE2_POD, NODE, 40000, 30085)
    uplink.check("a pod of node-2 -> node-1's NodePort: the cluster-wide endpoint, SNATed so the reply comes back",
                 "from_uplink", from_node2(tcp(NODE2_POD, NODE, 40000, 30085, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    uplink.check("its reply: back to the pod from node:nodePort", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, port, "SA", seq=7000, ack=1001)), REDIRECT,
                 to_node2(tcp(NODE, NODE2_POD, 30085, 40000, "SA", seq=7000, ack=1001)))
    before = uplink.drops(abi.REASON_NO_LOCAL_BACKEND)
    uplink.check("the external client (not in the cluster CIDR): Local, no endpoint here: dropped", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30085, "S")), SHOT)
    assert uplink.drops(abi.REASON_NO_LOCAL_BACKEND) == before + 1


def test_local_policy_without_a_cluster_cidr_is_local_for_pods_of_other_nodes_too(uplink):
    """No --cluster-cidr (kube-proxy's default: its local-traffic detector is a no-op): Local for all."""
    uplink.writer.apply(_local_policy_with_only_a_remote_endpoint())
    uplink.check("a pod of node-2 -> node-1's NodePort: no endpoint here: dropped", "from_uplink",
                 from_node2(tcp(NODE2_POD, NODE, 40000, 30085, "S")), SHOT)
