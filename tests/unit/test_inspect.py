"""Inspection pieces that need no kernel: decoding helpers against abi.h, the
CLI's argument handling, and the conntrack lifetimes it mirrors from ct.h."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from click.testing import CliRunner

from ebpfsvc import abi
from ebpfsvc.cli import main
from ebpfsvc.datapath import bpfsys
from ebpfsvc.inspect.node import (FrontendRow, ct_closing, ct_lifetime_s, flag_names, ip_str, port_int, raw_ip,
                                  raw_port, _SVC_FLAGS, _CT_FLAGS)

CT_H = Path(abi.__file__).resolve().parent.parent / "bpf" / "lib" / "ct.h"
LB_H = abi.ABI_H      # where bpf/lib/lb.h's LB_TERMINATING_PROBES is defined, for Python to read


def test_wire_order_round_trips():
    assert ip_str(raw_ip("198.19.0.10")) == "198.19.0.10"
    assert port_int(raw_port(30080)) == 30080
    # A __be32 holds the address bytes in network order, whatever the host's byte order.
    assert raw_ip("1.2.3.4").to_bytes(4, bpfsys._BYTEORDER) == bytes([1, 2, 3, 4])


def test_every_abi_flag_has_a_name():
    svc_bits = {v for k, v in abi.CONSTANTS.items() if k.startswith("LB_SVC_F_")}
    ct_bits = {v for k, v in abi.CONSTANTS.items() if k.startswith("CT_F_")}
    assert {b for b, _ in _SVC_FLAGS} == svc_bits
    assert {b for b, _ in _CT_FLAGS} == ct_bits
    assert flag_names(abi.CT_F_SEEN_SYN | abi.CT_F_ESTABLISHED, _CT_FLAGS) == ["SYN", "established"]
    assert flag_names(0x8000, _SVC_FLAGS) == ["0x8000"]          # an unknown bit is shown, not hidden


def test_frontend_kind_and_algorithm_from_flags():
    def fe(flags):
        return FrontendRow("198.19.0.10", 80, "TCP", "internal", 1, 1, 0, 251, 2, 0, flags)
    assert (fe(0).kind, fe(0).algorithm) == ("ClusterIP", "maglev")
    assert fe(abi.LB_SVC_F_NODEPORT | abi.LB_SVC_F_RANDOM).kind == "NodePort"
    assert fe(abi.LB_SVC_F_RANDOM).algorithm == "random"
    assert fe(abi.LB_SVC_F_LOADBALANCER).kind == "LoadBalancer"
    assert fe(abi.LB_SVC_F_ADDRESS).is_marker


def test_ct_lifetimes_follow_ct_h():
    # The order of decisions in ct4_lifetime_ns: UDP (stream or not), other non-TCP, closing,
    # half-closed, established, half-open.
    body = CT_H.read_text()
    fn = body[body.index("ct4_lifetime_ns"):]
    order = re.findall(r"\b(CT_TIMEOUT_\w+)", fn[:fn.index("\n}")])
    assert order == ["CT_TIMEOUT_UDP_STREAM_S", "CT_TIMEOUT_UDP_S", "CT_TIMEOUT_OTHER_S", "CT_TIMEOUT_TCP_CLOSE_S",
                     "CT_TIMEOUT_TCP_CLOSE_WAIT_S", "CT_TIMEOUT_TCP_ESTABLISHED_S", "CT_TIMEOUT_TCP_SYN_S"]
    assert ct_lifetime_s("UDP", abi.CT_F_ESTABLISHED) == abi.CT_TIMEOUT_UDP_STREAM_S
    assert ct_lifetime_s("UDP", 0) == abi.CT_TIMEOUT_UDP_S
    assert ct_lifetime_s("SCTP", abi.CT_F_ESTABLISHED) == abi.CT_TIMEOUT_OTHER_S
    assert ct_lifetime_s("TCP", abi.CT_F_SEEN_RST | abi.CT_F_ESTABLISHED) == abi.CT_TIMEOUT_TCP_CLOSE_S
    assert ct_lifetime_s("TCP", abi.CT_F_SEEN_FIN_FWD | abi.CT_F_ESTABLISHED) == abi.CT_TIMEOUT_TCP_CLOSE_WAIT_S
    assert ct_lifetime_s("TCP", abi.CT_F_ESTABLISHED) == abi.CT_TIMEOUT_TCP_ESTABLISHED_S
    assert ct_lifetime_s("TCP", abi.CT_F_SEEN_SYN) == abi.CT_TIMEOUT_TCP_SYN_S
    assert ct_closing(abi.CT_F_SEEN_FIN_FWD | abi.CT_F_SEEN_FIN_REV) and not ct_closing(abi.CT_F_SEEN_FIN_FWD)


def test_terminating_probes_match_lb_h():
    from ebpfsvc.inspect.views import TERMINATING_PROBES
    m = re.search(r"#define LB_TERMINATING_PROBES (\d+)", LB_H.read_text())
    assert m and int(m.group(1)) == TERMINATING_PROBES



def test_cpu_lists():
    assert [bpfsys.count_cpu_list(t) for t in ("0", "0-1\n", "0,2-3", "0-3,8-11")] == [1, 2, 3, 8]


def test_cli_argument_errors():
    r = CliRunner().invoke(main, ["why", "198.18.1.5", "not-an-address:80/TCP", "--pin-dir", "/nonexistent"])
    assert r.exit_code == 2 and "ADDRESS:PORT[/PROTO]" in r.output
    r = CliRunner().invoke(main, ["drift", "--node-name", "n", "--pin-dir", "/nonexistent"])
    assert r.exit_code == 2 and "exactly one of --manifests" in r.output
    r = CliRunner().invoke(main, ["bpf", "ct", "list", "--pin-dir", "/nonexistent/pins"])
    assert r.exit_code == 1 and "no such pin directory" in r.output


def test_drift_finds_the_nodeport_addresses_as_the_agent_does(tmp_path, monkeypatch):
    """With no --node-address, `drift` serves NodePorts on the node addresses the agent found (its
    Node object on this namespace's interfaces), instead of calling every NodePort frontend of a
    zero-configuration agent unwanted (issue 10)."""
    from ipaddress import IPv4Address

    from ebpfsvc import nodeinfo
    from ebpfsvc.config import NodeConfig
    from ebpfsvc.inspect.desired import load_desired
    from ebpfsvc.nodeinfo import Interface, NodeSettings

    (tmp_path / "objects.yaml").write_text("""
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 198.18.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: NodePort, clusterIP: 198.19.0.10, ports: [{port: 80, nodePort: 30080}]}
""")
    monkeypatch.setattr(nodeinfo, "read_interfaces",
                        lambda netns=None: (Interface("eth0", (IPv4Address("198.18.0.11"),)),))
    state = load_desired(NodeConfig("node-1"), manifests=str(tmp_path), settings=NodeSettings())
    assert {(str(k.address), k.port) for k in state.frontends} >= {("198.18.0.11", 30080), ("198.19.0.10", 80)}


def test_frontends_and_backends_of_either_family_are_named_as_backend_names_are():
    from ebpfsvc.inspect.node import BackendRow, _address_order

    def fe(address):
        return FrontendRow(address, 80, "TCP", "internal", 1, 1, 0, 251, 2, 0, 0)
    assert fe("198.19.0.10").name == "198.19.0.10:80/TCP"
    assert fe("2001:2:0:ff::10").name == "[2001:2:0:ff::10]:80/TCP"      # as lbmodel.Backend.name brackets it
    assert BackendRow(1, "2001:2:0:2::10", 8080, "TCP", 0).name == "[2001:2:0:2::10]:8080/TCP"
    assert sorted(["2001:2::1", "198.19.0.10", "10.0.0.1"], key=_address_order) == [
        "10.0.0.1", "198.19.0.10", "2001:2::1"]


def test_drift_desired_side_has_both_families_of_a_dual_stack_node(tmp_path, monkeypatch):
    """drift computes what the agent computes: on a dual-stack node (--ip-families IPv4,IPv6) the
    Service's IPv6 clusterIP and the NodePort on the node's IPv6 address are wanted too."""
    from ipaddress import IPv4Address, IPv6Address

    from ebpfsvc import nodeinfo
    from ebpfsvc.config import NodeConfig
    from ebpfsvc.inspect.desired import load_desired
    from ebpfsvc.nodeinfo import Interface, NodeSettings

    (tmp_path / "objects.yaml").write_text("""
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 198.18.0.11}, {type: InternalIP, address: "2001:2::11"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: NodePort, ipFamilyPolicy: PreferDualStack, clusterIP: 198.19.0.10,
       clusterIPs: [198.19.0.10, "2001:2:0:ff::10"], ports: [{port: 80, nodePort: 30080}]}
""")
    monkeypatch.setattr(nodeinfo, "read_interfaces", lambda netns=None: (
        Interface("eth0", (IPv4Address("198.18.0.11"), IPv6Address("2001:2::11"))),))
    both = ("IPv4", "IPv6")
    state = load_desired(NodeConfig("node-1", ip_families=both), manifests=str(tmp_path),
                         settings=NodeSettings(ip_families=both))
    assert {(str(k.address), k.port) for k in state.frontends} == {
        ("198.19.0.10", 80), ("2001:2:0:ff::10", 80), ("198.18.0.11", 30080), ("2001:2::11", 30080)}

    # drift's default, as the agent's: --ip-families auto takes the ServiceCIDRs' families; IPv4 without.
    assert {(str(k.address), k.port) for k in load_desired(
        NodeConfig("node-1"), manifests=str(tmp_path), settings=NodeSettings(), ip_families_auto=True).frontends} == {
        ("198.19.0.10", 80), ("198.18.0.11", 30080)}
    (tmp_path / "cidr.yaml").write_text("""
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [198.19.0.0/16, "2001:2:0:ff::/108"]}
""")
    state = load_desired(NodeConfig("node-1"), manifests=str(tmp_path), settings=NodeSettings(), ip_families_auto=True)
    assert {(str(k.address), k.port) for k in state.frontends} == {
        ("198.19.0.10", 80), ("2001:2:0:ff::10", 80), ("198.18.0.11", 30080), ("2001:2::11", 30080)}


def test_tables_print_ipv6_frontends_as_text(capsys):
    """A bracketed IPv6 frontend is not a style tag, and ':b:' in an address is not an emoji code."""
    from ebpfsvc.cli.inspect import _console, _esc, _table

    t = _table("FRONTEND", "SERVICE")
    t.add_row("[fd00::10]:80/TCP", "default/web")
    t.add_row("[2001:2:0:ffff::b:b51f]:80/TCP", "default/web")
    con = _console()
    con.print(t)
    con.print(f"[bold]{_esc('[fd00::10]:80/TCP')}[/bold]")
    out = capsys.readouterr().out
    assert "[fd00::10]:80/TCP" in out and "[2001:2:0:ffff::b:b51f]:80/TCP" in out
    assert out.count("[fd00::10]:80/TCP") == 2


def test_the_default_options_word_reads_back_as_the_default_options():
    """What the agent writes with its defaults (loader.agent_options()) reads back as AgentOptions(),
    which `ebpfsvc bpf options` and `why` show when no word is written; each option alone flips
    only its own field, and back."""
    from ebpfsvc.datapath import loader
    from ebpfsvc.inspect.node import AgentOptions

    assert AgentOptions.from_word(loader.agent_options()) == AgentOptions()
    flipped = {"snat_keep_client_port": False, "host_clients": False, "reset_removed_endpoint_tcp": False,
               "masquerade_external_to_local_backends": True}
    for name, value in flipped.items():
        got = AgentOptions.from_word(loader.agent_options(**{name: value}))
        assert got == dataclasses.replace(AgentOptions(), **{name: value}), name
    cidr = ipaddress.IPv4Network("198.18.64.0/18")
    assert AgentOptions.from_word(loader.agent_options(cluster_cidr=cidr), cidr).cluster_cidr == cidr
