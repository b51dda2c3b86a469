"""The socket path in the lab (docs/socklb.md): agents with `socket-lb: true` in deploy/'s
config.yaml attach bpf/lb_sock.c to their node's cgroup, where the lab runs every pod's
processes (and `lab node-exec`'s), as the kubelet does.

Clients here are processes (ebpfsvc/lab/sockprobe.py through `lab exec`), since the socket
path serves processes in the node's cgroup only. A socket the test process itself opens in a
pod's namespace (helpers.http_get) is outside every lab cgroup: it stands for a pod whose
cgroup is not under the node's, and must still be served by the TC path.

One lab for the module; every test brings its own pods and Services.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from ebpfsvc.lab import Lab, agents, apps, cgroups

from .helpers import answered_by, bare_pod, cluster_ip, http_get, node_maps, service, wait_for, wait_programmed, \
    wait_ready, wait_udp_bound

pytestmark = pytest.mark.root

CLIENT = "sl-client"


@pytest.fixture(scope="module")
def lab():
    instance = Lab.up(prefix="es" + uuid.uuid4().hex[:6], agents=False)
    try:
        # What an operator does: turn it on in the ConfigMap's config.yaml.
        config = instance.state.path / agents.CONFIG_FILE
        config.write_text(config.read_text() + "socket-lb: true\n")
        for node in instance.spec.nodes:
            instance.agent("start", node.name)
        instance.apply([bare_pod(CLIENT, "node-1")])
        wait_ready(instance, [CLIENT])
        yield instance
    finally:
        instance.down()
    assert not cgroups.lab_root(instance.prefix).exists(), "lab down removes the lab's cgroups"


def probe(lab: Lab, op: str, address: str, port: int, pod: str = CLIENT, node: str | None = None) -> dict:
    """One socket operation by a process in `pod` (or in `node`'s own namespace and cgroup)."""
    argv = ["python", "-m", "ebpfsvc.lab.sockprobe", op, address, str(port)]
    out = lab.node_exec(node, argv) if node else lab.exec(pod, argv)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def http_body(result: dict) -> dict:
    head, _, body = result["data"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1."), result
    return json.loads(body)


def flows_from(lab: Lab, node: str, client: str) -> list:
    with node_maps(lab, node) as maps:
        return [e for e in maps.ct() if client in (e.saddr, e.daddr)]


def web(lab: Lab, name: str, **spec) -> tuple[str, list[str]]:
    """http-echo pods <name>-1 on node-1 and <name>-2 on node-2 behind Service <name>:80."""
    pods = [f"{name}-1", f"{name}-2"]
    lab.apply([apps.pod(pods[0], "http-echo", 8080, node="node-1", labels={"app": name}),
               apps.pod(pods[1], "http-echo", 8080, node="node-2", labels={"app": name}),
               service(name, [{"port": 80, "targetPort": 8080, **spec.pop("port_extra", {})}],
                       selector={"app": name}, **spec)])
    wait_ready(lab, pods)
    wait_programmed(lab, name, 80, backends=2)
    return cluster_ip(lab, name), pods


def test_programs_on_the_node_cgroup(lab):
    from ebpfsvc.datapath import socklb

    for node in lab.spec.nodes:
        cg = cgroups.node_cgroup(lab.prefix, node.name)
        wait_for(lambda: all(socklb.attached(cg).values()), what=f"socket programs on {cg}")


def test_pod_tcp_is_translated_at_connect(lab):
    vip, pods = web(lab, "sl-web")
    # The pod's process runs in its cgroup below its node's, as under the kubelet.
    pids = (cgroups.pod_cgroup(lab.prefix, "node-1", "default", pods[0]) / "cgroup.procs").read_text().split()
    assert [p for p in pids if b"http-echo" in open(f"/proc/{p}/cmdline", "rb").read()], pids
    client_ip = lab.pod_ip(CLIENT)

    def ask() -> str:
        result = probe(lab, "tcp", vip, 80)
        assert result.get("peer") == [vip, 80], result           # getpeername: the Service
        answer = http_body(result)
        assert answer["client"] == client_ip                     # no SNAT, as with TC
        return answer["pod"]

    assert answered_by(ask, pods) == set(pods)
    assert flows_from(lab, "node-1", client_ip) == [], "the TC path translated nothing"


def check_udp_through_socket_path(lab: Lab, name: str, family: int | None = None, **spec) -> None:
    """udp-echo pods <name>-1 on node-1 and <name>-2 on node-2 behind Service <name>:53/UDP (its
    clusterIP of IP version `family`, or the primary): unconnected and connected UDP from the client
    pod answered, recvfrom and getpeername showing the Service, no TC flow."""
    pods = [f"{name}-1", f"{name}-2"]
    lab.apply([apps.pod(pods[0], "udp-echo", 5353, node="node-1", labels={"app": name}),
               apps.pod(pods[1], "udp-echo", 5353, node="node-2", labels={"app": name}),
               service(name, [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"app": name}, **spec)])
    wait_ready(lab, pods)
    wait_programmed(lab, name, 53, backends=2, proto="UDP", family=family)
    vip = cluster_ip(lab, name, family)
    for op in ("udp", "udp-connected"):
        result = wait_for(lambda: "errno" not in (r := probe(lab, op, vip, 53)) and r, what=f"{op} answer")
        assert result["src"][:2] == [vip, 53], result            # recvfrom: the Service
        assert json.loads(result["data"])["pod"] in pods
        if op == "udp-connected":
            assert result["peer"][:2] == [vip, 53]              # IPv6: [address, port, flowinfo, scope]
    client = json.loads(result["data"])["client"]               # the pod's address of the Service's family
    assert flows_from(lab, "node-1", client) == []


def test_pod_udp_unconnected_and_connected(lab):
    check_udp_through_socket_path(lab, "sl-dns")


def test_empty_service_refused_at_connect(lab):
    lab.apply([service("sl-empty", [{"port": 80, "targetPort": 8080}], selector={"app": "sl-nobody"})])
    wait_programmed(lab, "sl-empty", 80, backends=0)
    assert probe(lab, "tcp", cluster_ip(lab, "sl-empty"), 80) == {"errno": "ECONNREFUSED"}


def test_client_ip_affinity_holds(lab):
    # Left to the TC path by the socket hooks (docs/socklb.md): one backend for every connection.
    vip, pods = web(lab, "sl-sticky", sessionAffinity="ClientIP")
    answers = {http_body(probe(lab, "tcp", vip, 80))["pod"] for _ in range(8)}
    assert len(answers) == 1 and answers <= set(pods)


def test_hairpin_through_the_socket_path(lab):
    vip, pods = web(lab, "sl-hp")
    answers = answered_by(lambda: http_body(probe(lab, "tcp", vip, 80, pod=pods[0]))["pod"], pods)
    assert answers == set(pods)          # itself included, reached on its own address


def test_node_client_through_the_socket_path(lab):
    vip, pods = web(lab, "sl-node")

    def ask() -> str:
        result = probe(lab, "tcp", vip, 80, node="node-1")
        assert result.get("peer") == [vip, 80], result
        return http_body(result)["pod"]

    assert answered_by(ask, pods) == set(pods)


def test_outside_the_node_cgroup_and_nodeport_still_use_tc(lab):
    vip, pods = web(lab, "sl-tc", type="NodePort", port_extra={"nodePort": 30280})
    # A socket of the test process in the client's namespace: in no lab cgroup.
    assert http_get(lab, CLIENT, vip, 80)["pod"] in pods
    assert flows_from(lab, "node-1", lab.pod_ip(CLIENT)), "the TC path tracked the flow"
    # From outside the cluster to node-1's NodePort: the uplink programs.
    out = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", "http://198.18.0.11:30280/"], timeout=15)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pod"] in pods


def test_agent_stop_keeps_serving(lab):
    vip, pods = web(lab, "sl-stop")
    lab.agent("stop", "node-1")
    try:
        assert http_body(probe(lab, "tcp", vip, 80))["pod"] in pods
    finally:
        lab.agent("start", "node-1")
    assert cgroups.lab_root(lab.prefix).is_dir()     # removed by `lab down`: the fixture checks


def test_turned_off_the_agent_detaches_and_tc_serves(lab):
    from ebpfsvc.datapath import socklb

    vip, pods = web(lab, "sl-off")
    config = lab.state.path / agents.CONFIG_FILE
    on = config.read_text()
    cg = cgroups.node_cgroup(lab.prefix, "node-1")
    try:
        config.write_text(on.replace("socket-lb: true\n", "socket-lb: false\n"))
        lab.agent("restart", "node-1")
        wait_for(lambda: not any(socklb.attached(cg).values()), what=f"socket programs gone from {cg}")
        result = probe(lab, "tcp", vip, 80)
        assert result["peer"] == [vip, 80] and http_body(result)["pod"] in pods
        assert [e for e in flows_from(lab, "node-1", lab.pod_ip(CLIENT)) if e.daddr == vip], \
            "the TC path took the connection (a flow to the new Service's ClusterIP)"
    finally:
        config.write_text(on)
        lab.agent("restart", "node-1")
    wait_for(lambda: all(socklb.attached(cg).values()), what=f"socket programs back on {cg}")


class Held:
    """Sockets to a Service held open by a process in the client pod (sockprobe hold)."""

    def __init__(self, lab: Lab, kind: str, vip: str, port: int, count: int):
        self.proc = lab.popen(CLIENT, ["python", "-m", "ebpfsvc.lab.sockprobe", "hold", kind, vip, str(port),
                                       str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, f"sockprobe hold {kind} {vip}:{port} failed (exit {self.proc.poll()})"
        self.cookies = json.loads(line)["cookies"]

    def command(self, what: str) -> list:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["sockets"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_removed_backend_resets_socket_path_connections(lab):
    """A backend leaves its Service (its pod, still running, no longer selected): the agent destroys
    the socket path's TCP connections and connected UDP sockets to it (ECONNABORTED at once; its
    server never closed them), as the TC path resets such flows; the ones to the remaining backend
    carry on, and a UDP client that connects again reaches it."""
    tcp_pods, udp_pods = ["sl-held-1", "sl-held-2"], ["sl-heldu-1", "sl-heldu-2"]

    def services(member: dict):
        return [service("sl-held", [{"port": 7000}], selector={"app": "sl-held", **member}),
                service("sl-heldu", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                        selector={"app": "sl-heldu", **member})]

    lab.apply([apps.pod(name, app, port, node=f"node-{i}", labels={"app": name[:-2], "member": str(i)})
               for app, port, pods in (("tcp-echo", 7000, tcp_pods), ("udp-echo", 5353, udp_pods))
               for i, name in enumerate(pods, 1)] + services({}))
    wait_ready(lab, tcp_pods + udp_pods)
    wait_udp_bound(lab, CLIENT, udp_pods, 5353)
    wait_programmed(lab, "sl-held", 7000, backends=2)
    wait_programmed(lab, "sl-heldu", 53, backends=2, proto="UDP")
    vip, uvip = cluster_ip(lab, "sl-held"), cluster_ip(lab, "sl-heldu")
    from ebpfsvc.datapath import socklb
    cg = cgroups.node_cgroup(lab.prefix, "node-1")
    wait_for(lambda: all(socklb.attached(cg).values()), what=f"socket programs on {cg}")
    held = []
    try:
        # 16 sockets each, over two backends with ~half the table each: one unused, p = 2 * 2^-16.
        held = [Held(lab, "tcp", vip, 7000, 16), Held(lab, "udp", uvip, 53, 16)]
        tcp_to, udp_to = (h.command("ask") for h in held)
        assert set(tcp_to) == set(tcp_pods) and set(udp_to) == set(udp_pods), (tcp_to, udp_to)
        tc_flows = [e for e in flows_from(lab, "node-1", lab.pod_ip(CLIENT)) if e.frontend.split(":")[0] in (vip, uvip)]
        assert tc_flows == [], "the socket path took every one of them"

        lab.apply(services({"member": "1"}))
        wait_programmed(lab, "sl-held", 7000, backends=1)
        wait_programmed(lab, "sl-heldu", 53, backends=1, proto="UDP")
        gone = {"error": "ECONNABORTED", "peer": "ENOTCONN"}
        for h, to, port, (alive, removed), svc in ((held[0], tcp_to, 7000, tcp_pods, vip),
                                                    (held[1], udp_to, 53, udp_pods, uvip)):
            want = [gone if who == removed else {"error": None, "peer": [svc, port]} for who in to]
            wait_for(lambda h=h, want=want: h.command("check") == want, what=f"sockets to {removed} reset")
            answers = h.command("ask")
            assert [a for a, who in zip(answers, to) if who == alive] == [alive] * to.count(alive), answers
        again = probe(lab, "udp-connected", uvip, 53)        # connecting again: the live backend
        assert again["src"] == [uvip, 53] and json.loads(again["data"])["pod"] == udp_pods[0], again
    finally:
        for h in held:
            h.close()
