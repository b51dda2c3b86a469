"""From kube-proxy to ebpfsvc on live nodes, with the real kube-proxy binary, as docs/deploy.md
("Migrating from kube-proxy") tells an operator to do it:

  0. the nodes run kube-proxy (iptables or nftables mode) against the lab's API server, and
     kubelet's KUBE-FIREWALL rule, as every real node has it; long-lived TCP streams reach both
     backends of a Service through kube-proxy's rules;
  1. the ebpfsvc agents start beside it: kube-proxy keeps ports 10256 and 10249, the agents
     say so and program the datapath anyway;
  2. ebpfsvc takes over: new connections are balanced by ebpfsvc (its conntrack has them),
     while the streams kube-proxy translated stay with the kernel's conntrack (ebpfsvc's has
     none of them) and keep their backends; the agent has deleted kube-proxy's closed
     connections from the kernel's conntrack (takeover.py), so a new connection from a client
     port kube-proxy's connection closed on keeps that port at the backend;
  3. kube-proxy stops: the agents bind 10256 and 10249;
  4. `kube-proxy --cleanup` in each node removes its chains / table. Established connections
     live on in the kernel's conntrack, whose NAT needs conntrack on (kubelet's rule) and a nat
     chain in the namespace: iptables mode leaves iptables' nat base chains, nftables mode
     removes its only ones, so there the operator first adds the placeholder KEEP_NAT (without
     it, 3 to 4 of 8 streams were reset at --cleanup: the kernel stopped translating them and
     ebpfsvc balanced them anew), and deletes it once those connections are over (step 5).

The streams come from a client pod on node-1 through the ClusterIP, and from the external client
(outside the cluster) through node-1's NodePort. A chatter thread exchanges a line on every stream
every 20 ms all along, so a reset at any moment, not only at the checkpoints, fails the test; so
does a stream that answers from another backend. New connections must work at every step.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, apps, kubeproxy, names

from .helpers import (Chatter, TcpStream, bare_pod, cluster_ip, node_maps, rewrite_ct4, service, tcp_socket,
                      wait_agents_attached, wait_for, wait_programmed, wait_ready)

pytestmark = pytest.mark.root

CLIENT, PORT, NODE_PORT = "mig-client", 7000, 30700
EXTERNAL = "client"                 # the lab's external client, outside the cluster
BACKENDS = {"mig-1": "node-1", "mig-2": "node-2"}
STREAMS, EXTERNAL_STREAMS = 8, 4
NODES = ("node-1", "node-2")
# Root-namespace values kube-proxy must leave alone: the global conntrack sizes, and the
# per-namespace settings it writes into the node's namespace (which must stay there).
ROOT_SETTINGS = ("/proc/sys/net/netfilter/nf_conntrack_max", "/sys/module/nf_conntrack/parameters/hashsize",
                 "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
                 "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
                 "/proc/sys/net/ipv4/conf/all/route_localnet")
# kubelet's chain: kube-proxy writes the same rule, and its --cleanup leaves it (kubelet owns it).
KUBELET_CHAINS = {"filter/KUBE-FIREWALL"}
# docs/deploy.md, "Migrating from kube-proxy": nftables mode, before --cleanup. A nat chain keeps
# the kernel's NAT hooks registered, its ct rule keeps conntrack on.
KEEP_NAT = [["nft", "add", "table", "ip", "ebpfsvc-migration"],
            ["nft", "add", "chain", "ip", "ebpfsvc-migration", "keep-nat",
             "{ type nat hook postrouting priority srcnat; policy accept; }"],
            ["nft", "add", "rule", "ip", "ebpfsvc-migration", "keep-nat", "ct", "state", "new", "counter"]]
DROP_KEEP_NAT = ["nft", "delete", "table", "ip", "ebpfsvc-migration"]


def root_settings() -> dict[str, str]:
    out = {}
    for path in ROOT_SETTINGS:
        try:
            out[path] = Path(path).read_text().strip()
        except OSError as exc:
            out[path] = f"unreadable: {exc.strerror}"
    return out


def listener(lab: Lab, node: str, port: int) -> str:
    """The name of the process listening on TCP `port` in the node's namespace ('' if none)."""
    out = lab.node_exec(node, ["ss", "-Hltnp", f"sport = :{port}"]).stdout
    return out.split('(("', 1)[1].split('"', 1)[0] if '(("' in out else ""


def healthz(lab: Lab, node: str) -> dict:
    r = lab.node_exec(node, ["curl", "-sS", "--max-time", "3", f"http://127.0.0.1:{kubeproxy.HEALTHZ_PORT}/healthz"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ebpfsvc_tracks(lab: Lab, node: str, stream: TcpStream, address: str, port: int = PORT) -> bool:
    """ebpfsvc's conntrack on `node` has the stream's forward entry (client -> address:port)."""
    with node_maps(lab, node) as maps:
        return maps.ct_lookup(stream.local[0], address, stream.local[1], port, "TCP", "forward") is not None


def still_answering(chatter: Chatter, step: str, rounds: int = 10) -> None:
    """`rounds` more exchanges on every stream, and none failed so far."""
    chatter.wait_rounds(rounds)
    assert chatter.error is None, f"a stream broke by the end of step {step!r}: {chatter.error!r}"


REUSED_PORT = 41234     # a client port kube-proxy's connection closed on, used again once ebpfsvc serves
# One backend (mig-1), so kube-proxy and ebpfsvc pick the same for a connection from REUSED_PORT.
ALONE, ALONE_PORT = "mig-alone", 7001


def alone_answers(lab: Lab, vip: str) -> bool:
    """A connection to the one-backend Service is answered by mig-1 (its endpoints may come after
    the other Service's, and kube-proxy rejects a Service without them)."""
    try:
        stream = TcpStream(lab, CLIENT, vip, ALONE_PORT, timeout=2)
    except OSError:
        return False
    try:
        return stream.backend() == "mig-1"
    finally:
        stream.close()


def close_through_kube_proxy(lab: Lab, vip: str) -> None:
    """A connection from the client pod's REUSED_PORT through kube-proxy, closed both ways: node-1's
    kernel conntrack keeps kube-proxy's entry in TIME_WAIT for 120 s. The pod may use the port
    again at once (tcp_tw_reuse, as a busy client that opens many connections sets it)."""
    def reuse() -> None:
        Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1\n")
    nsenter.run_in(lab.pod_netns(CLIENT), reuse)
    sock = tcp_socket(lab, CLIENT, REUSED_PORT)
    try:
        sock.connect((vip, ALONE_PORT))
        sock.sendall(b"who\n")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):          # the echo, then the server's FIN
            pass
    finally:
        sock.close()


def source_port_at_the_backend(lab: Lab) -> set[int]:
    """The client ports the backends see for connections from the client pod's REUSED_PORT (the
    destination ports of their replies in node-1's kernel conntrack): REUSED_PORT, unless
    netfilter gave a new connection another one to keep its reply tuple unique."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import TCP_CONNTRACK_ESTABLISHED

    client = lab.pod_ip(CLIENT)

    def ports() -> set[int]:
        ct = Conntrack()
        try:
            return {e.tuple_reply.dport for e in ct.dump_entries()
                    if e.tuple_orig.saddr == client and e.tuple_orig.sport == REUSED_PORT
                    and e.tuple_orig.dport == PORT and e.protoinfo is not None
                    and e.protoinfo.state == TCP_CONNTRACK_ESTABLISHED}         # the new one
        finally:
            ct.close()
    return nsenter.run_in(lab.node_netns("node-1"), ports)


def new_connections(lab: Lab, vip: str, node_address: str) -> None:
    """A new connection from the client pod to the ClusterIP and one from the external client to
    node-1's NodePort: each answers, and ebpfsvc on node-1 tracks it once its agent runs."""
    agents = names.pin_dir(lab.prefix, "node-1").exists()
    for stream, address, port in ((TcpStream(lab, CLIENT, vip, PORT), vip, PORT),
                                   (TcpStream(lab, EXTERNAL, node_address, NODE_PORT, external=True),
                                    node_address, NODE_PORT)):
        try:
            assert stream.backend() in BACKENDS
            assert not agents or ebpfsvc_tracks(lab, "node-1", stream, address, port), \
                f"a new connection to {address}:{port} bypassed ebpfsvc"
        finally:
            stream.close()


@pytest.mark.parametrize("mode", kubeproxy.MODES)
def test_migration_from_kube_proxy_keeps_established_streams(unique_prefix, mode):
    before = root_settings()
    with Lab.up(prefix=unique_prefix, agents=False) as lab:
        for node in NODES:
            kubeproxy.install_kubelet_firewall(lab, node)
        lab.apply([bare_pod(CLIENT, "node-1"),
                   *[apps.pod(name, "tcp-echo", PORT, node=node, labels={"app": "mig", "mig": name})
                     for name, node in BACKENDS.items()],
                   service("mig", [{"port": PORT, "nodePort": NODE_PORT}], selector={"app": "mig"},
                           type="NodePort"),
                   service(ALONE, [{"port": ALONE_PORT, "targetPort": PORT}], selector={"mig": "mig-1"})])
        wait_ready(lab, BACKENDS)
        vip, node_address = cluster_ip(lab, "mig"), str(lab.spec.node("node-1").address)
        alone = cluster_ip(lab, ALONE)

        # 0. kube-proxy alone.
        began = time.monotonic()
        for node in NODES:
            kubeproxy.start(lab, node, mode)
        # Every backend in the rules, not just the address: a first sync can predate mig-2's readiness.
        endpoints = [f"{lab.pod_ip(name)}:{PORT}" for name in BACKENDS]
        programmed = [kubeproxy.wait_serving(lab, node, mode, vip, PORT, since=began, endpoints=endpoints)
                      for node in NODES]
        print(f"\n{mode}: kube-proxy started and programmed {vip}:{PORT} on both nodes in {max(programmed):.2f}s")
        assert kubeproxy.leftovers(lab, "node-1") - KUBELET_CHAINS, "kube-proxy programmed nothing to clean up"
        streams = [TcpStream(lab, CLIENT, vip, PORT) for _ in range(STREAMS)]
        outside = [TcpStream(lab, EXTERNAL, node_address, NODE_PORT, external=True) for _ in range(EXTERNAL_STREAMS)]
        streams += outside
        chatter = None
        try:
            backends = {s.local: s.backend() for s in streams}
            assert set(backends.values()) == set(BACKENDS), f"kube-proxy balanced the streams to {backends}"
            new_connections(lab, vip, node_address)
            assert all(listener(lab, n, p) == "kube-proxy" for n in NODES
                       for p in (kubeproxy.HEALTHZ_PORT, kubeproxy.METRICS_PORT))
            chatter = Chatter({s.local: s.backend for s in streams})
            chatter.start()
            still_answering(chatter, "kube-proxy alone", 3)

            wait_for(lambda: alone_answers(lab, alone), what=f"kube-proxy serving {ALONE}")
            close_through_kube_proxy(lab, alone)

            # 1. ebpfsvc beside kube-proxy: kube-proxy keeps its ports, the agents program anyway.
            began = time.monotonic()
            for node in NODES:
                lab.agent("start", node)
            wait_programmed(lab, "mig", PORT, backends=len(BACKENDS))
            wait_agents_attached(lab, [CLIENT, *BACKENDS])
            print(f"{mode}: agents started and attached beside kube-proxy in {time.monotonic() - began:.2f}s")
            for node in NODES:
                assert listener(lab, node, kubeproxy.HEALTHZ_PORT) == "kube-proxy"
                assert "state" not in healthz(lab, node), "kube-proxy's /healthz answers, not ebpfsvc's"
                log = lab.state.log_path(names.agent_record(node)).read_text()
                assert f"0.0.0.0:{kubeproxy.HEALTHZ_PORT}: address already in use" in log
            still_answering(chatter, "agents started")

            # 2. ebpfsvc has taken over: new connections are its own, old ones stay the kernel's.
            new_connections(lab, vip, node_address)
            # kube-proxy's closed connections are out of the kernel's conntrack (takeover.py): a new
            # connection ebpfsvc translates from the same client port keeps that port at the
            # backend, where netfilter would otherwise give it another one to keep its reply tuple
            # apart from the old entry's (TCP timestamps of another socket then meet the backend's
            # TIME_WAIT: SYNs dropped as old, docs/deploy.md).
            log = wait_for(lambda: "takeover: deleted" in (text := lab.state.log_path(
                names.agent_record("node-1")).read_text()) and text, what="node-1's takeover clear")
            assert int(log.split("takeover: deleted ", 1)[1].split()[0]) >= 1
            wait_programmed(lab, ALONE, ALONE_PORT, backends=1)
            reused = tcp_socket(lab, CLIENT, REUSED_PORT)
            try:
                reused.connect((alone, ALONE_PORT))
                reused.sendall(b"who\n")
                assert reused.recv(4096).decode().split(":", 1)[0] == "mig-1"
                assert source_port_at_the_backend(lab) == {REUSED_PORT}
            finally:
                reused.close()
            assert not any(ebpfsvc_tracks(lab, "node-1", s, vip) for s in streams[:STREAMS]), \
                "ebpfsvc took over a connection kube-proxy had translated"
            assert not any(ebpfsvc_tracks(lab, "node-1", s, node_address, NODE_PORT) for s in outside), \
                "ebpfsvc took over a NodePort connection kube-proxy had translated"

            # 3. kube-proxy stops (its rules stay); the agents get the ports.
            began = time.monotonic()
            for node in NODES:
                kubeproxy.stop(lab, node)
            for node in NODES:
                wait_for(lambda: "state" in healthz(lab, node), timeout=30, what=f"ebpfsvc's /healthz on {node}")
                assert listener(lab, node, kubeproxy.METRICS_PORT) != "kube-proxy"
            print(f"{mode}: kube-proxy stopped; agents answer on {kubeproxy.HEALTHZ_PORT} after "
                  f"{time.monotonic() - began:.2f}s")
            still_answering(chatter, "kube-proxy stopped")
            new_connections(lab, vip, node_address)

            # 4. kube-proxy --cleanup in each node: its chains / table are gone.
            for node in NODES:
                for step in KEEP_NAT if mode == "nftables" else []:
                    out = lab.node_exec(node, step)
                    assert out.returncode == 0, f"{step}: {out.stderr}"
                result = kubeproxy.cleanup(lab, node)
                assert result.returncode == 0, result.stderr[-2000:]
                assert kubeproxy.leftovers(lab, node) <= KUBELET_CHAINS
            still_answering(chatter, "kube-proxy --cleanup")
            new_connections(lab, vip, node_address)

            chatter.halt()
            assert chatter.error is None, f"a stream broke during the migration: {chatter.error!r}"
            assert {s.local: s.backend() for s in streams} == backends, "a stream changed backend"
            assert chatter.who_answered() == {local: {b} for local, b in backends.items()}

            # 5. Once the connections from before the switch are over, the placeholder goes.
            for s in streams:
                s.close()
            for node in NODES if mode == "nftables" else []:
                out = lab.node_exec(node, DROP_KEEP_NAT)
                assert out.returncode == 0, out.stderr
            new_connections(lab, vip, node_address)
        finally:
            if chatter is not None:
                chatter.halt()
            for s in streams:
                s.close()
    assert root_settings() == before, "kube-proxy changed a setting outside the lab's namespaces"


def test_streams_survive_losing_their_conntrack_entries(unique_prefix):
    """The other side of leaving mid-stream segments to the kernel: a connection ebpfsvc balanced
    whose entries are gone (evicted from the LRU map, or expired) is not balanced again by the pod
    hook. The kernel routes its next segment to the service CIDR's device, where the node-client
    hook (host.h) balances it: by Maglev, to the backend the connection already has."""
    with Lab.up(prefix=unique_prefix, agents=True) as lab:
        lab.apply([bare_pod(CLIENT, "node-1"),
                   *[apps.pod(name, "tcp-echo", PORT, node=node, labels={"app": "mig"})
                     for name, node in BACKENDS.items()],
                   service("mig", [{"port": PORT}], selector={"app": "mig"})])
        wait_ready(lab, BACKENDS)
        wait_programmed(lab, "mig", PORT, backends=len(BACKENDS))
        wait_agents_attached(lab, [CLIENT, *BACKENDS])
        vip = cluster_ip(lab, "mig")
        streams = [TcpStream(lab, CLIENT, vip, PORT) for _ in range(STREAMS)]
        try:
            backends = {s.local: s.backend() for s in streams}
            assert all(ebpfsvc_tracks(lab, "node-1", s, vip) for s in streams)
            # Every entry gone, as LRU eviction under pressure would do it.
            assert rewrite_ct4(lab, "node-1", lambda key, entry: False) >= 2 * STREAMS
            assert {s.local: s.backend() for s in streams} == backends
            assert all(ebpfsvc_tracks(lab, "node-1", s, vip) for s in streams), "tracked again (host.h)"
        finally:
            for s in streams:
                s.close()
