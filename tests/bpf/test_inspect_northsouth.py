"""`ebpfsvc why --scope external` against the real uplink program (bpf/lb_node.c
from_uplink, run in the north-south test namespace), for IPv4 and IPv6: the backend
it names is where the packet goes, the SNAT decision matches the packet's new source,
and loadBalancerSourceRanges and Local-policy refusals match the program's drop."""

from __future__ import annotations

import ipaddress
import json

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ebpfsvc.cli import main
from ebpfsvc.inspect.node import NodeMaps, hostport
from ebpfsvc.lbmodel import FrontendKind, LBState

from .northsouth import (
    CLIENT, CLIENT2, CLIENT2_6, CLIENT2_MAC, CLIENT6, CLUSTER_CIDR, LB_IP, LB_IP6, LOCAL_BE, LOCAL_BE6, NODE, NODE2_POD,
    NODE6, REMOTE_BE, REMOTE_BE2, REMOTE_BE6, be, ext_frontend, from_client, from_node2,
    local_policy_with_only_a_remote_endpoint, pod_veth,
)
from .packets import tcp, tcp6

pytestmark = pytest.mark.root
__all__ = ["pod_veth"]      # a fixture

MIXED = ext_frontend(NODE, 30090, [be(LOCAL_BE, local=True), be(REMOTE_BE), be(REMOTE_BE2)], name="mixed")
GUARDED = ext_frontend(LB_IP, 443, [be(LOCAL_BE, local=True)], kind=FrontendKind.LOAD_BALANCER, name="lb",
                       source_ranges=(ipaddress.IPv4Network(f"{CLIENT}/32"),))
# The IPv6 twins (bpf/lib/nodeport6.h): NodePort on the node's IPv6 address, an IPv6 LoadBalancer IP.
MIXED6 = ext_frontend(NODE6, 30090, [be(LOCAL_BE6, local=True), be(REMOTE_BE6)], name="mixed6")
GUARDED6 = ext_frontend(LB_IP6, 443, [be(LOCAL_BE6, local=True)], kind=FrontendKind.LOAD_BALANCER, name="lb6",
                        source_ranges=(ipaddress.IPv6Network(f"{CLIENT6}/128"),))


def why(pin_dir, src, dst, sport):
    res = CliRunner().invoke(main, ["why", src, dst, "--sport", str(sport), "--scope", "external",
                                    "--pin-dir", str(pin_dir), "-o", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def walk_nodeport(uplink, pin_dir, client, node_addr, local_be) -> set[str]:
    """`why` for 30 new flows client -> node_addr:30090 (MIXED or MIXED6) held to what the program
    does with each SYN: the backend it names, the client kept for the local one, SNAT to the node
    keeping the client's port for a remote one (the SNAT entry read back), conntrack on the second
    ask. Returns the backends the flows went to."""
    six = ":" in client
    seen = set()
    for sport in range(42000, 42030):
        w = why(pin_dir, client, f"{hostport(node_addr, 30090)}/TCP", sport)
        assert w["verdict"] == "dnat" and w["reason"] == "maglev"
        res = uplink.run("from_uplink", from_client((tcp6 if six else tcp)(client, node_addr, sport, 30090, "S")))
        out = Ether(res.data)[IPv6 if six else IP]
        assert w["backend"] == f"{hostport(out.dst, 8080)}/TCP"
        (src_step,) = [s for s in w["steps"] if s["step"] == "source"]
        with NodeMaps.open(pin_dir) as node:
            snat = node.snat_entry(client, node_addr, sport, 30090, "TCP")
        if out.dst == local_be:
            assert res.verdict == "TC_ACT_OK" and out.src == client and "kept" in src_step["outcome"]
            assert snat is None
        else:
            assert res.verdict == "TC_ACT_REDIRECT" and out.src == node_addr and "SNAT" in src_step["outcome"]
            assert out.sport == sport and f"the port stays {sport}" in src_step["outcome"]
            assert snat == (node_addr, sport)
        seen.add(out.dst)
        again = why(pin_dir, client, f"{hostport(node_addr, 30090)}/TCP", sport)
        assert (again["reason"], again["backend"]) == ("conntrack", w["backend"])
    return seen


def refuse_outside_source_ranges(uplink, pin_dir, inside, outside, lb_ip) -> None:
    """loadBalancerSourceRanges on lb_ip:443 (GUARDED or GUARDED6): `why` and the program let the
    client inside through and drop the one outside."""
    pkt = tcp6 if ":" in inside else tcp
    w = why(pin_dir, inside, f"{hostport(lb_ip, 443)}/TCP", 43000)
    assert w["verdict"] == "dnat" and any(s["step"] == "source ranges" for s in w["steps"])
    assert uplink.run("from_uplink", from_client(pkt(inside, lb_ip, 43000, 443, "S"))).verdict == "TC_ACT_OK"
    w = why(pin_dir, outside, f"{hostport(lb_ip, 443)}/TCP", 43000)
    assert (w["verdict"], w["reason"]) == ("drop", "source_range")
    res = uplink.run("from_uplink", from_client(pkt(outside, lb_ip, 43000, 443, "S"), mac=CLIENT2_MAC))
    assert res.verdict == "TC_ACT_SHOT"


def test_why_external_names_the_backend_and_the_snat_decision(uplink, pin_dir):
    uplink.writer.apply(LBState.of([MIXED, GUARDED]))
    # Both SNAT and source-preserving paths checked.
    assert walk_nodeport(uplink, pin_dir, CLIENT, NODE, LOCAL_BE) == {LOCAL_BE, REMOTE_BE, REMOTE_BE2}
    refuse_outside_source_ranges(uplink, pin_dir, CLIENT, CLIENT2, LB_IP)
    with NodeMaps.open(pin_dir) as node:
        assert node.drops()["source_range"] == 1


def test_why_external_follows_ipv6_as_the_program(uplink, pin_dir):
    """The IPv6 uplink (np6_from_uplink), walked by `why` as the program walks it: a local backend
    is DNAT only, a remote one SNATed to the node's IPv6 address (lb6_snat, which `why` reads back
    for the tracked flow), a client outside the source ranges (lb6_source_ranges) and a Local
    NodePort without a local endpoint are dropped."""
    empty_local = ext_frontend(NODE6, 30083, [], local_only=True, name="etp-local6-empty")
    uplink.writer.apply(LBState.of([MIXED6, GUARDED6, empty_local]))
    assert walk_nodeport(uplink, pin_dir, CLIENT6, NODE6, LOCAL_BE6) == {LOCAL_BE6, REMOTE_BE6}
    refuse_outside_source_ranges(uplink, pin_dir, CLIENT6, CLIENT2_6, LB_IP6)

    # externalTrafficPolicy Local with no endpoint on this node.
    w = why(pin_dir, CLIENT6, f"[{NODE6}]:30083/TCP", 44000)
    assert (w["verdict"], w["reason"]) == ("drop", "no_local_backend")
    assert uplink.run("from_uplink", from_client(tcp6(CLIENT6, NODE6, 44000, 30083, "S"))).verdict == "TC_ACT_SHOT"
    with NodeMaps.open(pin_dir) as node:
        assert (node.drops()["source_range"], node.drops()["no_local_backend"]) == (1, 1)


def test_why_external_says_a_local_backend_is_masqueraded_when_the_agent_does(uplink, pod_veth, pin_dir):
    """With --masquerade-external-to-local-backends published (as the agent does), `why` says the
    local backend's flow is SNATed to the node, and the same program, which reads the word at run
    time, does so; before it, both keep the client's address."""
    from ebpfsvc.datapath import loader

    local = ext_frontend(NODE, 30091, [be(LOCAL_BE, local=True)], name="local")
    uplink.writer.apply(LBState.of([local]))
    w = why(pin_dir, CLIENT, f"{NODE}:30091/TCP", 42100)
    assert "kept" in [s for s in w["steps"] if s["step"] == "source"][0]["outcome"]     # nothing published
    res = uplink.run("from_uplink", from_client(tcp(CLIENT, NODE, 42099, 30091, "S")))
    out = Ether(res.data)[IP]
    assert (res.verdict, out.src, out.dst) == ("TC_ACT_OK", CLIENT, LOCAL_BE)
    loader.publish_options(uplink.dp.maps, masquerade_external_to_local_backends=True)
    w = why(pin_dir, CLIENT, f"{NODE}:30091/TCP", 42100)
    (src_step,) = [s for s in w["steps"] if s["step"] == "source"]
    assert w["backend"] == f"{LOCAL_BE}:8080/TCP" and "masqueraded" in src_step["outcome"]
    res = uplink.run("from_uplink", from_client(tcp(CLIENT, NODE, 42100, 30091, "S")))
    out = Ether(res.data)[IP]
    assert (res.verdict, out.src, out.dst) == ("TC_ACT_REDIRECT", NODE, LOCAL_BE)


def test_why_external_takes_the_cluster_wide_set_for_a_pod_in_the_agents_cluster_cidr(uplink, pin_dir):
    """With --cluster-cidr published (as the agent does), `why` follows a pod of another node to a
    Local-policy NodePort to the INTERNAL twin's cluster-wide backend, SNATed, as the same program
    does once it reads the word (before, both drop it); a client outside the cluster CIDR still meets
    the Local set (dropped here), and so does an IPv6 client (the cluster CIDR is IPv4's)."""
    from ebpfsvc.datapath import loader

    uplink.writer.apply(LBState.of([*local_policy_with_only_a_remote_endpoint(),
                                    *local_policy_with_only_a_remote_endpoint(NODE6, REMOTE_BE6)]))
    w = why(pin_dir, NODE2_POD, f"{NODE}:30085/TCP", 40000)
    assert (w["verdict"], w["reason"]) == ("drop", "no_local_backend"), "nothing published: no cluster CIDR"
    assert uplink.run("from_uplink", from_node2(tcp(NODE2_POD, NODE, 40000, 30085, "S"))).verdict == "TC_ACT_SHOT"
    loader.publish_options(uplink.dp.maps, cluster_cidr=CLUSTER_CIDR)
    with NodeMaps.open(pin_dir) as node:
        assert str(node.agent_options().cluster_cidr) == CLUSTER_CIDR
    w = why(pin_dir, NODE2_POD, f"{NODE}:30085/TCP", 40000)
    steps = {s["step"]: s["outcome"] for s in w["steps"]}
    assert (w["verdict"], w["backend"]) == ("dnat", f"{REMOTE_BE}:8080/TCP")
    assert CLUSTER_CIDR in steps["cluster CIDR"] and "SNAT" in steps["source"]
    res = uplink.run("from_uplink", from_node2(tcp(NODE2_POD, NODE, 40000, 30085, "S")))
    out = Ether(res.data)[IP]
    assert (res.verdict, out.src, out.dst) == ("TC_ACT_REDIRECT", NODE, REMOTE_BE)
    w = why(pin_dir, CLIENT, f"{NODE}:30085/TCP", 40001)
    assert (w["verdict"], w["reason"]) == ("drop", "no_local_backend") and "cluster CIDR" not in str(w["steps"])
    assert uplink.run("from_uplink", from_client(tcp(CLIENT, NODE, 40001, 30085, "S"))).verdict == "TC_ACT_SHOT"
    # The cluster CIDR is IPv4 (np4_from_cluster): an IPv6 client meets the IPv6 Local set, never the twin's.
    w = why(pin_dir, CLIENT6, f"[{NODE6}]:30085/TCP", 40002)
    assert (w["verdict"], w["reason"]) == ("drop", "no_local_backend") and "cluster CIDR" not in str(w["steps"])
    assert uplink.run("from_uplink", from_client(tcp6(CLIENT6, NODE6, 40002, 30085, "S"))).verdict == "TC_ACT_SHOT"
