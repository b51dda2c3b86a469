"""Backends coming and going under traffic, and agents restarting under traffic.

Long-lived TCP streams (tcp-echo: each line comes back prefixed by the pod that holds the
connection) and UDP flows (one socket = one 5-tuple) are opened through a Service, then pods
are deleted, added or put into termination while the streams stay open.  A conntrack entry pins
a flow to its backend, so table changes must not move established flows; flows to a backend that
is gone must fail fast (TCP) or move on (UDP).
"""

from __future__ import annotations

import socket

import pytest

from ebpfsvc.lab import Lab, apps, names
from ebpfsvc.lab.pods import READY_ANNOTATION

from .helpers import (Chatter, TcpStream, add_clients, answered_by, cluster_ip, connect_outcome, service,
                      tc_programs, tcp_udp_chatter, udp_ask, udp_socket, wait_backend_gone, wait_for, wait_programmed,
                      wait_ready, wait_udp_bound)

pytestmark = pytest.mark.root

CLIENT = "churn-client"


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return add_clients(shared_lab, {CLIENT: "node-1"})


def pods_of(app: str, kind: str, port: int, nodes: list[str], **kw) -> list[dict]:
    return [apps.pod(f"{app}-{i}", kind, port, node=node, labels={"app": app}, **kw)
            for i, node in enumerate(nodes, 1)]


def streams_to_each(lab: Lab, vip: str, port: int, backends: set[str], limit: int = 60) -> dict[str, TcpStream]:
    """Open streams until each backend holds one (extras are closed); at most `limit` connections.

    With k backends of ~1/k of the table each, missing one after 60 connections has probability
    below k * (1 - 1/k)^60: 1e-10 for k = 3.
    """
    held: dict[str, TcpStream] = {}
    for _ in range(limit):
        stream = TcpStream(lab, CLIENT, vip, port)
        who = stream.backend()
        if who in held:
            stream.close()
        else:
            held[who] = stream
        if set(held) >= backends:
            break
    assert set(held) == backends, f"streams reached only {sorted(held)}"
    return held


def close_all(streams) -> None:
    for s in streams:
        s.close()


def new_connections(lab: Lab, vip: str, port: int, count: int) -> set[str]:
    """The backends `count` new connections reach."""
    seen = set()
    for _ in range(count):
        stream = TcpStream(lab, CLIENT, vip, port)
        try:
            seen.add(stream.backend())
        finally:
            stream.close()
    return seen


def test_scale_down_and_up_under_tcp_traffic(lab):
    """Remove one of three backends, then add one, while a stream to each is open and the
    streams to the two others keep exchanging lines all along.

    Streams to surviving backends carry on untouched; the stream to the removed one fails at
    once (reset, no hang); new connections never reach the removed backend and do reach the
    added one.
    """
    lab.apply(pods_of("scale", "tcp-echo", 7000, ["node-1", "node-2", "node-2"])
              + [service("scale", [{"port": 7000}], selector={"app": "scale"})])
    wait_ready(lab, ["scale-1", "scale-2", "scale-3"])
    wait_programmed(lab, "scale", 7000, backends=3)
    vip = cluster_ip(lab, "scale")
    streams = streams_to_each(lab, vip, 7000, {"scale-1", "scale-2", "scale-3"})
    survivors = ("scale-1", "scale-2")
    chatter = Chatter({who: streams[who].backend for who in survivors})
    try:
        chatter.start()
        chatter.wait_rounds(3)

        lab.delete_object("pod", "scale-3", grace=0)
        lab.wait_gone(["scale-3"])
        wait_programmed(lab, "scale", 7000, backends=2)
        with pytest.raises(ConnectionError):
            streams["scale-3"].ask("gone?")
        # 30 new connections: the removed backend must never answer, and both survivors do
        # (each owns ~half the table: one missing from 30 has probability 2 * 2^-30 < 1e-8).
        assert new_connections(lab, vip, 7000, 30) == set(survivors)

        lab.apply(pods_of("scale", "tcp-echo", 7000, ["node-1", "node-2", "node-2", "node-1"])[3:])
        wait_ready(lab, ["scale-4"])
        wait_programmed(lab, "scale", 7000, backends=3)
        # scale-4 owns ~1/3: missing it 60 times: < 1e-10
        seen = answered_by(lambda: new_connections(lab, vip, 7000, 1).pop(), ["scale-4"], limit=60)
        assert "scale-4" in seen and "scale-3" not in seen
        chatter.wait_rounds(3)               # the table changed twice; established flows did not move
    finally:
        chatter.halt()
        close_all(streams.values())
    assert chatter.error is None, repr(chatter.error)
    assert chatter.who_answered() == {who: {who} for who in survivors}


def test_udp_flow_to_removed_backend_moves_on(lab):
    """A UDP flow (same socket, same 5-tuple) whose backend is deleted is answered by another
    backend from the next datagram on; a flow to the surviving backend keeps it."""
    lab.apply(pods_of("uflow", "udp-echo", 5353, ["node-1", "node-2"])
              + [service("uflow", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                         selector={"app": "uflow"})])
    wait_ready(lab, ["uflow-1", "uflow-2"])
    wait_udp_bound(lab, CLIENT, ["uflow-1", "uflow-2"], 5353)
    wait_programmed(lab, "uflow", 53, backends=2, proto="UDP")
    vip = cluster_ip(lab, "uflow")

    flows: dict[str, socket.socket] = {}
    for _ in range(60):                    # one flow per backend; missing one 60 times: < 1e-17
        sock = udp_socket(lab, CLIENT)
        who = udp_ask(sock, vip, 53)["pod"]
        if who in flows:
            sock.close()
        else:
            flows[who] = sock
        if len(flows) == 2:
            break
    try:
        assert set(flows) == {"uflow-1", "uflow-2"}
        gone = lab.pod_ip("uflow-2")
        lab.delete_object("pod", "uflow-2", grace=0)
        lab.wait_gone(["uflow-2"])
        wait_programmed(lab, "uflow", 53, backends=1, proto="UDP")
        wait_backend_gone(lab, gone)

        moved = udp_ask(flows["uflow-2"], vip, 53)
        assert moved["pod"] == "uflow-1"
        assert moved["client"] == lab.pod_ip(CLIENT)
        assert udp_ask(flows["uflow-1"], vip, 53)["pod"] == "uflow-1"
    finally:
        for sock in flows.values():
            sock.close()


def test_terminating_backend_keeps_its_connections_and_gets_no_new_ones(lab):
    """A pod deleted with a grace period is terminating (serving, not ready): its established
    stream carries on, while every new connection goes to the other backend."""
    lab.apply(pods_of("term", "tcp-echo", 7000, ["node-1", "node-2"], grace_seconds=120)
              + [service("term", [{"port": 7000}], selector={"app": "term"})])
    wait_ready(lab, ["term-1", "term-2"])
    wait_programmed(lab, "term", 7000, backends=2)
    vip = cluster_ip(lab, "term")
    streams = streams_to_each(lab, vip, 7000, {"term-1", "term-2"})
    try:
        lab.delete_object("pod", "term-2")          # 120 s grace: terminating for the whole test
        wait_for(lambda: any(e["conditions"].get("terminating") for s in lab.endpoint_slices("term")
                             for e in s["endpoints"]), what="term-2 terminating in its EndpointSlice")
        wait_programmed(lab, "term", 7000, backends=1)

        assert streams["term-2"].ask("draining") == "term-2: draining"
        assert new_connections(lab, vip, 7000, 30) == {"term-1"}
        assert streams["term-2"].ask("still draining") == "term-2: still draining"
        assert streams["term-1"].ask("ready one") == "term-1: ready one"
    finally:
        close_all(streams.values())
        lab.delete_object("pod", "term-2", grace=0)


def test_not_ready_backend_keeps_its_connections_and_gets_no_new_ones(lab):
    """A failing readiness probe (not terminating): the EndpointSlice says ready=false, and, as
    with kube-proxy, the established TCP stream carries on while new connections avoid the pod
    and its UDP flow moves on; once ready again, it gets new connections."""
    tcp_pods = pods_of("blip", "tcp-echo", 7000, ["node-1", "node-2"])
    udp_pods = pods_of("ublip", "udp-echo", 5353, ["node-1", "node-2"])
    lab.apply(tcp_pods + udp_pods
              + [service("blip", [{"port": 7000}], selector={"app": "blip"}),
                 service("ublip", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                         selector={"app": "ublip"})])
    wait_ready(lab, ["blip-1", "blip-2", "ublip-1", "ublip-2"])
    wait_programmed(lab, "blip", 7000, backends=2)
    wait_programmed(lab, "ublip", 53, backends=2, proto="UDP")
    vip, uvip = cluster_ip(lab, "blip"), cluster_ip(lab, "ublip")
    streams = streams_to_each(lab, vip, 7000, {"blip-1", "blip-2"})
    flow = udp_socket(lab, CLIENT)
    try:
        wait_for(lambda: udp_ask(flow, uvip, 53), what="a UDP answer through the Service")
        held = udp_ask(flow, uvip, 53)["pod"]                  # this 5-tuple's backend
        other = "ublip-1" if held == "ublip-2" else "ublip-2"

        def readiness(pods: list[dict], name: str, ready: str) -> list[dict]:
            pod = next(p for p in pods if p["metadata"]["name"] == name)
            pod["metadata"]["annotations"] = {READY_ANNOTATION: ready}
            return [pod]

        lab.apply(readiness(tcp_pods, "blip-2", "false") + readiness(udp_pods, held, "false"))
        lab.wait_ready(["blip-2", held], ready=False)
        wait_programmed(lab, "blip", 7000, backends=1)
        wait_programmed(lab, "ublip", 53, backends=1, proto="UDP")

        assert streams["blip-2"].ask("not ready") == "blip-2: not ready"
        assert new_connections(lab, vip, 7000, 30) == {"blip-1"}
        assert streams["blip-2"].ask("still open") == "blip-2: still open"
        assert udp_ask(flow, uvip, 53)["pod"] == other       # UDP conntrack is not kept

        lab.apply(readiness(tcp_pods, "blip-2", "true"))
        lab.wait_ready(["blip-2"])
        wait_programmed(lab, "blip", 7000, backends=2)
        assert new_connections(lab, vip, 7000, 60) == {"blip-1", "blip-2"}   # missing one: < 1e-17
        assert streams["blip-2"].ask("ready again") == "blip-2: ready again"
    finally:
        flow.close()
        close_all(streams.values())


def test_no_endpoints_left_refuses_at_once(lab):
    """Scaled to zero: a new TCP connection is refused (RST), not left to time out, and a UDP
    client gets port unreachable (ECONNREFUSED on its connected socket)."""
    lab.apply(pods_of("zero", "http-echo", 8080, ["node-2"])
              + [service("zero", [{"name": "tcp", "port": 80, "targetPort": 8080},
                                  {"name": "udp", "port": 53, "protocol": "UDP"}], selector={"app": "zero"})])
    wait_ready(lab, ["zero-1"])
    wait_programmed(lab, "zero", 80, backends=1)
    vip = cluster_ip(lab, "zero")
    assert connect_outcome(lab, CLIENT, vip, 80) == "connected"

    lab.delete_object("pod", "zero-1", grace=0)
    lab.wait_gone(["zero-1"])
    wait_programmed(lab, "zero", 80, backends=0)
    wait_programmed(lab, "zero", 53, backends=0, proto="UDP")

    assert connect_outcome(lab, CLIENT, vip, 80) == "refused"
    sock = udp_socket(lab, CLIENT)
    try:
        sock.connect((vip, 53))
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
    finally:
        sock.close()


# -- agent restart (own lab: restarting agents must not disturb other tests) ----------------------


def _tc_program_ids(lab: Lab, node: str, link: str) -> list[tuple[str, str, int]]:
    return sorted((f.direction, f.name, f.prog_id) for f in tc_programs(lab, node, link))


@pytest.mark.parametrize("node", ["node-1", "node-2"], ids=["client-node", "backend-node"])
def test_agent_restart_keeps_streams(unique_prefix, node):
    """Restart an agent while a TCP stream and a UDP flow run through a Service: no reset, no
    lost exchange, same backend; the new agent serves changes afterwards."""
    with Lab.up(prefix=unique_prefix, agents=True) as lab:
        with tcp_udp_chatter(lab, "rs", CLIENT) as chatter:
            pod = lab.pod("rs-tcp" if node == "node-2" else CLIENT)
            link = names.pod_host_link("default", pod["metadata"]["name"])
            before = _tc_program_ids(lab, node, link)
            assert [name for _, name, _ in before] == ["to_pod", "from_pod"], before     # egress, ingress
            old_agent = lab.agent_record(node)
            lab.agent("restart", node)
            assert lab.agent_record(node) != old_agent
            # The new agent takes back the programs the first one left pinned (issue 12): nothing
            # compiled, loaded or verified again ...
            new_agent = lab.agent_record(node)
            log_path = lab.state.log_path(names.agent_record(node))
            wait_for(lambda: "programs from_pod, to_pod kept from the previous run" in
                     log_path.read_text().partition(f"(pid {new_agent.pid})")[2], what="pinned programs kept")
            # ... and syncs changes: a new Service gets programmed.
            lab.apply([service("rs-after", [{"port": 7000}], selector={"app": "rs-tcp"})])
            wait_programmed(lab, "rs-after", 7000, backends=1, nodes=[node])
            # The veth kept the very same programs throughout (the same program ids).
            assert _tc_program_ids(lab, node, link) == before
            chatter.wait_rounds(5)
        assert chatter.error is None, repr(chatter.error)
        assert chatter.who_answered() == {"tcp": {"rs-tcp"}, "udp": {"rs-udp"}}
