"""IPv6 Services end to end (issue 14): agents started exactly as deploy/ runs them, no flag.

The lab is the dual-stack example (examples/lab/dual-stack.yaml) on a real kube-apiserver, whose
`kubernetes` ServiceCIDR has both families: the agents take their IP families from it (--ip-families
auto) and find their IPv6 node addresses on their Node. Services get their IPv6 clusterIPs from the
API server and their IPv6 EndpointSlices from the real controller; clients are curl and sockets in
pod namespaces, servers the lab's echo apps, so every packet crosses the agents' TC programs.
Backends see the client pod's own IPv6 address: pod traffic is never SNATed.

A pod reaching itself through an IPv6 clusterIP (hairpin) is SNATed to its node's IPv6 address, and
a process in a node's own namespace reaches IPv6 clusterIPs, its node's own IPv6 NodePorts and
IPv6 externalIPs routed out of the uplink (node clients, the socket path off).
IPv6 NodePorts from outside the cluster (SNAT to the node's IPv6 address, and policy Local) are
served on the uplinks too. The socket path's IPv6 hooks: test_socklb_ipv6.py.
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from ebpfsvc.lab import Lab, apps

from .helpers import (NODE_UDP_QUERY, add_clients, cluster_ip, connect_outcome, frontend, http_get, service,
                      table_backends, udp_ask_once, wait_affinity, wait_for, wait_programmed, wait_ready)
from .test_dualstack_lab import DUAL_STACK, IPV6_ONLY, curl, pod_ips, root_namespace_ipv6, v6
from .test_lab import lab_leftovers

pytestmark = pytest.mark.root

CLIENTS = {"node-1": "c6-1", "node-2": "c6-2"}     # process-less pods with an address of each family


@pytest.fixture(scope="module")
def lab():
    """One dual-stack lab with agents for the module; each test brings its own pods and Services."""
    prefix = "es" + uuid.uuid4().hex[:6]
    instance = Lab.up(DUAL_STACK, prefix=prefix, agents=True)
    try:
        yield add_clients(instance, {name: node for node, name in CLIENTS.items()})
    finally:
        instance.down()
    assert lab_leftovers(prefix) == []


def echo(name: str, node: str, kind: str = "http-echo", port: int = 8080, **labels: str) -> dict:
    return apps.pod(name, kind, port, node=node, labels={"pod": name, **labels})


def curl_answer(lab: Lab, client: str, ip: str, port: int) -> dict:
    result = curl(lambda argv, **kw: lab.exec(client, argv, **kw), ip, port, max_time=10)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_agents_serve_both_families_without_a_flag(lab):
    """deploy/'s arguments carry no --ip-families: each agent took IPv4,IPv6 from the ServiceCIDRs
    and found its Node's IPv6 address on its interfaces."""
    for node in ("node-1", "node-2"):
        log = (lab.state.path / f"agent-{node}.log").read_text()
        assert "IP families IPv4,IPv6 (the cluster's ServiceCIDRs)" in log, node
        n = node[-1]
        assert f"node addresses 198.18.0.1{n}, 2001:2::1{n} (Node {node})" in log, node
    argv = open(f"/proc/{lab.agent_record('node-1').pid}/cmdline").read().split("\0")
    assert "agent" in argv and not any("ip-families" in a for a in argv), argv


@pytest.mark.parametrize("client_node", ["node-1", "node-2"], ids=["same-node", "cross-node"])
def test_ipv6_clusterip_curl_and_udp_without_snat(lab, client_node):
    """An IPv6 single-stack Service, TCP (curl -g) and UDP, its backends on node-1: from a pod on the
    same node and from one on the other. The backend sees the client pod's own IPv6 address."""
    n = client_node[-1]
    web, dns, svc = f"w6-{n}", f"d6-{n}", f"s6-{n}"
    lab.apply([echo(web, "node-1"), echo(dns, "node-1", "udp-echo", 5353),
               service(svc, [{"port": 80, "targetPort": 8080}], selector={"pod": web}, ipFamilies=["IPv6"]),
               service(f"{svc}u", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"pod": dns},
                       ipFamilies=["IPv6"])])
    wait_ready(lab, [web, dns])
    vip, udp_vip = cluster_ip(lab, svc), cluster_ip(lab, f"{svc}u")
    assert ":" in vip and lab.service(svc)["spec"]["ipFamilies"] == ["IPv6"]
    wait_programmed(lab, svc, 80, backends=1)
    wait_programmed(lab, f"{svc}u", 53, backends=1, proto="UDP")
    client = CLIENTS[client_node]

    answer = curl_answer(lab, client, vip, 80)
    assert answer["pod"] == web and answer["client"] == v6(lab, client) and answer["localPort"] == 8080
    # Only the service port is a frontend: the clusterIP on the target port is nobody.
    assert connect_outcome(lab, client, vip, 8080) != "connected"
    # UDP: the answer comes back from the clusterIP (udp_ask checks it), sent by the backend.
    udp = wait_for(lambda: udp_ask_once(lab, client, udp_vip, 53, timeout=2), what="a UDP answer over IPv6")
    assert udp["pod"] == dns and udp["client"] == v6(lab, client) and udp["localPort"] == 5353


def test_prefer_dual_stack_service_reached_by_both_families(lab):
    """A PreferDualStack Service has a clusterIP of each family: the IPv4 one reaches the backends
    over IPv4 only, the IPv6 one over IPv6 only (each frontend's table holds its family's endpoints)."""
    lab.apply([echo("ds6-1", "node-1", app="ds6"), echo("ds6-2", "node-2", app="ds6"),
               service("ds6", [{"port": 80, "targetPort": 8080}], selector={"app": "ds6"},
                       ipFamilyPolicy="PreferDualStack")])
    wait_ready(lab, ["ds6-1", "ds6-2"])
    vip4, vip6 = cluster_ip(lab, "ds6", 4), cluster_ip(lab, "ds6", 6)
    assert lab.service("ds6")["spec"]["clusterIPs"] == [vip4, vip6]
    wait_programmed(lab, "ds6", 80, backends=2, family=4)
    wait_programmed(lab, "ds6", 80, backends=2, family=6)
    for node in ("node-1", "node-2"):
        assert table_backends(lab, node, frontend(lab, node, vip6, 80)) == {
            (v6(lab, p), 8080) for p in ("ds6-1", "ds6-2")}
        assert table_backends(lab, node, frontend(lab, node, vip4, 80)) == {
            (lab.pod_ip(p), 8080) for p in ("ds6-1", "ds6-2")}

    client = "c6-1"
    for vip, own in ((vip4, lab.pod_ip(client)), (vip6, v6(lab, client))):
        seen = set()
        for _ in range(40):      # a new source port each time: Maglev spreads them over both backends
            answer = http_get(lab, client, vip, 80)
            assert answer["client"] == own and answer["localPort"] == 8080, (vip, answer)
            seen.add(answer["pod"])
            if seen == {"ds6-1", "ds6-2"}:
                break
        assert seen == {"ds6-1", "ds6-2"}, vip


def test_client_ip_affinity_over_ipv6(lab):
    """sessionAffinity ClientIP on an IPv6 clusterIP: without it the source port decides (at least
    two backends over 30 ports); with it every new connection from the client goes where the first went."""
    pods = [f"af6-{i}" for i in (1, 2, 3)]
    lab.apply([echo(p, node, app="af6") for p, node in zip(pods, ("node-1", "node-2", "node-2"))])
    svc = service("af6", [{"port": 80, "targetPort": 8080}], selector={"app": "af6"}, ipFamilies=["IPv6"])
    lab.apply([svc])
    wait_ready(lab, pods)
    wait_programmed(lab, "af6", 80, backends=3)
    vip = cluster_ip(lab, "af6")
    ports = range(42000, 42030)

    def backends_by_port() -> dict[int, str]:
        return {p: http_get(lab, "c6-1", vip, 80, sport=p)["pod"] for p in ports}

    hashed = backends_by_port()
    assert len(set(hashed.values())) >= 2, hashed     # all 30 on one of three: below 1e-13

    lab.apply([{**svc, "spec": {**svc["spec"], "sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}}])
    wait_affinity(lab, "af6", 80, 600, nodes=["node-1"])
    first = http_get(lab, "c6-1", vip, 80, sport=ports[-1])["pod"]
    sticky = backends_by_port()
    assert set(sticky.values()) == {first}, sticky
    # Per client: the other node's client has its own entry (it sticks too, wherever it went first).
    other = {http_get(lab, "c6-2", vip, 80)["pod"] for _ in range(10)}
    assert len(other) == 1, other


def test_ipv6_service_without_endpoints_is_refused_at_once(lab):
    """No endpoints: a connection to the IPv6 clusterIP is refused (a TCP RST from the datapath), not
    left to time out; it serves once a pod is ready, nothing else re-applied."""
    lab.apply([service("none6", [{"port": 80, "targetPort": 8080}], selector={"app": "none6"},
                       ipFamilies=["IPv6"])])
    wait_programmed(lab, "none6", 80, backends=0)
    vip = cluster_ip(lab, "none6")
    for client in CLIENTS.values():
        assert connect_outcome(lab, client, vip, 80) == "refused"
    result = curl(lambda argv, **kw: lab.exec("c6-1", argv, **kw), vip, 80)
    assert result.returncode == 7, result.stderr            # curl: couldn't connect (refused)

    lab.apply([echo("none6-1", "node-2", app="none6")])
    wait_ready(lab, ["none6-1"])
    wait_programmed(lab, "none6", 80, backends=1)
    assert http_get(lab, "c6-1", vip, 80)["pod"] == "none6-1"


def test_ipv6_hairpin_pod_reaches_itself_through_its_service(lab):
    """The only backend of an IPv6 Service calls the Service: the answer comes from itself, and the
    backend saw its node's IPv6 address (the agent's IPv6 primary address, no flag), as the IPv4
    hairpin test sees the IPv4 one. Without the SNAT the pod would answer itself directly from its
    own address and the socket, connected to the clusterIP, would drop it: a timeout."""
    lab.apply([echo("hp6", "node-1"),
               service("hp6", [{"port": 80, "targetPort": 8080}], selector={"pod": "hp6"}, ipFamilies=["IPv6"])])
    wait_ready(lab, ["hp6"])
    wait_programmed(lab, "hp6", 80, backends=1)
    vip = cluster_ip(lab, "hp6")
    assert ":" in vip

    answer = http_get(lab, "hp6", vip, 80)

    assert answer["pod"] == "hp6" and answer["localPort"] == 8080
    assert answer["client"] == "2001:2::11"       # node-1's IPv6 InternalIP (examples/lab/dual-stack.yaml)


def test_ipv6_node_clients_reach_clusterips(lab):
    """A process in node-1's own namespace reaches IPv6 clusterIPs through the node-client device the
    agent routes the IPv6 service CIDR to: curl to a backend on node-1 and one on node-2, UDP, an
    empty Service refused at once. Backends see node-1's IPv6 address."""
    lab.apply([echo("h6-be-1", "node-1"), echo("h6-be-2", "node-2"), echo("h6-dns", "node-2", "udp-echo", 5353),
               service("h6-1", [{"port": 80, "targetPort": 8080}], selector={"pod": "h6-be-1"}, ipFamilies=["IPv6"]),
               service("h6-2", [{"port": 80, "targetPort": 8080}], selector={"pod": "h6-be-2"}, ipFamilies=["IPv6"]),
               service("h6-dns", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"pod": "h6-dns"},
                       ipFamilies=["IPv6"]),
               service("h6-none", [{"port": 80, "targetPort": 8080}], selector={"pod": "nobody"},
                       ipFamilies=["IPv6"])])
    wait_ready(lab, ["h6-be-1", "h6-be-2", "h6-dns"])
    for name in ("h6-1", "h6-2"):
        wait_programmed(lab, name, 80, backends=1)
    wait_programmed(lab, "h6-dns", 53, backends=1, proto="UDP")
    wait_programmed(lab, "h6-none", 80, backends=0)
    node1 = "2001:2::11"      # node-1's IPv6 InternalIP (examples/lab/dual-stack.yaml)

    for name, backend in (("h6-1", "h6-be-1"), ("h6-2", "h6-be-2")):
        out = lab.node_exec("node-1", ["curl", "-gsS", "--max-time", "5", f"http://[{cluster_ip(lab, name)}]/"])
        assert out.returncode == 0, (name, out.stderr)
        answer = json.loads(out.stdout)
        assert (answer["pod"], answer["client"], answer["localPort"]) == (backend, node1, 8080)

    query = lambda: lab.node_exec("node-1", [sys.executable, "-c", NODE_UDP_QUERY,  # noqa: E731
                                             cluster_ip(lab, "h6-dns"), "53"])
    out = wait_for(lambda: (r := query()).returncode == 0 and r, what="a UDP answer over IPv6 from node-1")
    answer = json.loads(out.stdout)
    assert answer["pod"] == "h6-dns" and answer["client"] == node1

    refused = lab.node_exec("node-1", ["curl", "-gsS", "--max-time", "5", f"http://[{cluster_ip(lab, 'h6-none')}]/"])
    assert refused.returncode == 7, refused.stderr          # connection refused, not a timeout


def test_ipv6_only_lab_serves_a_service(unique_prefix):
    """A single-stack IPv6 lab with agents (no IPv4 anywhere, no flag): the agents follow the IPv6
    ServiceCIDR, and a Service's clusterIP reaches a backend on the other node, the client's address kept."""
    lab = Lab.up(IPV6_ONLY, prefix=unique_prefix, agents=True)
    try:
        lab.apply([apps.pod("caller", "http-echo", 9000, node="node-1"),
                   echo("web", "node-2"), echo("dns", "node-2", "udp-echo", 5353),
                   service("web", [{"port": 80, "targetPort": 8080}], selector={"pod": "web"}),
                   service("dns", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"pod": "dns"})])
        wait_ready(lab, ["caller", "web", "dns"])
        vip, udp_vip = cluster_ip(lab, "web"), cluster_ip(lab, "dns")
        assert ":" in vip and pod_ips(lab, "caller") == [lab.pod_ip("caller")]
        wait_programmed(lab, "web", 80, backends=1)
        wait_programmed(lab, "dns", 53, backends=1, proto="UDP")
        log = (lab.state.path / "agent-node-1.log").read_text()
        assert "IP families IPv6 (the cluster's ServiceCIDRs)" in log

        answer = curl_answer(lab, "caller", vip, 80)
        assert answer["pod"] == "web" and answer["client"] == lab.pod_ip("caller")
        udp = wait_for(lambda: udp_ask_once(lab, "caller", udp_vip, 53, timeout=2), what="a UDP answer")
        assert udp["pod"] == "dns" and udp["client"] == lab.pod_ip("caller")
        assert connect_outcome(lab, "caller", vip, 8080) != "connected"
        assert "2001:2:" not in root_namespace_ipv6()
    finally:
        lab.down()
    assert lab_leftovers(unique_prefix) == []


NODE1_6, CLIENT_6 = "2001:2::11", "2001:2::100"


def _from_outside(lab: Lab, ip: str, port: int) -> dict | None:
    """One HTTP GET from the external client (a new connection); the http-echo answer, None if none."""
    result = curl(lambda argv, **kw: lab.external_exec("client", argv, **kw), ip, port, max_time=3)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _udp_from_outside(lab: Lab, ip: str, port: int) -> dict | None:
    """One datagram from the external client on a new flow; the udp-echo answer, None if none."""
    from ebpfsvc.datapath import nsenter
    import socket

    from .helpers import udp_ask

    sock = nsenter.socket_in(lab.external_netns("client"), socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.settimeout(2)
        sock.bind(("::", 0))
        return udp_ask(sock, ip, port)
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def test_ipv6_nodeport_from_outside_snat_and_local_policy(lab):
    """IPv6 NodePorts reached from the external client on node-1's IPv6 address. Backends on node-2,
    policy Cluster: node-1 SNATs to its own IPv6 address (the reply must come back through it) and the
    answer comes from [node-1]:nodePort, over TCP (curl) and UDP. Policy Local with the backend on
    node-1: DNAT only, the backend sees the client's own IPv6 address."""
    lab.apply([echo("n6c", "node-2"), echo("n6d", "node-2", "udp-echo", 5353), echo("n6l", "node-1"),
               service("n6c", [{"port": 80, "targetPort": 8080, "nodePort": 30280}], selector={"pod": "n6c"},
                       type="NodePort", ipFamilies=["IPv6"]),
               service("n6u", [{"port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30253}],
                       selector={"pod": "n6d"}, type="NodePort", ipFamilies=["IPv6"]),
               service("n6l", [{"port": 80, "targetPort": 8080, "nodePort": 30282}], selector={"pod": "n6l"},
                       type="NodePort", ipFamilies=["IPv6"], externalTrafficPolicy="Local")])
    wait_ready(lab, ["n6c", "n6d", "n6l"])
    from .test_northsouth import wait_external

    wait_external(lab, "node-1", NODE1_6, 30280, backends=1)
    wait_external(lab, "node-1", NODE1_6, 30253, backends=1, proto="UDP")
    wait_external(lab, "node-1", NODE1_6, 30282, backends=1)

    tcp = wait_for(lambda: _from_outside(lab, NODE1_6, 30280), what="IPv6 NodePort answer through node-1")
    assert tcp["pod"] == "n6c" and tcp["client"] == NODE1_6 and tcp["localPort"] == 8080   # SNAT to node-1
    udp = wait_for(lambda: _udp_from_outside(lab, NODE1_6, 30253), what="IPv6 NodePort UDP answer")
    assert udp["pod"] == "n6d" and udp["client"] == NODE1_6 and udp["localPort"] == 5353

    local = wait_for(lambda: _from_outside(lab, NODE1_6, 30282), what="IPv6 NodePort answer, policy Local")
    assert local["pod"] == "n6l" and local["client"] == CLIENT_6      # the client's address kept


def test_ipv6_node_clients_reach_their_own_nodeports_and_external_ips(lab):
    """kube-proxy's OUTPUT chain over IPv6 (docs/northsouth.md, "Node clients"): a process in node-1's
    own namespace reaches node-1's IPv6 NodePorts, which the kernel sends through lo (a backend on
    node-1 and one on node-2, UDP, policy Local served by the endpoint on node-2, no endpoint refused
    at once), and an IPv6 externalIP that node-1 routes out of its uplink (the route added in node-1's
    namespace only, as test_node_local.py does for IPv4). Backends see node-1's IPv6 address."""
    from .test_node_local import wait_served

    ext = "2001:2:0:200::33"
    lab.apply([echo("n6h-1", "node-1"), echo("n6h-2", "node-2"), echo("n6h-d", "node-2", "udp-echo", 5353),
               service("n6h-1", [{"port": 80, "targetPort": 8080, "nodePort": 30290}], selector={"pod": "n6h-1"},
                       type="NodePort", ipFamilies=["IPv6"]),
               service("n6h-2", [{"port": 80, "targetPort": 8080, "nodePort": 30291}], selector={"pod": "n6h-2"},
                       type="NodePort", ipFamilies=["IPv6"], externalTrafficPolicy="Local"),
               service("n6h-u", [{"port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30292}],
                       selector={"pod": "n6h-d"}, type="NodePort", ipFamilies=["IPv6"]),
               service("n6h-none", [{"port": 80, "targetPort": 8080, "nodePort": 30293}], selector={"pod": "nobody"},
                       type="NodePort", ipFamilies=["IPv6"]),
               service("n6h-ext", [{"port": 80, "targetPort": 8080}], selector={"pod": "n6h-2"},
                       ipFamilies=["IPv6"], externalIPs=[ext])])
    wait_ready(lab, ["n6h-1", "n6h-2", "n6h-d"])
    for port, backends, proto in ((30290, 1, "TCP"), (30291, 1, "TCP"), (30292, 1, "UDP"), (30293, 0, "TCP")):
        wait_served(lab, NODE1_6, port, backends=backends, proto=proto)
    wait_served(lab, ext, 80, backends=1)

    def from_node1(address: str, port: int):
        return curl(lambda argv, **kw: lab.node_exec("node-1", argv, **kw), address, port)

    # Its own NodePorts: the backend on node-1 (a pod veth), the one on node-2 (the uplink), and
    # policy Local with the only endpoint on node-2, served from node-1 all the same.
    for port, pod in ((30290, "n6h-1"), (30291, "n6h-2")):
        out = from_node1(NODE1_6, port)
        assert out.returncode == 0, (port, out.stderr)
        answer = json.loads(out.stdout)
        assert (answer["pod"], answer["client"], answer["localPort"]) == (pod, NODE1_6, 8080)
    query = lambda: lab.node_exec("node-1", [sys.executable, "-c", NODE_UDP_QUERY, NODE1_6, "30292"])  # noqa: E731
    out = wait_for(lambda: (r := query()).returncode == 0 and r, what="a UDP answer from node-1's own IPv6 NodePort")
    assert json.loads(out.stdout)["pod"] == "n6h-d" and json.loads(out.stdout)["client"] == NODE1_6
    refused = from_node1(NODE1_6, 30293)
    assert refused.returncode == 7, refused.stderr          # connection refused (the RST on lo), not a timeout

    routed = lab.node_exec("node-1", ["ip", "-6", "route", "replace", "2001:2:0:200::/64", "via", CLIENT_6])
    assert routed.returncode == 0, routed.stderr
    try:
        out = from_node1(ext, 80)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert (answer["pod"], answer["client"]) == ("n6h-2", NODE1_6)
    finally:
        lab.node_exec("node-1", ["ip", "-6", "route", "del", "2001:2:0:200::/64"])
