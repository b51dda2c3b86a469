"""The node's own clients (a hostNetwork pod, a node daemon: processes in node-1's namespace) to
NodePorts, LoadBalancer IPs and externalIPs, on the wire, as kube-proxy serves them from its
OUTPUT chain (docs/northsouth.md, "Node clients"):

- node-1's own address + nodePort, which the kernel sends through `lo` (from_loopback): a
  backend on node-1 and one on node-2, UDP, externalTrafficPolicy Local served by the endpoint
  on node-2 (kube-proxy sends node-originated traffic to the cluster chain), no endpoint refused;
- node-2's NodePort: plain traffic out of node-1, served by node-2 as for any external client;
- an externalIP and a LoadBalancer IP, which node-1 routes out of its uplink (the route a real
  node has to its upstream router; added here in node-1's namespace, as kube-proxy also needs
  one): caught on the uplink's egress on their service ports (to_uplink).

nodePorts are allocated by the API server and read back from the Service.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, apps

from .helpers import NODE_UDP_QUERY, node_maps, service, wait_for, wait_ready

pytestmark = pytest.mark.root

NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
ROUTER = "198.18.0.100"                   # the lab's external client, node-1's upstream router here
EXTERNAL = "198.18.200.0/24"              # LoadBalancer and external IPs (docs/lab.md)


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return shared_lab


def echo(name: str, node: str, port: int = 8080, app: str = "http-echo") -> dict:
    return apps.pod(name, app, port, node=node, labels={"pod": name})


def node_port(lab: Lab, name: str) -> int:
    return lab.service(name)["spec"]["ports"][0]["nodePort"]


def wait_served(lab: Lab, address: str, port: int, backends: int, proto: str = "TCP", node: str = "node-1",
                scope: str = "internal") -> None:
    """Wait until `node`'s agent serves address:port: to the node itself (INTERNAL scope, by
    default), or to clients from outside ("external")."""
    def done() -> bool:
        with node_maps(lab, node) as maps:
            fe = maps.frontend(address, port, proto, scope)
        return fe is not None and fe.backend_count == backends and not lab.programs_compiling(node)

    wait_for(done, what=f"{node}: {scope} frontend {address}:{port}/{proto} with {backends} backends")


def curl_from_node1(lab: Lab, url: str, timeout: float = 5.0):
    return lab.node_exec("node-1", ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)


def answer_from_node1(lab: Lab, url: str) -> dict:
    out = curl_from_node1(lab, url)
    assert out.returncode == 0, (url, out.stderr)
    return json.loads(out.stdout)


def refused_at_once(lab: Lab, host: str, port: int) -> None:
    """curl gives up with exit 7, and the connect() says why: a reset (not a timeout, not
    "unreachable"), within the second."""
    out = curl_from_node1(lab, f"http://{host}:{port}/")
    assert out.returncode == 7, out.stderr
    sock = nsenter.socket_in(lab.node_netns("node-1"), socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        with pytest.raises(ConnectionRefusedError):
            sock.connect((host, port))
    finally:
        sock.close()




def test_the_node_reaches_its_own_nodeports_and_node2s(lab):
    lab.apply([echo("nl-be-1", "node-1"), echo("nl-be-2", "node-2"), echo("nl-dns", "node-2", 5353, "udp-echo"),
               service("nl-1", [{"port": 80, "targetPort": 8080}], selector={"pod": "nl-be-1"}, type="NodePort"),
               service("nl-2", [{"port": 80, "targetPort": 8080}], selector={"pod": "nl-be-2"}, type="NodePort"),
               service("nl-local", [{"port": 80, "targetPort": 8080}], selector={"pod": "nl-be-2"},
                       type="NodePort", externalTrafficPolicy="Local"),
               service("nl-dns", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"pod": "nl-dns"},
                       type="NodePort"),
               service("nl-none", [{"port": 80, "targetPort": 8080}], selector={"pod": "nobody"}, type="NodePort")])
    wait_ready(lab, ["nl-be-1", "nl-be-2", "nl-dns"])
    ports = {name: node_port(lab, name) for name in ("nl-1", "nl-2", "nl-local", "nl-dns", "nl-none")}
    for name in ("nl-1", "nl-2", "nl-local"):
        wait_served(lab, NODE1, ports[name], backends=1)
    wait_served(lab, NODE1, ports["nl-dns"], backends=1, proto="UDP")
    wait_served(lab, NODE1, ports["nl-none"], backends=0)
    for name in ("nl-1", "nl-2"):
        wait_served(lab, NODE2, ports[name], backends=1, node="node-2", scope="external")

    # Its own NodePort: a backend on node-1, one on node-2; the backend sees the node address.
    for name, pod in (("nl-1", "nl-be-1"), ("nl-2", "nl-be-2")):
        answer = answer_from_node1(lab, f"http://{NODE1}:{ports[name]}/")
        assert (answer["pod"], answer["client"], answer["localPort"]) == (pod, NODE1, 8080)

    # externalTrafficPolicy Local, the only endpoint on node-2: served from node-1 itself.
    answer = answer_from_node1(lab, f"http://{NODE1}:{ports['nl-local']}/")
    assert (answer["pod"], answer["client"]) == ("nl-be-2", NODE1)

    # UDP to its own NodePort: the answer comes from node-1:nodePort (a connected socket).
    query = lambda: lab.node_exec("node-1", [sys.executable, "-c", NODE_UDP_QUERY,  # noqa: E731
                                             NODE1, str(ports["nl-dns"])])
    out = wait_for(lambda: (r := query()).returncode == 0 and r, what="a UDP answer from node-1's own NodePort")
    answer = json.loads(out.stdout)
    assert (answer["pod"], answer["client"]) == ("nl-dns", NODE1)

    # node-2's NodePort: node-1 is a client like any other there (SNAT to node-2 for node-1's pod).
    answer = answer_from_node1(lab, f"http://{NODE2}:{ports['nl-2']}/")
    assert (answer["pod"], answer["client"]) == ("nl-be-2", NODE1)
    answer = answer_from_node1(lab, f"http://{NODE2}:{ports['nl-1']}/")
    assert (answer["pod"], answer["client"]) == ("nl-be-1", NODE2)

    # No endpoint: refused at once.
    refused_at_once(lab, NODE1, ports["nl-none"])
    # Another port of the node address is not captured: nothing listens there, the node's own RST.
    refused_at_once(lab, NODE1, 22)


def test_the_node_reaches_load_balancer_ips_and_external_ips(lab):
    lab.apply([echo("nl-lb-be", "node-2"), echo("nl-ext-be", "node-1"),
               {**service("nl-lb", [{"port": 3000, "targetPort": 8080}], selector={"pod": "nl-lb-be"},
                          type="LoadBalancer", externalTrafficPolicy="Local"),
                "metadata": {"name": "nl-lb", "annotations": {"lab.ebpfsvc.io/lb-ip": "198.18.200.11"}}},
               service("nl-ext", [{"port": 80, "targetPort": 8080}], selector={"pod": "nl-ext-be"},
                       externalIPs=["198.18.200.33"]),
               service("nl-ext-none", [{"port": 80, "targetPort": 8080}], selector={"pod": "nobody"},
                       externalIPs=["198.18.200.34"])])
    wait_ready(lab, ["nl-lb-be", "nl-ext-be"])
    wait_served(lab, "198.18.200.11", 3000, backends=1)
    wait_served(lab, "198.18.200.33", 80, backends=1)
    wait_served(lab, "198.18.200.34", 80, backends=0)

    routed = lab.node_exec("node-1", ["ip", "route", "replace", EXTERNAL, "via", ROUTER])
    assert routed.returncode == 0, routed.stderr
    try:
        # LoadBalancer IP, policy Local, the endpoint on node-2: served from node-1 all the same.
        answer = answer_from_node1(lab, "http://198.18.200.11:3000/")
        assert (answer["pod"], answer["client"], answer["localPort"]) == ("nl-lb-be", NODE1, 8080)
        # externalIP, the endpoint on node-1 itself.
        answer = answer_from_node1(lab, "http://198.18.200.33/")
        assert (answer["pod"], answer["client"]) == ("nl-ext-be", NODE1)
        refused_at_once(lab, "198.18.200.34", 80)
    finally:
        lab.node_exec("node-1", ["ip", "route", "del", EXTERNAL])


def test_a_host_network_endpoint_of_the_node_itself(lab):
    """A hostNetwork endpoint of node-1 (a process in its namespace, so its address is node-1's)
    behind a ClusterIP and a NodePort: node-1 reaches it through both (the translated packet goes
    in through lo, the reply is translated on lo's egress), and the external client through
    node-1's NodePort keeps reaching it."""
    import subprocess

    from ebpfsvc.lab.processes import base_env

    server = lab.node_popen("node-1", [sys.executable, "-m", "ebpfsvc.lab.apps", "http-echo", "--port", "18080"],
                            env={**base_env(), "POD_NAME": "node-1-itself"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lab.node_exec("node-1", ["ss", "-Hltn", "sport = :18080"]).stdout.strip(),
                 what="the node's own server listening")
        lab.apply([service("nl-host", [{"name": "http", "port": 80, "targetPort": 18080}], type="NodePort"),
                   {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "nl-host-manual", "labels": {"kubernetes.io/service-name": "nl-host"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 18080}],
                    "endpoints": [{"addresses": [NODE1], "conditions": {"ready": True}, "nodeName": "node-1"}]}])
        cluster_ip, port = lab.service("nl-host")["spec"]["clusterIP"], node_port(lab, "nl-host")
        wait_served(lab, cluster_ip, 80, backends=1)
        wait_served(lab, NODE1, port, backends=1)
        wait_served(lab, NODE1, port, backends=1, scope="external")

        for url in (f"http://{cluster_ip}/", f"http://{NODE1}:{port}/"):
            answer = answer_from_node1(lab, url)
            assert (answer["pod"], answer["client"], answer["localPort"]) == ("node-1-itself", NODE1, 18080), url
        out = lab.external_exec("client", ["curl", "-sS", "--max-time", "5", f"http://{NODE1}:{port}/"], timeout=15)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["client"] == ROUTER        # the external client, its address kept
    finally:
        server.kill()
        server.wait(timeout=5)
