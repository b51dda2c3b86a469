"""ClusterIP Services on the wire: a node agent per lab node, real servers in pods, real clients.

One lab for the module (the `shared_lab` fixture): every test brings its own pods and Services
(distinct names, so distinct clusterIPs) and leaves the others' alone.  Clients are sockets
created in a client pod's namespace (tests/e2e/helpers.py), or real programs (redis-cli).
Each test waits for the agents to program what it applied by reading their pinned maps (a
bounded poll), then proves the behaviour with traffic.
"""

from __future__ import annotations

import json
import sys

import pytest

from ebpfsvc.lab import Lab, apps

from .helpers import (NODE_UDP_QUERY, add_clients, bare_pod, cluster_ip, connect_outcome, drops, http_get,
                      programmed_services, service, udp_ask, udp_ask_once, udp_socket, wait_for,
                      wait_programmed, wait_ready)

pytestmark = pytest.mark.root

CLIENTS = {"node-1": "cl-1", "node-2": "cl-2"}   # process-less pods: a namespace, an IP, a veth


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    """The shared lab with one client pod per node and the agents' programs on their veths."""
    return add_clients(shared_lab, {name: node for node, name in CLIENTS.items()})


def echo(name: str, node: str, port: int = 8080, kind: str = "http-echo", **labels: str) -> dict:
    """A test app pod labelled pod=<name> (to select exactly it) plus `labels`."""
    return apps.pod(name, kind, port, node=node, labels={"pod": name, **labels})


def answers_until_all(ask, wanted: set[str], tries: int) -> dict[str, dict]:
    """Ask (a new flow each time) until every backend in `wanted` answered, at most `tries` times."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        answer = ask()
        seen.setdefault(answer["pod"], answer)
        if wanted <= set(seen):
            break
    return seen


# -- ClusterIP basics -----------------------------------------------------------------------------


@pytest.mark.parametrize("client_node", ["node-1", "node-2"], ids=["same-node", "cross-node"])
def test_clusterip_reaches_backend_without_snat(lab, client_node):
    """A pod reaches a ClusterIP whose only backend is on node-1, from node-1 and from node-2 (curl).

    The backend names itself, and sees the client pod's own address: no SNAT for pod traffic.
    Service port 80 -> targetPort 8080: the backend is reached on 8080, the client talks to :80.
    """
    svc = f"basic-{client_node}"
    backend = f"basic-be-{client_node}"
    lab.apply([echo(backend, "node-1"),
               service(svc, [{"port": 80, "targetPort": 8080}], selector={"pod": backend})])
    wait_ready(lab, [backend])
    wait_programmed(lab, svc, 80, backends=1)
    client = CLIENTS[client_node]

    curl = lab.exec(client, ["curl", "-sS", "--max-time", "10", f"http://{cluster_ip(lab, svc)}/"])
    assert curl.returncode == 0, curl.stderr
    answer = json.loads(curl.stdout)

    assert answer["pod"] == backend
    assert answer["client"] == lab.pod_ip(client)
    assert answer["localPort"] == 8080
    # Only the service port is a frontend: the clusterIP on the target port is nobody.
    assert connect_outcome(lab, client, cluster_ip(lab, svc), 8080) != "connected"


def test_named_target_port_resolves_per_endpoint(lab):
    """targetPort: http names container ports with different numbers on each pod (8081 / 9091)."""
    pods = [apps.pod("named-a", "http-echo", 8081, node="node-1", labels={"app": "named"}, port_name="http"),
            apps.pod("named-b", "http-echo", 9091, node="node-2", labels={"app": "named"}, port_name="http")]
    lab.apply(pods + [service("named", [{"port": 80, "targetPort": "http"}], selector={"app": "named"})])
    wait_ready(lab, ["named-a", "named-b"])
    wait_programmed(lab, "named", 80, backends=2)
    vip = cluster_ip(lab, "named")

    # Each new connection has a new source port, so Maglev picks by a new hash: with two
    # backends of ~half the table each, 60 connections all missing one has probability < 1e-17.
    seen = answers_until_all(lambda: http_get(lab, "cl-1", vip, 80), {"named-a", "named-b"}, tries=60)

    assert set(seen) == {"named-a", "named-b"}
    assert seen["named-a"]["localPort"] == 8081
    assert seen["named-b"]["localPort"] == 9091


def test_multi_port_service_maps_each_port_to_its_target(lab):
    """Two service ports on one Service -> two different target ports of the same pod."""
    app = f"{sys.executable} -m ebpfsvc.lab.apps http-echo --port"
    run_both = f"{app} 8080 & exec {app} 9090"     # one pod, two servers (the group dies together)
    pod = bare_pod("multi-be", "node-2", labels={"app": "multi"}, command=["sh", "-c", run_both],
                   ports=[{"name": "web", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}])
    pod["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": "admin"}}
    lab.apply([pod, service("multi", [{"name": "web", "port": 80, "targetPort": "web"},
                                      {"name": "admin", "port": 81, "targetPort": 9090}],
                            selector={"app": "multi"})])
    wait_ready(lab, ["multi-be"])
    wait_programmed(lab, "multi", 80, backends=1)
    wait_programmed(lab, "multi", 81, backends=1)
    vip = cluster_ip(lab, "multi")

    web = wait_for(lambda: http_get(lab, "cl-1", vip, 80), what="port 80 (8080 may still be starting)")
    admin = http_get(lab, "cl-1", vip, 81)

    assert (web["pod"], web["localPort"]) == ("multi-be", 8080)
    assert (admin["pod"], admin["localPort"]) == ("multi-be", 9090)


def test_udp_service(lab):
    """UDP ClusterIP 53 -> 5353 over two udp-echo pods: answers come back from the VIP, the
    backends see the client's own address, and different flows reach both backends."""
    pods = [echo("dns-a", "node-1", 5353, "udp-echo", app="dns"), echo("dns-b", "node-2", 5353, "udp-echo", app="dns")]
    lab.apply(pods + [service("dns", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                              selector={"app": "dns"})])
    wait_ready(lab, ["dns-a", "dns-b"])       # no probe for UDP: ready once started
    wait_programmed(lab, "dns", 53, backends=2, proto="UDP")
    vip = cluster_ip(lab, "dns")

    # Ready means started for a UDP app (no probe): wait until each one answers directly.
    for pod in ("dns-a", "dns-b"):
        wait_for(lambda: udp_ask_once(lab, "cl-2", lab.pod_ip(pod), 5353, timeout=1), what=f"{pod} bound")
    # A new socket per flow: 60 flows all on one of two ~equal halves: probability < 1e-17.
    seen = answers_until_all(lambda: udp_ask_once(lab, "cl-2", vip, 53), {"dns-a", "dns-b"}, tries=60)

    assert set(seen) == {"dns-a", "dns-b"}
    assert all(a["client"] == lab.pod_ip("cl-2") and a["localPort"] == 5353 for a in seen.values())
    # One flow keeps its backend: five datagrams on one socket, one backend.
    sock = udp_socket(lab, "cl-2")
    try:
        assert len({udp_ask(sock, vip, 53)["pod"] for _ in range(5)}) == 1
    finally:
        sock.close()




def test_node_clients_reach_clusterips(lab):
    """A process in node-1's own namespace (a hostNetwork pod, a node daemon) reaches ClusterIPs
    through the node-client device (a veth) the agent routes the service CIDR to: TCP to a backend on node-1
    and one on node-2, UDP, and an empty Service refused at once. Backends see the node address."""
    lab.apply([echo("host-be-1", "node-1"), echo("host-be-2", "node-2"),
               echo("host-dns", "node-2", 5353, "udp-echo"),
               service("host-1", [{"port": 80, "targetPort": 8080}], selector={"pod": "host-be-1"}),
               service("host-2", [{"port": 80, "targetPort": 8080}], selector={"pod": "host-be-2"}),
               service("host-dns", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                       selector={"pod": "host-dns"}),
               service("host-none", [{"port": 80, "targetPort": 8080}], selector={"pod": "nobody"})])
    wait_ready(lab, ["host-be-1", "host-be-2", "host-dns"])
    for name in ("host-1", "host-2"):
        wait_programmed(lab, name, 80, backends=1)
    wait_programmed(lab, "host-dns", 53, backends=1, proto="UDP")
    wait_programmed(lab, "host-none", 80, backends=0)
    node1 = str(lab.spec.node("node-1").address)

    for name, backend in (("host-1", "host-be-1"), ("host-2", "host-be-2")):
        url = f"http://{cluster_ip(lab, name)}/"
        out = lab.node_exec("node-1", ["curl", "-sS", "--max-time", "5", url])
        assert out.returncode == 0, (name, out.stderr)
        answer = json.loads(out.stdout)
        assert (answer["pod"], answer["client"], answer["localPort"]) == (backend, node1, 8080)

    query = lambda: lab.node_exec("node-1", [sys.executable, "-c", NODE_UDP_QUERY,  # noqa: E731
                                             cluster_ip(lab, "host-dns"), "53"])
    out = wait_for(lambda: (r := query()).returncode == 0 and r, what="a UDP answer from node-1")
    answer = json.loads(out.stdout)
    assert answer["pod"] == "host-dns" and answer["client"] == node1

    refused = lab.node_exec("node-1", ["curl", "-sS", "--max-time", "5", f"http://{cluster_ip(lab, 'host-none')}/"])
    assert refused.returncode == 7, refused.stderr          # connection refused, not a timeout


def test_service_created_before_its_pods(lab):
    """Loose coupling: a Service without pods refuses at once (RST, not a timeout); it serves as
    soon as a matching pod is ready, with nothing else re-applied."""
    lab.apply([service("late", [{"port": 80, "targetPort": 8080}], selector={"app": "late"})])
    wait_programmed(lab, "late", 80, backends=0)
    vip = cluster_ip(lab, "late")

    assert connect_outcome(lab, "cl-1", vip, 80) == "refused"

    lab.apply([echo("late-1", "node-2", app="late")])
    wait_ready(lab, ["late-1"])
    wait_programmed(lab, "late", 80, backends=1)
    assert http_get(lab, "cl-1", vip, 80)["pod"] == "late-1"


def test_bulk_transfer_both_ways_iperf3(lab):
    """iperf3 moves 32 MiB to and 32 MiB from a cross-node backend through the clusterIP: large
    (offloaded) segments are translated with correct checksums both ways and the runs complete."""
    server = bare_pod("iperf-be", "node-2", labels={"app": "iperf"}, command=["iperf3", "-s", "-p", "5201"],
                      ports=[{"name": "iperf", "containerPort": 5201}])
    # No tcpSocket probe: iperf3 -s takes every connection for a test; listening is checked below.
    lab.apply([server, service("iperf", [{"port": 5201}], selector={"app": "iperf"})])
    wait_ready(lab, ["iperf-be"])
    wait_for(lambda: "LISTEN" in lab.exec("iperf-be", ["ss", "-Hltn", "sport = :5201"]).stdout,
             what="iperf3 listening")
    wait_programmed(lab, "iperf", 5201, backends=1)
    vip = cluster_ip(lab, "iperf")

    for reverse in ([], ["--reverse"]):
        run = lab.exec("cl-1", ["iperf3", "-c", vip, "-p", "5201", "-n", "32M", "-J", *reverse], timeout=120)
        result = json.loads(run.stdout)
        assert run.returncode == 0 and "error" not in result, run.stdout[-2000:] + run.stderr
        # TCP delivers all or fails; the receiver's total can miss the last instants' bytes
        # (iperf3 stops counting at the test end), so the sender's total is the one checked.
        assert result["end"]["sum_sent"]["bytes"] >= 32 * 1024 * 1024
        assert result["end"]["sum_received"]["bytes"] > 0
        assert result["start"]["connected"][0]["remote_host"] == vip


# -- selectorless Services ----------------------------------------------------------------------------


def test_selectorless_service_with_manual_endpoints_redis(lab):
    """As the seed's mwish-bot-svc-redis: a selectorless Service bound by name to a hand-written
    v1 Endpoints (port matched by name), redis-server behind it, redis-cli through the clusterIP."""
    redis = bare_pod("redis-manual", "node-2", labels={"app": "not-selected"},
                     command=["redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
                              "--protected-mode", "no"],
                     ports=[{"name": "redis", "containerPort": 6379}])
    redis["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 6379}}
    lab.apply([redis])
    wait_ready(lab, ["redis-manual"])
    lab.apply([service("redis-svc", [{"name": "redis-port", "port": 6379, "targetPort": 6379}]),
               {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "redis-svc"},
                "subsets": [{"addresses": [{"ip": lab.pod_ip("redis-manual"), "nodeName": "node-2"}],
                             "ports": [{"name": "redis-port", "port": 6379}]}]}])
    wait_programmed(lab, "redis-svc", 6379, backends=1)
    vip = cluster_ip(lab, "redis-svc")

    def cli(*args: str) -> str:
        result = lab.exec("cl-1", ["redis-cli", "-h", vip, "-p", "6379", *args], timeout=15)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert cli("set", "greeting", "hello-through-the-service") == "OK"
    assert cli("get", "greeting") == "hello-through-the-service"
    # The value is in the real server behind the Service.
    local = lab.exec("redis-manual", ["redis-cli", "-p", "6379", "get", "greeting"], timeout=15)
    assert local.stdout.strip() == "hello-through-the-service"


def test_selectorless_service_with_manual_endpointslice(lab):
    """A selectorless Service and a hand-written EndpointSlice bound by kubernetes.io/service-name;
    the slice's port (8080) is the target, whatever the Service says."""
    lab.apply([echo("slice-be", "node-1")])
    wait_ready(lab, ["slice-be"])
    lab.apply([service("slice-svc", [{"name": "http", "port": 80}]),
               {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "slice-svc-manual", "labels": {"kubernetes.io/service-name": "slice-svc"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                "endpoints": [{"addresses": [lab.pod_ip("slice-be")], "conditions": {"ready": True},
                               "nodeName": "node-1", "zone": "zone-a"}]}])
    wait_programmed(lab, "slice-svc", 80, backends=1)

    answer = http_get(lab, "cl-2", cluster_ip(lab, "slice-svc"), 80)

    assert (answer["pod"], answer["localPort"], answer["client"]) == ("slice-be", 8080, lab.pod_ip("cl-2"))


# -- hairpin, internalTrafficPolicy ------------------------------------------------------------------


def test_hairpin_pod_reaches_itself_through_its_service(lab):
    """The only backend of a Service calls the Service: the answer comes from itself.

    Without hairpin SNAT the backend would answer itself directly (source = its own IP) and the
    client socket, connected to the VIP, would drop the reply. The backend sees the node address,
    as with kube-proxy's masquerade for hairpin traffic: the agent is given no --hairpin-address
    (issue 10: a pod calling its own Service hung under deploy/).
    """
    lab.apply([echo("hairpin", "node-1"),
               service("hairpin", [{"port": 80, "targetPort": 8080}], selector={"pod": "hairpin"})])
    wait_ready(lab, ["hairpin"])
    wait_programmed(lab, "hairpin", 80, backends=1)

    answer = http_get(lab, "hairpin", cluster_ip(lab, "hairpin"), 80)

    assert answer["pod"] == "hairpin"
    assert answer["client"] == str(lab.spec.node("node-1").address)


def test_internal_traffic_policy_local(lab):
    """internalTrafficPolicy: Local keeps pod traffic on the client's node; a node without a local
    endpoint drops (no RST: the client times out, and the agent counts no_local_backend)."""
    lab.apply([echo("itp-a", "node-1", app="itp"), echo("itp-b", "node-2", app="itp"),
               service("itp", [{"port": 80, "targetPort": 8080}], selector={"app": "itp"},
                       internalTrafficPolicy="Local"),
               service("itp-only-b", [{"port": 80, "targetPort": 8080}], selector={"pod": "itp-b"},
                       internalTrafficPolicy="Local")])
    wait_ready(lab, ["itp-a", "itp-b"])
    wait_programmed(lab, "itp", 80, backends=1)                  # each node: its own pod only
    wait_programmed(lab, "itp-only-b", 80, backends=0, nodes=["node-1"])
    wait_programmed(lab, "itp-only-b", 80, backends=1, nodes=["node-2"])
    vip, vip_b = cluster_ip(lab, "itp"), cluster_ip(lab, "itp-only-b")

    # 20 connections per client: with Cluster policy each would have a ~1/2 chance to cross.
    assert {http_get(lab, "cl-1", vip, 80)["pod"] for _ in range(20)} == {"itp-a"}
    assert {http_get(lab, "cl-2", vip, 80)["pod"] for _ in range(20)} == {"itp-b"}

    before = drops(lab, "node-1")["no_local_backend"]
    assert connect_outcome(lab, "cl-1", vip_b, 80, timeout=2) == "timeout"
    assert drops(lab, "node-1")["no_local_backend"] > before
    assert http_get(lab, "cl-2", vip_b, 80)["pod"] == "itp-b"


# -- Services nobody programs -----------------------------------------------------------------------


def test_headless_and_externalname_are_not_programmed(lab):
    """clusterIP: None and type ExternalName: no frontend, no service entry on any node, and
    traffic to the pods behind a headless Service is untouched (no DNAT from port to targetPort)."""
    lab.apply([echo("hl-be", "node-2", app="hl"),
               service("headless", [{"port": 80, "targetPort": 8080}], selector={"app": "hl"}, clusterIP="None"),
               service("extname", [{"port": 80, "targetPort": 8080}], type="ExternalName",
                       externalName="db.example.test")])
    wait_ready(lab, ["hl-be"])
    # A sentinel applied after them: once agents serve it, they have read the two above.
    lab.apply([service("sentinel", [{"port": 80, "targetPort": 8080}], selector={"app": "hl"})])
    wait_programmed(lab, "sentinel", 80, backends=1)

    for node in ("node-1", "node-2"):
        served = programmed_services(lab, node)
        assert "default/sentinel/TCP" in served
        assert not [n for n in served if n.startswith(("default/headless", "default/extname"))]

    pod_ip = lab.pod_ip("hl-be")
    answer = http_get(lab, "cl-1", pod_ip, 8080)
    assert (answer["pod"], answer["client"]) == ("hl-be", lab.pod_ip("cl-1"))
    assert connect_outcome(lab, "cl-1", pod_ip, 80) == "refused"      # the pod itself: nothing on :80
    assert lab.service("extname")["spec"].get("clusterIP") is None
