"""How new connections are spread over a Service's backends: even spread, and sessionAffinity ClientIP.

Backend choice for a new flow is a Maglev lookup by a hash of the 5-tuple, so from one client
the source port decides.  The affinity test uses that: it first learns which backend each of
a set of fixed source ports hashes to (affinity off), then shows affinity overriding that
mapping, expiring, and going away, each as an exact prediction rather than a statistic.
Clients close with RST, so a source port can be reused at once (no TIME_WAIT; the datapath
starts a new flow on a fresh SYN over a closed one).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from ebpfsvc import abi
from ebpfsvc.bench.traffic import net_counters
from ebpfsvc.lab import Lab, apps

from .helpers import (add_clients, cluster_ip, frontend, http_get, rewrite_ct4, service, table_backends,
                      wait_affinity, wait_for, wait_programmed, wait_ready)

pytestmark = pytest.mark.root

CLIENT = "bal-client"


@pytest.fixture(scope="module")
def lab(shared_lab: Lab) -> Lab:
    return add_clients(shared_lab, {CLIENT: "node-1"})


def three_backends(lab: Lab, app: str) -> list[str]:
    """Three http-echo pods labelled app=<app>: one on node-1, two on node-2."""
    pods = [f"{app}-1", f"{app}-2", f"{app}-3"]
    lab.apply([apps.pod(pods[0], "http-echo", 8080, node="node-1", labels={"app": app}),
               apps.pod(pods[1], "http-echo", 8080, node="node-2", labels={"app": app}),
               apps.pod(pods[2], "http-echo", 8080, node="node-2", labels={"app": app})])
    wait_ready(lab, pods)
    return pods


def test_connections_spread_evenly(lab):
    """300 connections over 3 backends: each backend answers between 60 and 140 of them.

    Bound: Maglev gives each backend floor or ceil of M/3 of the table's M slots (checked below),
    and each connection's ephemeral source port hashes to a slot, so a backend's count is
    Binomial(300, ~1/3): mean 100, standard deviation 8.2.  60 and 140 are 4.9 standard
    deviations away; the chance that any of the 3 backends falls outside is below 1e-5.
    """
    pods = three_backends(lab, "spread")
    lab.apply([service("spread", [{"port": 80, "targetPort": 8080}], selector={"app": "spread"})])
    wait_programmed(lab, "spread", 80, backends=3)
    vip = cluster_ip(lab, "spread")
    fe = frontend(lab, "node-1", vip, 80)
    assert len(table_backends(lab, "node-1", fe)) == 3

    counts = Counter(http_get(lab, CLIENT, vip, 80)["pod"] for _ in range(300))

    assert set(counts) == set(pods)
    assert all(60 <= n <= 140 for n in counts.values()), counts


def test_session_affinity_client_ip(lab):
    """ClientIP affinity: sticky over many connections, re-balanced once the timeout passes
    unused, and gone when switched off, each checked against the learnt port -> backend map."""
    timeout = 5
    three_backends(lab, "aff")
    svc = service("aff", [{"port": 80, "targetPort": 8080}], selector={"app": "aff"})
    lab.apply([svc])
    wait_programmed(lab, "aff", 80, backends=3)
    vip = cluster_ip(lab, "aff")
    ports = range(41000, 41030)

    def backends_by_port() -> dict[int, str]:
        return {p: http_get(lab, CLIENT, vip, 80, sport=p)["pod"] for p in ports}

    # Affinity off: the 5-tuple alone decides, the same way each time. 30 ports over three
    # ~equal thirds all on one backend: probability 3 * (1/3)^30, below 1e-13.
    hashed = backends_by_port()
    assert backends_by_port() == hashed
    assert len(set(hashed.values())) >= 2, hashed

    # On: the first new connection picks by hash, every later one follows it.
    lab.apply([{**svc, "spec": {**svc["spec"], "sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}}}])
    wait_affinity(lab, "aff", 80, timeout, nodes=["node-1"])
    sticky = backends_by_port()
    first = hashed[ports[0]]
    assert set(sticky.values()) == {first}, sticky

    # Unused for longer than timeoutSeconds: the next connection is balanced again (to where
    # its port hashes, another backend than the sticky one), and sticks there in turn.
    other_port = next(p for p in ports if hashed[p] != first)
    time.sleep(timeout + 1.5)     # the behaviour under test: time passing without connections
    assert http_get(lab, CLIENT, vip, 80, sport=other_port)["pod"] == hashed[other_port]
    assert http_get(lab, CLIENT, vip, 80, sport=ports[0])["pod"] == hashed[other_port]

    # Off again: the hash decides for every port, as before affinity was switched on.
    lab.apply([svc])
    wait_affinity(lab, "aff", 80, 0, nodes=["node-1"])
    assert wait_for(lambda: backends_by_port() == hashed, what="affinity off: hashed backends") is True


def _lose_the_close(lab: Lab, node: str, client: str, sport: int, vip: str, backend: str) -> int:
    """Leave `node`'s conntrack as a lost flag update did (2026-12-03, docs/datapath.md): the
    forward entry of the flow client:sport -> vip established, without its FIN or RST, and its
    reply entry (from `backend`) gone (evicted, or expired first). Returns the entries changed.
    Only this flow's: an earlier test's connection from the same client port to another Service
    may still have its entries."""
    def edit(key, entry) -> bool | None:
        if (key.dir == abi.CT_DIR_FORWARD and (key.saddr, key.sport) == (abi.be32(client), abi.be16(sport))
                and key.daddr == abi.be32(vip)):
            entry.flags = abi.CT_F_SEEN_SYN | abi.CT_F_ESTABLISHED | abi.CT_F_SEEN_FIN_REV
            return True
        if (key.dir == abi.CT_DIR_REPLY and (key.daddr, key.dport) == (abi.be32(client), abi.be16(sport))
                and key.saddr == abi.be32(backend)):
            return False
        return None
    return rewrite_ct4(lab, node, edit)


def test_a_new_connection_on_the_ports_of_a_flow_that_lost_its_close_is_translated(lab):
    """A forward entry that outlived its reply entry without being marked closed must not keep
    a new connection on its ports: nothing would translate the SYN-ACK back, the client would
    reset it and retry in vain (seen under wrk at ~9,000 connections/s, 2026-12-03). The new SYN
    starts a new flow (the same backend): the connection is answered at once."""
    lab.apply([apps.pod("reuse-1", "http-echo", 8080, node="node-1", labels={"app": "reuse"})])
    wait_ready(lab, ["reuse-1"])
    lab.apply([service("reuse", [{"port": 80, "targetPort": 8080}], selector={"app": "reuse"})])
    wait_programmed(lab, "reuse", 80, backends=1)
    vip, sport, client = cluster_ip(lab, "reuse"), 41900, lab.pod_ip(CLIENT)
    assert http_get(lab, CLIENT, vip, 80, sport=sport)["pod"] == "reuse-1"
    assert _lose_the_close(lab, "node-1", client, sport, vip, lab.pod_ip("reuse-1")) == 2
    # A SYN-ACK left untranslated is reset by the client, which sends its SYN again a second later,
    # in vain: the first SYN must be answered.
    syns = net_counters(lab.pod_netns(CLIENT), "netstat", "TcpExt")["TCPSynRetrans"]
    assert http_get(lab, CLIENT, vip, 80, sport=sport, timeout=5)["pod"] == "reuse-1"
    assert net_counters(lab.pod_netns(CLIENT), "netstat", "TcpExt")["TCPSynRetrans"] == syns
