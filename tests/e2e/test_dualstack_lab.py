"""The lab in dual-stack and single-stack IPv6: addresses, routes, the real control plane, clean-up.

IPv6 addresses come from 2001:2::/48 only (RFC 5180), in lab namespaces only; the lab files
are the shipped examples (examples/lab/dual-stack.yaml, ipv6.yaml). Traffic is real (echo
apps in pod namespaces, curl and Python sockets); the Services' clusterIPs and EndpointSlices
are the real kube-apiserver's and kube-controller-manager's. With agents on, a dual-stack lab
still serves IPv4 as before; the agents' IPv6 Services are tests/e2e/test_ipv6.py's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpfsvc.lab import Lab, LabError, apps, labfile

from .helpers import http_get, service, wait_for, wait_programmed, wait_ready
from .test_lab import lab_leftovers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"
DUAL_STACK = str(EXAMPLES / "dual-stack.yaml")
IPV6_ONLY = str(EXAMPLES / "ipv6.yaml")
NO_AGENTS_DUAL = pytest.mark.parametrize("lab", [{"agents": False, "labfile": DUAL_STACK}], indirect=True)
AGENTS_DUAL = pytest.mark.parametrize("lab", [{"agents": True, "labfile": DUAL_STACK}], indirect=True)

# A datagram to argv[1]:argv[2] of either family; prints the udp-echo answer.
UDP_ASK = ("import socket,sys; f=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET; "
           "s=socket.socket(f, socket.SOCK_DGRAM); s.settimeout(3); "
           "s.sendto(b'hi', (sys.argv[1], int(sys.argv[2]))); print(s.recvfrom(4096)[0].decode())")
# Two lines over one TCP connection to argv[1]:argv[2] (create_connection takes either family).
TCP_TWO_LINES = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); "
                 "f=s.makefile('rwb'); f.write(b'one\\n'); f.flush(); print(f.readline().decode().strip()); "
                 "f.write(b'two\\n'); f.flush(); print(f.readline().decode().strip())")


def url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"


def curl(run, ip: str, port: int, max_time: int = 5) -> subprocess.CompletedProcess:
    # -g: the brackets of an IPv6 literal are not a glob.
    return run(["curl", "-gsS", "--max-time", str(max_time), url(ip, port)])


def curl_json(run, ip: str, port: int) -> dict:
    result = curl(run, ip, port)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pod_ips(lab: Lab, ref: str) -> list[str]:
    return [p["ip"] for p in lab.pod(ref)["status"]["podIPs"]]


def v6(lab: Lab, ref: str) -> str:
    return next(ip for ip in pod_ips(lab, ref) if ":" in ip)


def udp_answer(run, ip: str, port: int) -> dict:
    for _ in range(5):   # the UDP app may still be binding: a few bounded tries
        result = run(["python", "-c", UDP_ASK, ip, str(port)], timeout=10)
        if result.returncode == 0:
            return json.loads(result.stdout)
        time.sleep(0.5)
    raise AssertionError(f"no UDP answer from {ip}:{port}: {result.stderr}")


def root_namespace_ipv6() -> str:
    """The root namespace's IPv6 addresses and routes: a lab must never add any of 2001:2::/48."""
    return "".join(subprocess.run(["ip", "-6", *args], capture_output=True, text=True).stdout
                   for args in (["addr"], ["route", "show", "table", "all"]))


def slices_by_family(lab: Lab, svc: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in lab.endpoint_slices(svc):
        out.setdefault(s["addressType"], set()).update(a for e in s.get("endpoints") or [] for a in e["addresses"])
    return out


# -- the lab file (no root) -------------------------------------------------------------------------


def test_labfile_families():
    """IPv4 stays the default and unchanged; ipFamilies alone makes the IPv6 twins of the IPv4 plan."""
    default = labfile.load()
    assert default.ip_families == ("IPv4",) and default.versions == (4,)
    assert [str(a) for a in default.node("node-1").addresses] == ["198.18.0.11"]
    assert labfile.parse(default.to_dict()) == default

    doc = default.to_dict()
    doc["ipFamilies"] = ["IPv4", "IPv6"]
    dual = labfile.parse(doc)
    assert [str(a) for a in dual.node("node-2").addresses] == ["198.18.0.12", "2001:2::12"]
    assert [str(c) for c in dual.node("node-2").pod_cidrs] == ["198.18.2.0/24", "2001:2:0:2::/64"]
    assert [str(c) for c in dual.service_cidrs] == ["198.19.0.0/16", "2001:2:0:ffff::/108"]
    assert [str(r.to) for r in dual.external_client("client").routes] == ["198.18.200.0/24", "2001:2:0:200::/64"]
    assert labfile.parse(dual.to_dict()) == dual            # lab.yaml in the state dir reads back the same
    # The example file writes out exactly what the derivation gives.
    example = labfile.load(DUAL_STACK)
    assert (example.nodes, example.service_cidrs, example.external, example.control_plane) == \
        (dual.nodes, dual.service_cidrs, dual.external, dual.control_plane)

    doc["ipFamilies"] = ["IPv6", "IPv4"]            # IPv6 primary: every list in that order
    doc.pop("controlPlane")
    first6 = labfile.parse(doc)
    assert [str(a) for a in first6.control_plane.addresses] == ["2001:2::2", "198.18.0.2"]
    assert [str(c) for c in first6.service_cidrs] == ["2001:2:0:ffff::/108", "198.19.0.0/16"]
    assert [str(a) for a in first6.node("node-1").addresses] == ["2001:2::11", "198.18.0.11"]
    assert labfile.parse(first6.to_dict()) == first6

    doc["ipFamilies"] = ["IPv6"]
    ipv6 = labfile.parse(doc)
    example = labfile.load(IPV6_ONLY)
    assert (ipv6.nodes, ipv6.service_cidrs, ipv6.external, ipv6.control_plane) == \
        (example.nodes, example.service_cidrs, example.external, example.control_plane)
    assert all(a.version == 6 for n in ipv6.nodes for a in (*n.addresses, *n.pod_cidrs))
    assert ipv6.node("node-1").gateway is None     # IPv6 pods route via fe80::1 (network.py)


@pytest.mark.parametrize("change, error", [
    ({"ipFamilies": ["IPv4", "IPv4"]}, r"ipFamilies: .* is not one of"),
    ({"ipFamilies": ["IPv5"]}, r"ipFamilies: .* is not one of"),
    ({"nodes": [{"name": "node-1", "address": ["198.18.0.11", "2001:db8::11"], "podCIDR": "198.18.1.0/24"}]},
     r"nodes\[0\].address\[1\]: 2001:db8::11 is outside the lab range 2001:2::/48"),
    ({"nodes": [{"name": "node-1", "address": ["198.18.0.11", "2001:2:0:5::11"], "podCIDR": "198.18.1.0/24"}]},
     r"nodes\[0\].address\[1\]: 2001:2:0:5::11 is not a host address of the fabric 2001:2::/64"),
    ({"nodes": [{"name": "node-1", "address": ["198.18.0.11", "198.18.0.13"], "podCIDR": "198.18.1.0/24"}]},
     r"nodes\[0\].address: two IPv4 values"),
    ({"nodes": [{"name": "node-1", "address": "198.18.0.11", "podCIDR": "198.18.1.0/25"}]},
     r"nodes\[0\].podCIDR: no IPv6 value"),
    ({"nodes": [{"name": "node-1", "address": "198.18.0.11", "podCIDR": ["198.18.1.0/24", "2001:2::/64"]}]},
     r"nodes\[0\].podCIDR: 2001:2::/64 overlaps fabric"),
    ({"serviceCIDR": ["198.19.0.0/16", "2001:2:0:ffff::/64"]},
     r"serviceCIDR\[1\]: 2001:2:0:ffff::/64 is too large for kube-apiserver .*/108 or smaller"),
    ({"serviceCIDR": ["198.19.0.0/16", "2001:2:0:1::/112"]},
     r"nodes\[0\].podCIDR: 2001:2:0:1::/64 overlaps serviceCIDR"),
])
def test_labfile_ipv6_errors_name_the_field(change, error):
    doc = labfile.load().to_dict()
    doc["ipFamilies"] = ["IPv4", "IPv6"]
    doc.update(change)
    with pytest.raises(labfile.LabFileError, match=error):
        labfile.parse(doc)


# -- a dual-stack lab ---------------------------------------------------------------------------------


@pytest.mark.root
@NO_AGENTS_DUAL
def test_dual_stack_lab(lab):
    """Nodes, pods and the client get both families; IPv6 is routed between nodes and from the
    client to pods; the real control plane gives PreferDualStack Services two clusterIPs and
    makes IPv6 EndpointSlices from the pods' podIPs."""
    nodes = {n["metadata"]["name"]: n for n in lab.api.list("Node")}
    assert [a["address"] for a in nodes["node-1"]["status"]["addresses"] if a["type"] == "InternalIP"] == \
        ["198.18.0.11", "2001:2::11"]
    assert nodes["node-2"]["spec"]["podCIDRs"] == ["198.18.2.0/24", "2001:2:0:2::/64"]

    lab.apply([
        apps.pod("caller", "http-echo", 9000, node="node-1"),
        apps.pod("web-1", "http-echo", 8080, node="node-1", labels={"app": "web"}),
        apps.pod("web-2", "http-echo", 8080, node="node-2", labels={"app": "web"}),
        apps.pod("dns", "udp-echo", 5353, node="node-2"),
        apps.pod("echo", "tcp-echo", 7000, node="node-2"),
        service("web", [{"port": 80, "targetPort": 8080}], selector={"app": "web"}, ipFamilyPolicy="PreferDualStack"),
        service("web4", [{"port": 80, "targetPort": 8080}], selector={"app": "web"}),
        service("web6", [{"port": 80, "targetPort": 8080}], selector={"app": "web"}, ipFamilies=["IPv6"]),
    ])
    lab.wait_ready(["caller", "web-1", "web-2", "echo"], timeout=30)

    # podIP is the primary (IPv4), podIPs both; eth0 carries both, usable at once (no DAD).
    ip4, ip6 = pod_ips(lab, "web-2")
    assert ip4 == lab.pod_ip("web-2") and ipaddress.ip_address(ip4) in ipaddress.ip_network("198.18.2.0/24")
    assert ipaddress.ip_address(ip6) in ipaddress.ip_network("2001:2:0:2::/64")
    eth0 = lab.exec("web-2", ["ip", "-o", "addr", "show", "eth0"]).stdout
    assert f"{ip4}/32" in eth0 and f"{ip6}/128" in eth0 and "tentative" not in eth0
    assert f"{ip6}/128 scope global nodad" in eth0          # IFA_F_NODAD, beside accept_dad=0
    assert "default via fe80::1 dev eth0" in lab.exec("web-2", ["ip", "-6", "route", "show", "default"]).stdout
    assert "2001:2:0:2::/64 via 2001:2::12 dev eth0" in lab.node_exec("node-1", ["ip", "-6", "route"]).stdout
    for key, value in (("ipv6/conf/all/forwarding", "1"), ("ipv6/conf/eth0/accept_dad", "0"),
                       ("ipv4/ip_forward", "1")):
        assert lab.node_exec("node-2", ["cat", f"/proc/sys/net/{key}"]).stdout.strip() == value, key
    assert pod_ips(lab, "caller") == ["198.18.1.2", "2001:2:0:1::2"]     # .1 / ::1 are the node's

    # Pod to pod over IPv6, across nodes: HTTP, a TCP stream, UDP; no NAT, the caller's own address.
    def from_caller(argv, **kw):
        return lab.exec("caller", argv, **kw)

    answer = curl_json(from_caller, v6(lab, "web-2"), 8080)
    assert answer["pod"] == "web-2" and answer["client"] == v6(lab, "caller") and answer["localPort"] == 8080
    tcp = lab.exec("caller", ["python", "-c", TCP_TWO_LINES, v6(lab, "echo"), "7000"], timeout=10)
    assert tcp.returncode == 0, tcp.stderr
    assert tcp.stdout.splitlines() == ["echo: one", "echo: two"]
    udp = udp_answer(from_caller, v6(lab, "dns"), 5353)
    assert udp["pod"] == "dns" and udp["client"] == v6(lab, "caller")
    # The socket-path probe (sockprobe.py) speaks IPv6 too: what the socket sees, as JSON.
    probe = lab.exec("caller", ["python", "-m", "ebpfsvc.lab.sockprobe", "udp", v6(lab, "dns"), "5353"], timeout=10)
    assert json.loads(probe.stdout)["src"][:2] == [v6(lab, "dns"), 5353], probe.stderr
    probe = lab.exec("caller", ["python", "-m", "ebpfsvc.lab.sockprobe", "tcp", v6(lab, "web-2"), "8080"], timeout=10)
    assert '"pod": "web-2"' in json.loads(probe.stdout)["data"], probe.stdout
    # The same apps still answer IPv4 with the IPv4 client address (one dual-stack socket each).
    assert curl_json(from_caller, lab.pod_ip("web-2"), 8080)["client"] == lab.pod_ip("caller")
    assert udp_answer(from_caller, lab.pod_ip("dns"), 5353)["client"] == lab.pod_ip("caller")

    # The external client reaches IPv6 pods directly (routed, no NAT66); IPv4 pod CIDRs stay private.
    def from_client(argv, **kw):
        return lab.external_exec("client", argv, **kw)

    answer = curl_json(from_client, v6(lab, "web-1"), 8080)
    assert answer["pod"] == "web-1" and answer["client"] == "2001:2::100"
    assert curl(from_client, lab.pod_ip("web-1"), 8080, max_time=2).returncode != 0

    # The real API server: two clusterIPs for PreferDualStack, one of the primary family by default,
    # an IPv6 one only when asked; the real EndpointSlice controller: a slice per family.
    spec = lab.service("web")["spec"]
    assert spec["ipFamilies"] == ["IPv4", "IPv6"] and spec["ipFamilyPolicy"] == "PreferDualStack"
    v4_ip, v6_ip = spec["clusterIPs"]
    assert v4_ip.startswith("198.19.") and v4_ip == spec["clusterIP"]
    assert ipaddress.ip_address(v6_ip) in ipaddress.ip_network("2001:2:0:ffff::/108")
    assert lab.service("web4")["spec"]["ipFamilies"] == ["IPv4"] and len(lab.service("web4")["spec"]["clusterIPs"]) == 1
    assert lab.service("web6")["spec"]["clusterIP"].startswith("2001:2:0:ffff:")
    web = {"IPv4": {pod_ips(lab, p)[0] for p in ("web-1", "web-2")}, "IPv6": {v6(lab, p) for p in ("web-1", "web-2")}}
    wait_for(lambda: slices_by_family(lab, "web") == web, what="an IPv4 and an IPv6 slice of web")
    wait_for(lambda: slices_by_family(lab, "web6") == {"IPv6": web["IPv6"]}, what="only an IPv6 slice of web6")
    wait_for(lambda: slices_by_family(lab, "web4") == {"IPv4": web["IPv4"]}, what="only an IPv4 slice of web4")
    # The `kubernetes` Service stays single-stack, of the primary family (the API server's rule).
    assert lab.service("default/kubernetes")["spec"]["ipFamilies"] == ["IPv4"]

    # Fixed pod IPs, one per family (status.podIPs in a manifest, the pod-ip annotation).
    fixed = apps.pod("fixed", "http-echo", 8080, node="node-2")
    lab.apply([{**fixed, "status": {"podIPs": [{"ip": "198.18.2.50"}, {"ip": "2001:2:0:2::50"}]}}])
    assert pod_ips(lab, "fixed") == ["198.18.2.50", "2001:2:0:2::50"]
    with pytest.raises(LabError, match="pod-ip: 2001:2:0:1::50 is not a pod address of node node-2"):
        lab.apply([{**apps.pod("wrong", "http-echo", 8080, node="node-2"), "status": {"podIP": "2001:2:0:1::50"}}])
    assert "2001:2:" not in root_namespace_ipv6()


# -- single-stack IPv6 ---------------------------------------------------------------------------------


@pytest.mark.root
def test_ipv6_only_lab_and_down_leaves_nothing(unique_prefix):
    """No IPv4 anywhere: pods get one IPv6 address, the kubelet's probe dials it, pods reach each other
    across nodes, Services are IPv6 single-stack, `lab exec curl` works; `lab down` leaves nothing."""
    cli = [sys.executable, "-m", "ebpfsvc.cli", "lab"]
    env = {**os.environ, "EBPFSVC_LAB_PREFIX": unique_prefix}
    lab = Lab.up(IPV6_ONLY, prefix=unique_prefix, agents=False)
    try:
        assert [a["address"] for a in lab.api.list("Node")[0]["status"]["addresses"]
                if a["type"] == "InternalIP"] == ["2001:2::11"]
        lab.apply([
            apps.pod("caller", "http-echo", 9000, node="node-1"),
            apps.pod("web", "http-echo", 8080, node="node-2", labels={"app": "web"}),
            apps.pod("dns", "udp-echo", 5353, node="node-2"),
            service("web", [{"port": 80, "targetPort": 8080}], selector={"app": "web"}),
        ])
        # Ready through the tcpSocket probe, which dials the IPv6 podIP from the node.
        wait_ready(lab, ["caller", "web"])
        web = lab.pod_ip("web")
        assert pod_ips(lab, "web") == [web] and ipaddress.ip_address(web) in ipaddress.ip_network("2001:2:0:2::/64")
        assert lab.pod_ip("caller") == "2001:2:0:1::2"
        assert lab.exec("web", ["ip", "-4", "addr", "show", "eth0"]).stdout.strip() == ""
        assert lab.node_exec("node-1", ["ip", "-4", "addr", "show", "eth0"]).stdout.strip() == ""

        answer = curl_json(lambda argv, **kw: lab.exec("caller", argv, **kw), web, 8080)
        assert answer == {**answer, "pod": "web", "podIP": web, "client": "2001:2:0:1::2"}
        assert udp_answer(lambda argv, **kw: lab.exec("caller", argv, **kw), lab.pod_ip("dns"), 5353)["pod"] == "dns"
        # The CLI, as a user types it: `lab exec POD -- curl -g http://[...]:8080/`.
        out = subprocess.run([*cli, "exec", "caller", "--", "curl", "-gsS", "--max-time", "5",
                              f"http://[{web}]:8080/"], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and json.loads(out.stdout)["pod"] == "web", out.stderr
        status = json.loads(subprocess.run([*cli, "status", "-o", "json"], capture_output=True, text=True,
                                           timeout=60, env=env).stdout)
        assert {p["pod"]: p["ip"] for p in status["pods"]}["web"] == web

        spec = lab.service("web")["spec"]
        assert spec["ipFamilies"] == ["IPv6"] and spec["clusterIP"].startswith("2001:2:0:ffff:")
        wait_for(lambda: slices_by_family(lab, "web") == {"IPv6": {web}}, what="an IPv6 slice of web")
        assert "2001:2:" not in root_namespace_ipv6()
    finally:
        lab.down()
    assert lab_leftovers(unique_prefix) == []
    assert "2001:2:" not in root_namespace_ipv6()


# -- agents in a dual-stack lab ----------------------------------------------------------------------


@pytest.mark.root
@AGENTS_DUAL
def test_ipv4_service_in_dual_stack_lab_with_agents(lab):
    """The agents in a dual-stack lab: a PreferDualStack Service's IPv4 clusterIP is served from both
    nodes as before; IPv6 pod-to-pod traffic passes their programs untouched."""
    lab.apply([
        apps.pod("cl", "http-echo", 9000, node="node-1"),
        apps.pod("ds-1", "http-echo", 8080, node="node-1", labels={"app": "ds"}),
        apps.pod("ds-2", "http-echo", 8080, node="node-2", labels={"app": "ds"}),
        service("ds", [{"port": 80, "targetPort": 8080}], selector={"app": "ds"}, ipFamilyPolicy="PreferDualStack"),
    ])
    wait_ready(lab, ["cl", "ds-1", "ds-2"])
    assert len(lab.service("ds")["spec"]["clusterIPs"]) == 2
    wait_programmed(lab, "ds", 80, backends=2)
    lab.wait_synced()
    vip = lab.service("ds")["spec"]["clusterIP"]
    seen = set()
    for _ in range(40):   # new source port each time: Maglev spreads them over both backends
        answer = http_get(lab, "cl", vip, 80)
        assert answer["client"] == lab.pod_ip("cl") and answer["localPort"] == 8080
        seen.add(answer["pod"])
        if seen == {"ds-1", "ds-2"}:
            break
    assert seen == {"ds-1", "ds-2"}
    answer = curl_json(lambda argv, **kw: lab.exec("cl", argv, **kw), v6(lab, "ds-2"), 8080)
    assert answer["pod"] == "ds-2" and answer["client"] == v6(lab, "cl")
