"""The socket path for IPv6 (docs/socklb.md): the dual-stack lab (examples/lab/dual-stack.yaml, a real
kube-apiserver) with `socket-lb: true`, so connect6, sendmsg6, recvmsg6 and getpeername6 serve the
pods' IPv6 sockets, and a dual-stack socket naming an IPv4 ClusterIP by its IPv4-mapped address
(::ffff:a.b.c.d) takes the IPv4 hooks' logic.

Clients are processes in the client pod's cgroup (ebpfsvc/lab/sockprobe.py through `lab exec`), as
in test_socklb.py, whose helpers these tests share. One lab for the module.
"""

from __future__ import annotations

import json
import uuid

import pytest

from ebpfsvc.lab import Lab, agents, apps, cgroups

from .helpers import answered_by, bare_pod, cluster_ip, service, wait_for, wait_programmed, wait_ready, wait_udp_bound
from .test_dualstack_lab import DUAL_STACK, v6
from .test_socklb import CLIENT, Held, check_udp_through_socket_path, flows_from, http_body, probe

# The module's lab comes up inside the first test's time: a dual-stack control plane and two agents
# compiling on a loaded machine took more than pytest-timeout's 300 s.
pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lab():
    instance = Lab.up(DUAL_STACK, prefix="es" + uuid.uuid4().hex[:6], agents=False)
    try:
        config = instance.state.path / agents.CONFIG_FILE
        config.write_text(config.read_text() + "socket-lb: true\n")
        for node in instance.spec.nodes:
            instance.agent("start", node.name)
        # kube-controller-manager makes `default`'s ServiceAccount; on a loaded machine it can take
        # longer than the lab's own 30 s wait before the first Pod.
        wait_for(lambda: instance.api.get("ServiceAccount", "default", "default"), 300,
                 what="the default ServiceAccount")
        instance.apply([bare_pod(CLIENT, "node-1")])
        wait_ready(instance, [CLIENT])
        from ebpfsvc.datapath import socklb

        for node in instance.spec.nodes:
            cg = cgroups.node_cgroup(instance.prefix, node.name)
            # Two agents compile lb_pod.c and lb_sock.c on a loaded machine: a generous wait, and
            # the agent's own words if it never attaches.
            try:
                wait_for(lambda cg=cg: all(socklb.attached(cg).values()), 300, what=f"socket programs on {cg}")
            except AssertionError as exc:
                log = (instance.state.path / f"agent-{node.name}.log").read_text()[-3000:]
                raise AssertionError(f"{exc}\n{node.name}'s agent log ends:\n{log}") from None
        yield instance
    finally:
        instance.down()
    assert not cgroups.lab_root(instance.prefix).exists(), "lab down removes the lab's cgroups"


def web(lab: Lab, name: str, **spec) -> tuple[str, list[str]]:
    """http-echo pods <name>-1 on node-1 and <name>-2 on node-2 behind Service <name>:80 (IPv6 only
    unless `spec` says otherwise); its IPv6 clusterIP."""
    pods = [f"{name}-1", f"{name}-2"]
    spec = {"ipFamilies": ["IPv6"], **spec}
    lab.apply([apps.pod(pods[0], "http-echo", 8080, node="node-1", labels={"app": name}),
               apps.pod(pods[1], "http-echo", 8080, node="node-2", labels={"app": name}),
               service(name, [{"port": 80, "targetPort": 8080}], selector={"app": name}, **spec)])
    wait_ready(lab, pods)
    wait_programmed(lab, name, 80, backends=2, family=6)
    return cluster_ip(lab, name, 6), pods


def test_ipv6_tcp_is_translated_at_connect(lab):
    vip, pods = web(lab, "s6-web")
    client = v6(lab, CLIENT)

    def ask() -> str:
        result = probe(lab, "tcp", vip, 80)
        assert result.get("peer", [])[:2] == [vip, 80], result      # getpeername: the Service
        answer = http_body(result)
        assert answer["client"] == client                          # the pod's own IPv6 address
        return answer["pod"]

    assert answered_by(ask, pods) == set(pods)
    assert flows_from(lab, "node-1", client) == [], "the TC path translated nothing"


def test_ipv6_udp_unconnected_and_connected(lab):
    check_udp_through_socket_path(lab, "s6-dns", family=6, ipFamilies=["IPv6"])


def test_ipv6_empty_service_refused_at_connect(lab):
    lab.apply([service("s6-empty", [{"name": "web", "port": 80, "targetPort": 8080},
                                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
                       selector={"app": "s6-nobody"}, ipFamilies=["IPv6"])])
    wait_programmed(lab, "s6-empty", 80, backends=0, family=6)
    wait_programmed(lab, "s6-empty", 53, backends=0, proto="UDP", family=6)
    vip = cluster_ip(lab, "s6-empty", 6)
    assert probe(lab, "tcp", vip, 80) == {"errno": "ECONNREFUSED"}
    assert probe(lab, "udp-connected", vip, 53) == {"errno": "ECONNREFUSED"}


def test_dual_stack_service_by_both_families_and_ipv4_mapped(lab):
    """A PreferDualStack Service: its IPv6 clusterIP through connect6, its IPv4 one through connect4,
    and the IPv4 one named by a dual-stack socket (::ffff:a.b.c.d) through connect6's IPv4 logic:
    getpeername shows what the application named, and the TC path tracks none of them."""
    vip6, pods = web(lab, "s6-ds", ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack")
    vip4 = cluster_ip(lab, "s6-ds", 4)
    wait_programmed(lab, "s6-ds", 80, backends=2, family=4)
    mapped = f"::ffff:{vip4}"
    for named, client in ((vip6, v6(lab, CLIENT)), (vip4, lab.pod_ip(CLIENT)), (mapped, lab.pod_ip(CLIENT))):
        def ask() -> str:
            result = probe(lab, "tcp", named, 80)
            assert result.get("peer", [])[:2] == [named, 80], result
            answer = http_body(result)
            assert answer["client"] == client, (named, answer)
            return answer["pod"]

        assert answered_by(ask, pods) == set(pods), named
    assert flows_from(lab, "node-1", v6(lab, CLIENT)) == [] and flows_from(lab, "node-1", lab.pod_ip(CLIENT)) == []


def test_ipv6_scaled_down_backend_resets_socket_path_connections(lab):
    """A backend leaves its IPv6 Service (its pod still running, no longer selected): the agent
    destroys the socket path's IPv6 TCP connections and connected UDP sockets to it (ECONNABORTED),
    the ones to the remaining backend carry on, and new connections reach only that one."""
    tcp_pods, udp_pods = ["s6-held-1", "s6-held-2"], ["s6-heldu-1", "s6-heldu-2"]

    def services(member: dict):
        return [service("s6-held", [{"port": 7000}], selector={"app": "s6-held", **member}, ipFamilies=["IPv6"]),
                service("s6-heldu", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                        selector={"app": "s6-heldu", **member}, ipFamilies=["IPv6"])]

    lab.apply([apps.pod(name, app, port, node=f"node-{i}", labels={"app": name[:-2], "member": str(i)})
               for app, port, pods in (("tcp-echo", 7000, tcp_pods), ("udp-echo", 5353, udp_pods))
               for i, name in enumerate(pods, 1)] + services({}))
    wait_ready(lab, tcp_pods + udp_pods)
    wait_udp_bound(lab, CLIENT, udp_pods, 5353)
    wait_programmed(lab, "s6-held", 7000, backends=2, family=6)
    wait_programmed(lab, "s6-heldu", 53, backends=2, proto="UDP", family=6)
    vip, uvip = cluster_ip(lab, "s6-held", 6), cluster_ip(lab, "s6-heldu", 6)
    held = []
    try:
        # 16 sockets each, over two backends with ~half the table each: one unused, p = 2 * 2^-16.
        held = [Held(lab, "tcp", vip, 7000, 16), Held(lab, "udp", uvip, 53, 16)]
        tcp_to, udp_to = (h.command("ask") for h in held)
        assert set(tcp_to) == set(tcp_pods) and set(udp_to) == set(udp_pods), (tcp_to, udp_to)

        lab.apply(services({"member": "1"}))
        wait_programmed(lab, "s6-held", 7000, backends=1, family=6)
        wait_programmed(lab, "s6-heldu", 53, backends=1, proto="UDP", family=6)
        gone = {"error": "ECONNABORTED", "peer": "ENOTCONN"}
        for h, to, port, (alive, removed), svc in ((held[0], tcp_to, 7000, tcp_pods, vip),
                                                    (held[1], udp_to, 53, udp_pods, uvip)):
            want = [gone if who == removed else {"error": None, "peer": [svc, port, 0, 0]} for who in to]
            wait_for(lambda h=h, want=want: h.command("check") == want, what=f"sockets to {removed} reset")
            answers = h.command("ask")
            assert [a for a, who in zip(answers, to) if who == alive] == [alive] * to.count(alive), answers
        again = probe(lab, "udp-connected", uvip, 53)        # connecting again: the live backend
        assert again["src"][:2] == [uvip, 53] and json.loads(again["data"])["pod"] == udp_pods[0], again
    finally:
        for h in held:
            h.close()
