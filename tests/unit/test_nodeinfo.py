"""nodeinfo.resolve(): the node's addresses, NodePort addresses, primary address and uplinks from its
Node object, its interfaces and the agent's cluster-wide settings (no per-node flag)."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import pytest

from ebpfsvc.k8s.node import parse_node
from ebpfsvc.nodeinfo import Interface, NodeSettings, node_problem, parse_nodeport_addresses, resolve

# A node with a management link (eth0), the cluster network (eth1), a CNI bridge, pod veths and lo.
INTERFACES = (
    Interface("lo", (IPv4Address("127.0.0.1"), IPv4Address("198.18.1.1"))),   # the lab's pod gateway
    Interface("eth0", (IPv4Address("198.18.9.5"),)),
    Interface("eth1", (IPv4Address("198.18.0.11"), IPv4Address("198.18.0.111"))),
    Interface("cni0", (IPv4Address("198.18.129.1"),)),
    Interface("lxc1234"),
)


def node(*addresses, name="node-1"):
    return parse_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                       "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]
                                  + [{"type": "Hostname", "address": name}]}})


def ips(*texts):
    return tuple(IPv4Address(t) for t in texts)


NODE = node(("InternalIP", "198.18.0.11"), ("ExternalIP", "198.18.0.111"), ("ExternalIP", "203.0.113.7"),
            ("InternalIP", "fd00::11"))


def test_node_addresses_are_its_node_objects_on_this_nodes_interfaces():
    """Every node address serves NodePorts when nodeport-addresses is empty (the shipped
    ConfigMap's `[]`: issue 10 read it as none); a cloud's NATed ExternalIP is on no interface."""
    info = resolve(NodeSettings(), INTERFACES, NODE, True)
    assert info.addresses == ips("198.18.0.11", "198.18.0.111")
    assert info.primary == IPv4Address("198.18.0.11")
    assert info.nodeport_addresses == ips("198.18.0.11", "198.18.0.111")
    assert info.hairpin == IPv4Address("198.18.0.11")          # no flag: the node address
    assert info.uplinks == ("eth1",) and info.missing_uplinks == ()
    assert info.origin == "Node node-1"


def test_without_a_node_object_the_interfaces_addresses_serve():
    info = resolve(NodeSettings(pod_interfaces=("lxc*",)), INTERFACES, None, True)
    assert info.addresses == ips("198.18.9.5", "198.18.0.11", "198.18.0.111", "198.18.129.1")
    assert info.primary == IPv4Address("198.18.9.5")
    assert info.uplinks == ("eth0", "eth1", "cni0")


def test_the_node_not_listed_yet_means_nothing_guessed():
    info = resolve(NodeSettings(), INTERFACES, None, False)
    assert info.addresses == () and info.primary is None and info.nodeport_addresses == ()
    assert info.uplinks == () and info.hairpin is None
    assert "not listed yet" in info.origin


def test_a_node_whose_addresses_are_elsewhere_falls_back_to_the_interfaces():
    info = resolve(NodeSettings(), INTERFACES, node(("InternalIP", "198.18.77.7")), True)
    assert info.addresses[0] == IPv4Address("198.18.9.5") and "no address on this node" in info.origin
    assert node_problem(node(("InternalIP", "198.18.77.7")), INTERFACES) == (
        "Node node-1: status.addresses: InternalIP 198.18.77.7 is on no interface of this node; not served")
    assert node_problem(NODE, INTERFACES) == ""


@pytest.mark.parametrize("selection,wanted", [
    (("198.18.0.0/24",), ("198.18.0.11", "198.18.0.111")),          # interface addresses inside the CIDRs
    (("198.18.9.0/24", "fd00::/64"), ("198.18.9.5",)),             # IPv6 CIDRs: nothing of ours
    (("0.0.0.0/0",), ("198.18.1.1", "198.18.9.5", "198.18.0.11", "198.18.0.111", "198.18.129.1")),
    (("primary",), ("198.18.0.11",)),                               # the Node's first InternalIP
    ((), ("198.18.0.11", "198.18.0.111")),                          # every node address
])
def test_nodeport_addresses_have_kube_proxys_meaning(selection, wanted):
    info = resolve(NodeSettings(nodeport_addresses=selection), INTERFACES, NODE, True)
    assert info.nodeport_addresses == ips(*wanted)


def test_explicit_node_addresses_override_and_add():
    alone = resolve(NodeSettings(node_addresses=ips("198.18.0.111")), INTERFACES, NODE, True)
    assert alone.nodeport_addresses == ips("198.18.0.111")
    assert alone.primary == IPv4Address("198.18.0.11")                   # still the Node's
    both = resolve(NodeSettings(node_addresses=ips("198.18.50.1"), nodeport_addresses=("primary",)),
                   INTERFACES, NODE, True)
    assert both.nodeport_addresses == ips("198.18.50.1", "198.18.0.11")
    # The lab's and benchmarks' way before Node objects: the first uplink's address is the primary.
    flags = resolve(NodeSettings(node_addresses=ips("198.18.0.11"), uplinks=("eth0",)), INTERFACES, None, False)
    assert flags.primary == IPv4Address("198.18.9.5") and flags.nodeport_addresses == ips("198.18.0.11")


def test_named_uplinks_are_used_as_given_and_a_missing_one_is_reported():
    info = resolve(NodeSettings(uplinks=("eth0", "bond7")), INTERFACES, NODE, True)
    assert info.uplinks == ("eth0",) and info.missing_uplinks == ("bond7",)
    assert "missing uplinks bond7" in info.describe()


def test_hairpin_flag_wins():
    info = resolve(NodeSettings(hairpin_address="198.18.1.1"), INTERFACES, NODE, True)
    assert info.hairpin == IPv4Address("198.18.1.1") and info.primary == IPv4Address("198.18.0.11")


@pytest.mark.parametrize("values,message", [
    (("primary", "10.0.0.0/8"), "'primary' cannot be combined with CIDRs"),
    (("10.0.0.0/33",), "'10.0.0.0/33' is not a CIDR (or 'primary')"),
])
def test_bad_nodeport_addresses_are_refused_with_the_value(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_nodeport_addresses(values)
    assert parse_nodeport_addresses(["10.1.2.3/8"]) == ("10.0.0.0/8",)


# --- dual-stack (issue 14) -------------------------------------------------------------------------

DUAL_INTERFACES = (
    Interface("lo", (IPv4Address("127.0.0.1"), ip_address("::1"))),
    Interface("eth1", (IPv4Address("198.18.0.11"), ip_address("2001:2::11"))),
    Interface("eth2", (ip_address("2001:2:0:1::11"),)),          # an IPv6-only link
    Interface("lxc1234"),
)
DUAL_NODE = node(("InternalIP", "198.18.0.11"), ("InternalIP", "2001:2::11"), ("ExternalIP", "2001:2:0:1::11"))
BOTH = ("IPv4", "IPv6")


def test_an_ipv4_node_ignores_its_ipv6_addresses():
    info = resolve(NodeSettings(), DUAL_INTERFACES, DUAL_NODE, True)
    assert info.addresses == info.nodeport_addresses == ips("198.18.0.11")
    assert info.uplinks == ("eth1",)


def test_a_dual_stack_node_serves_nodeports_on_its_ipv6_addresses_with_a_primary_of_each_family():
    info = resolve(NodeSettings(ip_families=BOTH), DUAL_INTERFACES, DUAL_NODE, True)
    assert info.addresses == info.nodeport_addresses == (
        IPv4Address("198.18.0.11"), ip_address("2001:2::11"), ip_address("2001:2:0:1::11"))
    assert info.primary == info.hairpin == IPv4Address("198.18.0.11")
    assert info.primary6 == info.hairpin6 == ip_address("2001:2::11")       # the first IPv6 InternalIP
    assert info.uplinks == ("eth1", "eth2")
    # Without a Node object: the interfaces' addresses of both families (never loopback).
    bare = resolve(NodeSettings(ip_families=BOTH), DUAL_INTERFACES, None, True)
    assert bare.addresses == info.addresses
    assert bare.primary6 == ip_address("2001:2::11")


def test_the_ipv6_primary_is_an_external_ip_without_an_ipv6_internal_ip_and_the_v6_flag_wins():
    node_ext = node(("InternalIP", "198.18.0.11"), ("ExternalIP", "2001:2:0:1::11"))
    info = resolve(NodeSettings(ip_families=BOTH), DUAL_INTERFACES, node_ext, True)
    assert info.primary6 == info.hairpin6 == ip_address("2001:2:0:1::11")
    flagged = resolve(NodeSettings(ip_families=BOTH, hairpin_address6="2001:2::99"), DUAL_INTERFACES, node_ext, True)
    assert flagged.hairpin6 == ip_address("2001:2::99") and flagged.primary6 == ip_address("2001:2:0:1::11")
    assert flagged.hairpin == IPv4Address("198.18.0.11")
    assert "hairpin source 198.18.0.11, 2001:2::99" in flagged.describe()
    # An IPv4-only node has no IPv6 twin.
    assert resolve(NodeSettings(), DUAL_INTERFACES, node_ext, True).primary6 is None


@pytest.mark.parametrize("selection,wanted", [
    (("2001:2:0:1::/64",), ("2001:2:0:1::11",)),                   # an IPv6 CIDR selects IPv6 addresses
    (("198.18.0.0/24", "2001:2::/64"), ("198.18.0.11", "2001:2::11")),
    (("primary",), ("198.18.0.11",)),
])
def test_nodeport_addresses_select_either_family(selection, wanted):
    info = resolve(NodeSettings(nodeport_addresses=selection, ip_families=BOTH), DUAL_INTERFACES, DUAL_NODE, True)
    assert info.nodeport_addresses == tuple(ip_address(a) for a in wanted)


def test_an_ipv6_only_node_has_ipv6_node_addresses_only():
    info = resolve(NodeSettings(ip_families=("IPv6",)), DUAL_INTERFACES, DUAL_NODE, True)
    assert info.nodeport_addresses == (ip_address("2001:2::11"), ip_address("2001:2:0:1::11"))
    assert info.primary is None and info.primary6 == ip_address("2001:2::11")
