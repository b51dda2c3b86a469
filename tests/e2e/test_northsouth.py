"""North-south on the wire: the lab's external client (198.18.0.100, outside the cluster)
reaches NodePort, externalIP and LoadBalancer frontends through the node agents' uplink
programs (bpf/lb_node.c), and the backends say who they saw.

One lab for the module; every test brings its own pods and Services. The client routes
198.18.200.0/24 (LB / external IPs) via node-1; a test that needs another node for such an
address adds a /32 route in the client's namespace (a lab namespace, never the root one).
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, apps

from .helpers import (add_clients, cluster_ip, connect_outcome, drops, node_maps, service, udp_ask, wait_for,
                      wait_programmed, wait_ready)

pytestmark = pytest.mark.root

NODES = {"node-1": "198.18.0.11", "node-2": "198.18.0.12"}
CLIENT = "198.18.0.100"


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


# A node process's own connection to a backend, held open (bounded: 60 s).
NODE_CONNECTION = """
import socket, time
s = socket.socket()
s.bind(("{node}", {port}))
s.connect(("{backend}", 8080))
time.sleep(60)
"""


def echo(name: str, node: str, port: int = 8080) -> dict:
    return apps.pod(name, "http-echo", port, node=node, labels={"pod": name})


def curl(lab: Lab, url: str, timeout: float = 3.0, local_port: int | None = None) -> dict | None:
    """One HTTP GET from the external client (new connection); the http-echo answer, None if none."""
    return curl_or_why(lab, url, timeout, local_port)[0]


def curl_or_why(lab: Lab, url: str, timeout: float = 3.0,
                local_port: int | None = None) -> tuple[dict | None, str]:
    """curl(), and when there is no answer, why: curl's exit code (7 refused, 28 timed out) and
    its message, for an assertion to show."""
    port = ["--local-port", str(local_port)] if local_port else []
    out = lab.external_exec("client", ["curl", "-sS", "--max-time", str(timeout), *port, url], timeout=timeout + 10)
    if out.returncode != 0:
        return None, f"curl exit {out.returncode}: {out.stderr.strip()}"
    return json.loads(out.stdout), ""


def wait_external(lab: Lab, node: str, address: str, port: int, backends: int, proto: str = "TCP") -> None:
    """Wait until `node`'s agent serves address:port (EXTERNAL scope) with `backends` backends."""
    def done() -> bool:
        with node_maps(lab, node) as maps:
            fe = maps.frontend(address, port, proto, "external")
        return fe is not None and fe.backend_count == backends and not lab.programs_compiling(node)

    wait_for(done, what=f"{node}: external frontend {address}:{port}/{proto} with {backends} backends")


def test_nodeport_cluster_policy_through_every_node(lab):
    """Backend on node-2 only. Through node-2: DNAT only, the client address survives.
    Through node-1: SNAT to node-1 (the reply must come back through it), answered from
    node-1:nodePort all the same."""
    lab.apply([echo("np-c", "node-2"),
               service("np-c", [{"port": 80, "targetPort": 8080, "nodePort": 30180}], selector={"pod": "np-c"},
                       type="NodePort")])
    wait_ready(lab, ["np-c"])
    for node in NODES:
        wait_external(lab, node, NODES[node], 30180, backends=1)

    via_2 = wait_for(lambda: curl(lab, "http://198.18.0.12:30180/"), what="answer through node-2")
    assert via_2["pod"] == "np-c" and via_2["client"] == CLIENT and via_2["localPort"] == 8080

    via_1 = wait_for(lambda: curl(lab, "http://198.18.0.11:30180/", local_port=42001), what="answer through node-1")
    assert via_1["pod"] == "np-c"
    assert via_1["client"] == NODES["node-1"]          # SNAT: the backend is on another node
    assert via_1["clientPort"] == 42001                # a free client port is kept, as Linux NAT does

    # Twenty connections through node-1: each its own SNAT port, all answered.
    ports = set()
    for _ in range(20):
        answer = curl(lab, "http://198.18.0.11:30180/")
        assert answer is not None
        ports.add(answer["clientPort"])
    assert len(ports) == 20

    # node-1 itself holds a connection to the backend from port 42002: a client coming from
    # 42002 cannot keep it (the backend would see one tuple for two connections) and gets a
    # port of the SNAT range instead.
    holder = lab.node_popen("node-1", ["python3", "-c", NODE_CONNECTION.format(
        node=NODES["node-1"], port=42002, backend=lab.pod_ip("np-c"))], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: lab.node_exec("node-1", ["ss", "-Hnt", "state", "established", "sport = :42002"]).stdout,
                 what="node-1's own connection from port 42002")
        answer = curl(lab, "http://198.18.0.11:30180/", local_port=42002)
        assert answer is not None and answer["client"] == NODES["node-1"]
        assert 61000 <= answer["clientPort"] <= 65535, answer
    finally:
        holder.kill()
        holder.wait(timeout=5)

    # Other ports of the node address are not captured: nothing listens on 30181 -> refused by the node.
    out = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", "http://198.18.0.11:30181/"])
    assert out.returncode == 7, out.stderr    # curl: connection refused (the node's own RST)


def test_nodeport_local_policy_keeps_client_and_drops_without_local_backend(lab):
    lab.apply([echo("np-l", "node-1"),
               service("np-l", [{"port": 80, "targetPort": 8080, "nodePort": 30182}], selector={"pod": "np-l"},
                       type="NodePort", externalTrafficPolicy="Local")])
    wait_ready(lab, ["np-l"])
    wait_external(lab, "node-1", NODES["node-1"], 30182, backends=1)
    wait_external(lab, "node-2", NODES["node-2"], 30182, backends=0)

    answer = wait_for(lambda: curl(lab, "http://198.18.0.11:30182/"), what="answer through node-1")
    assert answer["pod"] == "np-l" and answer["client"] == CLIENT

    before = drops(lab, "node-2").get("no_local_backend", 0)
    assert curl(lab, "http://198.18.0.12:30182/", timeout=2) is None     # dropped: no answer at all
    assert drops(lab, "node-2").get("no_local_backend", 0) > before


def test_local_policies_without_any_endpoint_are_refused(lab):
    """Both traffic policies Local and no endpoint anywhere: refused at once (a RST), from outside
    through the NodePort and from a pod to the clusterIP, as kube-proxy v1.37.2 rejects a Service
    with no endpoints whatever its policies; a drop would leave the clients hanging."""
    add_clients(lab, {"ns-none-cl": "node-1"})
    lab.apply([service("np-none", [{"port": 80, "targetPort": 8080, "nodePort": 30183}],
                       selector={"pod": "nobody-has-this-label"}, type="NodePort",
                       externalTrafficPolicy="Local", internalTrafficPolicy="Local")])
    wait_external(lab, "node-1", NODES["node-1"], 30183, backends=0)
    before = drops(lab, "node-1")
    out = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", "http://198.18.0.11:30183/"])
    assert out.returncode == 7, out.stderr    # curl: connection refused
    assert connect_outcome(lab, "ns-none-cl", cluster_ip(lab, "np-none"), 80) == "refused"
    after = drops(lab, "node-1")
    assert after.get("no_backend", 0) >= before.get("no_backend", 0) + 2     # ours, not the kernel's RST
    assert after.get("no_local_backend", 0) == before.get("no_local_backend", 0)


def test_external_ip_and_load_balancer(lab):
    lab.apply([echo("ext", "node-2"),
               service("ext", [{"port": 80, "targetPort": 8080}], selector={"pod": "ext"},
                       externalIPs=["198.18.200.32"]),
               echo("lb", "node-1"),
               {**service("lb", [{"port": 3000, "targetPort": 8080}], selector={"pod": "lb"},
                          type="LoadBalancer", externalTrafficPolicy="Local"),
                "metadata": {"name": "lb", "annotations": {"lab.ebpfsvc.io/lb-ip": "198.18.200.10"}}}])
    wait_ready(lab, ["ext", "lb"])
    wait_external(lab, "node-1", "198.18.200.32", 80, backends=1)
    wait_external(lab, "node-1", "198.18.200.10", 3000, backends=1)

    ext = wait_for(lambda: curl(lab, "http://198.18.200.32/"), what="externalIP answer")
    assert ext["pod"] == "ext" and ext["client"] == NODES["node-1"]      # Cluster, remote backend: SNAT
    lb = wait_for(lambda: curl(lab, "http://198.18.200.10:3000/"), what="LoadBalancer answer")
    assert lb["pod"] == "lb" and lb["client"] == CLIENT                  # Local: source preserved

    # The same externalIP through node-2 (a /32 route in the client's namespace): backend local there.
    lab.external_exec("client", ["ip", "route", "replace", "198.18.200.32/32", "via", "198.18.0.12"])
    try:
        wait_external(lab, "node-2", "198.18.200.32", 80, backends=1)
        via_2 = wait_for(lambda: curl(lab, "http://198.18.200.32/"), what="externalIP through node-2")
        assert via_2["pod"] == "ext" and via_2["client"] == CLIENT
    finally:
        lab.external_exec("client", ["ip", "route", "del", "198.18.200.32/32"])


def _udp_from_client(lab: Lab, host: str, port: int) -> dict:
    """One datagram from the external client on a new flow; the udp-echo answer (raises if none)."""
    sock = nsenter.socket_in(lab.external_netns("client"), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(2)
        sock.bind(("0.0.0.0", 0))
        return udp_ask(sock, host, port)
    finally:
        sock.close()


def test_clusterip_routed_from_outside_the_cluster(lab):
    """Issue 17 item 2: an upstream router (here the client's own route for the service CIDR,
    in its lab namespace) sends ClusterIP traffic to node-1, which serves it as kube-proxy does
    in PREROUTING: the backend on node-1 sees the client (DNAT only, as for NodePorts), the one
    on node-2 sees node-1 (SNAT: its reply must come back through node-1); TCP and UDP, and
    every answer comes from the ClusterIP (curl and udp_ask would not take it otherwise)."""
    pods = {"offnode-1": "node-1", "offnode-2": "node-2"}
    upods = {"offnode-u1": "node-1", "offnode-u2": "node-2"}
    lab.apply([*(apps.pod(n, "http-echo", 8080, node=node, labels={"app": "offnode"}) for n, node in pods.items()),
               *(apps.pod(n, "udp-echo", 5353, node=node, labels={"app": "offnode-u"}) for n, node in upods.items()),
               service("offnode", [{"port": 80, "targetPort": 8080}], selector={"app": "offnode"}),
               service("offnode-u", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                       selector={"app": "offnode-u"})])
    wait_ready(lab, [*pods, *upods])
    wait_programmed(lab, "offnode", 80, backends=2, nodes=["node-1"])
    wait_programmed(lab, "offnode-u", 53, backends=2, nodes=["node-1"], proto="UDP")
    vip, uvip = cluster_ip(lab, "offnode"), cluster_ip(lab, "offnode-u")

    cidr = str(lab.spec.service_cidr)
    added = lab.external_exec("client", ["ip", "route", "replace", cidr, "via", NODES["node-1"]])
    assert added.returncode == 0, added.stderr
    try:
        seen: dict[str, dict] = {}
        wait_for(lambda: curl(lab, f"http://{vip}/"), what="a first answer from the ClusterIP")
        for port in range(43100, 43164):              # new flows until Maglev has sent one to each
            # 10 s: a SYN lost to a loaded machine is sent again after 1 s and 3 s; the answer
            # names curl's failure and node-1's drop counters, so a fault shows what it was.
            answer, why = curl_or_why(lab, f"http://{vip}/", timeout=10, local_port=port)
            assert answer is not None, (f"no answer from {vip}:80 from client port {port} ({why}); "
                                        f"node-1 drops {drops(lab, 'node-1')}")
            seen.setdefault(answer["pod"], answer)
            if len(seen) == 2:
                break
        assert set(seen) == set(pods), seen
        assert seen["offnode-1"]["client"] == CLIENT              # local backend: client kept
        assert seen["offnode-2"]["client"] == NODES["node-1"]     # remote backend: SNAT to node-1

        useen: dict[str, dict] = {}
        wait_for(lambda: _udp_from_client(lab, uvip, 53), what="a first UDP answer from the ClusterIP")
        for _ in range(64):
            answer = _udp_from_client(lab, uvip, 53)
            useen.setdefault(answer["pod"], answer)
            if len(useen) == 2:
                break
        assert set(useen) == set(upods), useen
        assert useen["offnode-u1"]["client"] == CLIENT
        assert useen["offnode-u2"]["client"] == NODES["node-1"]
    finally:
        lab.external_exec("client", ["ip", "route", "del", cidr])


def _iperf3(lab: Lab, pod: str, target: str, port: int, seconds: int = 3) -> dict:
    """iperf3 from the external client to target:port, server in `pod`.

    The server runs until the end (not `-1`: a one-off server exits after any client, even
    one that failed, and would turn one lost attempt into "refused" for all that follow) and
    is listening before the first attempt. A failed attempt is tried again, at most twice;
    the answer names every failure, so a datapath fault is never hidden behind a retry."""
    server = lab.popen(pod, ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lab.exec(pod, ["ss", "-Hltn", "sport = :5201"]).stdout.strip(),
                 what=f"iperf3 listening in {pod}")
        failures = []
        for _ in range(3):
            out = lab.external_exec("client", ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J",
                                               "--connect-timeout", "5000"], timeout=seconds + 30)
            result = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {"error": out.stderr}
            if "error" not in result:
                return {**result, "failed_attempts": failures}
            failures.append(result["error"])
        return {"error": failures}
    finally:
        server.kill()
        server.wait(timeout=5)


@pytest.mark.parametrize("node,full_checksums", [("node-1", False), ("node-2", False), ("node-1", True)],
                         ids=["snat", "local", "snat-full-checksums"])
def test_iperf3_through_nodeport(lab, node, full_checksums):
    """A long transfer through NodePort: node-1 SNATs to node-2's pod, node-2 delivers locally.
    With checksum offload off (as from a real NIC: full checksums, no TSO) the packets are
    MTU-sized and both CPUs handle the flow at once, which once restarted it mid-stream."""
    from ebpfsvc.bench.nodeport import tx_checksum

    name = f"perf-{node}" + ("-csum" if full_checksums else "")
    port = 30201 + int(node[-1]) + (30 if full_checksums else 0)
    lab.apply([apps.pod(name, "http-echo", 8080, node="node-2", labels={"pod": name}),
               service(name, [{"port": 5201, "targetPort": 5201, "nodePort": port}],
                       selector={"pod": name}, type="NodePort")])
    wait_ready(lab, [name])
    wait_external(lab, node, NODES[node], port, backends=1)
    senders = [lab.external_netns("client"), lab.pod_netns(name)]
    try:
        if full_checksums:
            for netns in senders:
                tx_checksum(netns, "eth0", False)
        result = _iperf3(lab, name, NODES[node], port)
    finally:
        if full_checksums:
            for netns in senders:
                tx_checksum(netns, "eth0", True)
    assert "error" not in result, result["error"]
    assert len(result["failed_attempts"]) <= 1, result["failed_attempts"]
    received = result["end"]["sum_received"]
    assert received["bytes"] > 1_000_000
    assert result["end"]["sum_sent"]["retransmits"] is not None


@pytest.mark.parametrize("backend_node", ["node-2", "node-1"], ids=["snat", "local"])
def test_iperf3_and_curl_through_nodeport_with_xdp(lab, backend_node):
    """--uplink-mode xdp's program on node-1's uplink (plus XDP_PASS on its veth peer, which veth
    needs for XDP_TX): the same answers, and a long transfer, through NodePort on node-1."""
    from ebpfsvc.bench.nodeport import XdpMode

    name = f"xdp-{backend_node}"
    port = 30211 + int(backend_node[-1])
    lab.apply([apps.pod(name, "http-echo", 8080, node=backend_node, labels={"pod": name}),
               service(name, [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": port},
                              {"name": "perf", "port": 5201, "targetPort": 5201, "nodePort": port + 10}],
                       selector={"pod": name}, type="NodePort")])
    wait_ready(lab, [name])
    wait_external(lab, "node-1", NODES["node-1"], port, backends=1)
    wait_external(lab, "node-1", NODES["node-1"], port + 10, backends=1)
    with XdpMode(lab):
        answer = wait_for(lambda: curl(lab, f"http://198.18.0.11:{port}/"), what="answer with XDP")
        assert answer["pod"] == name
        assert answer["client"] == (NODES["node-1"] if backend_node == "node-2" else CLIENT)
        result = _iperf3(lab, name, NODES["node-1"], port + 10)
    assert "error" not in result, result["error"]
    assert len(result["failed_attempts"]) <= 1, result["failed_attempts"]
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
