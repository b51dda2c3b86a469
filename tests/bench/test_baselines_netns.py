"""kube-proxy baselines loaded for real: a ClusterIP reaches its backends, evenly, at 1 to 10,000 services (root).

The router namespace of the benchmark topology gets each baseline with the
tool kube-proxy uses (iptables-restore, nf_tables and legacy backends; nft -f);
the client then connects to the ClusterIP and the echo server says which
backend address answered.
"""

from __future__ import annotations

import errno
import ipaddress
import subprocess
import time

import pytest

from ebpfsvc.bench import traffic
from ebpfsvc.bench.baselines import synthetic_state
from ebpfsvc.bench.baselines.load import KINDS, clear, load_baseline
from ebpfsvc.datapath import nsenter
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, ServicePortName
from tests.bench.conftest import ECHO_PORT

pytestmark = pytest.mark.root

PROBE_IP = "198.19.0.1"
EMPTY_IP = "198.19.0.2"
SPREAD_CONNECTIONS = 300
# Each of 3 backends gets Binomial(300, 1/3): mean 100, standard deviation 8.2.
# [60, 140] is ±4.9 standard deviations: a correct random spread fails it about
# once in 300,000 runs, while a chain that skips or favours one backend (0, or
# 150+ for one of them) cannot pass.
SPREAD_BOUNDS = (60, 140)


def probe(backends) -> Frontend:
    eps = tuple(Backend(ipaddress.IPv4Address(b), ECHO_PORT) for b in backends)
    return Frontend(FrontendKey(ipaddress.IPv4Address(PROBE_IP), 80), ServicePortName("bench", "probe", "http"),
                    backends=eps)


def no_endpoints() -> Frontend:
    return Frontend(FrontendKey(ipaddress.IPv4Address(EMPTY_IP), 80), ServicePortName("bench", "empty", "http"))


@pytest.fixture
def echo(topology):
    with traffic.echo_server(topology.server, ECHO_PORT) as server:
        yield server


def connect_error(netns: str, address: str, port: int) -> str:
    sock = nsenter.socket_in(netns)
    sock.settimeout(3)
    try:
        sock.connect((address, port))
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
    finally:
        sock.close()


def loaded_services(netns: str, kind: str) -> int:
    """How many service chains the kernel holds now, counted from the tool's own listing."""
    if kind == "nftables":
        out = subprocess.run(["nft", "list", "chains", "ip"], capture_output=True, text=True, check=True,
                             preexec_fn=nsenter.preexec(netns)).stdout
        return sum(1 for line in out.splitlines() if line.strip().startswith("chain service-"))
    save = "iptables-legacy-save" if kind == "iptables-legacy" else "iptables-nft-save"
    out = subprocess.run([save, "-t", "nat"], capture_output=True, text=True, check=True,
                         preexec_fn=nsenter.preexec(netns)).stdout
    return sum(1 for line in out.splitlines() if line.startswith(":KUBE-SVC-"))


@pytest.mark.parametrize("kind", KINDS)
def test_clusterip_spreads_over_three_backends(topology, echo, kind):
    state = LBState.of([probe(topology.backends), no_endpoints()])
    load_baseline(topology.router, kind, state)

    r = traffic.backend_spread(topology.client, PROBE_IP, 80, count=SPREAD_CONNECTIONS, duration=60)
    counts = r["backends"]
    print(f"{kind}: {counts}")
    assert r["errors"] == {}
    assert sum(counts.values()) == SPREAD_CONNECTIONS
    assert set(counts) == set(topology.backends)
    assert all(SPREAD_BOUNDS[0] <= c <= SPREAD_BOUNDS[1] for c in counts.values()), counts

    # No endpoints: rejected at once (ICMP port unreachable), not left to time out.
    assert connect_error(topology.client, EMPTY_IP, 80) == "ECONNREFUSED"


@pytest.mark.parametrize("kind", KINDS)
def test_without_baseline_the_clusterip_goes_nowhere(topology, echo, kind):
    # The control for the test above: after clear(), the same ClusterIP leads
    # to the router's empty upstream (ARP fails: host unreachable, or silence).
    load_baseline(topology.router, kind, LBState.of([probe(topology.backends)]))
    clear(topology.router)
    assert connect_error(topology.client, PROBE_IP, 80) != "connected"


@pytest.mark.parametrize("services", [1, 1000, 10_000])
@pytest.mark.parametrize("kind", KINDS)
def test_load_n_services_and_reach_the_probe(topology, echo, kind, services, record_property):
    pool = [(b, ECHO_PORT) for b in topology.backends]
    state = synthetic_state(services, 3, pool, probes=[probe(topology.backends)])
    result = load_baseline(topology.router, kind, state)
    record_property("load", result)
    print(f"\n{kind} {services} services: load {result['load_seconds']:.3f} s, "
          f"render {result['render_seconds']:.3f} s, {result['payload_lines']} lines")

    assert loaded_services(topology.router, kind) == services
    r = traffic.backend_spread(topology.client, PROBE_IP, 80, count=30, duration=30)
    assert r["errors"] == {} and sum(r["backends"].values()) == 30
    assert set(r["backends"]) <= set(topology.backends)
    # A synthetic service is as real as the probe: its ClusterIP answers too.
    others = [fe for fe in state.frontends.values() if fe.service.name != "probe"]
    if others:
        r = traffic.backend_spread(topology.client, str(others[-1].key.address), 80, count=3, duration=30)
        assert sum(r["backends"].values()) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_endpoint_change_is_seen_on_the_wire(topology, echo, kind):
    # The probe moves from backend .11 to .12 by reloading the whole baseline
    # (kube-proxy's full sync); the watcher, already connecting, sees .12 answer.
    pool = [(b, ECHO_PORT) for b in topology.backends]
    before = synthetic_state(1000, 3, pool, probes=[probe(topology.backends[:1])])
    after = synthetic_state(1000, 3, pool, probes=[probe(topology.backends[1:2])])
    load_baseline(topology.router, kind, before)
    with traffic.BackendWatch(topology.client, PROBE_IP, 80, topology.backends[1], duration=30) as watch:
        changed_at = time.monotonic()
        loaded = load_baseline(topology.router, kind, after)
    r = watch.result()
    assert r["seen_at"] is not None, r
    assert r["before"] and set(r["before"]) == {topology.backends[0]}    # the old backend served until then
    print(f"\n{kind}: endpoint change on the wire after {1000 * (r['seen_at'] - changed_at):.1f} ms "
          f"(reload {1000 * loaded['load_seconds']:.1f} ms, {r['attempts']} connections)")


def every_feature(backends) -> LBState:
    """One state using every branch of the renderers: the kernel must accept all of it."""
    from ebpfsvc.lbmodel import FrontendKind, Protocol, Scope

    eps = tuple(Backend(ipaddress.IPv4Address(b), ECHO_PORT) for b in backends)
    local = tuple(Backend(b.address, b.port, local=True) for b in eps[:1])
    web = ServicePortName("bench", "web", "http")
    lb = ServicePortName("bench", "lb", "")
    dns = ServicePortName("bench", "dns", "dns", Protocol.UDP)
    A = ipaddress.IPv4Address
    return LBState.of([
        Frontend(FrontendKey(A(PROBE_IP), 80), web, backends=eps, affinity_timeout=30),
        Frontend(FrontendKey(A("198.18.1.1"), 30080, scope=Scope.EXTERNAL), web, kind=FrontendKind.NODE_PORT,
                 backends=eps, affinity_timeout=30),
        Frontend(FrontendKey(A("198.18.100.1"), 80, scope=Scope.EXTERNAL), web, kind=FrontendKind.EXTERNAL_IP,
                 backends=eps, affinity_timeout=30),
        Frontend(FrontendKey(A("198.19.0.3"), 80), lb, backends=eps),
        Frontend(FrontendKey(A("198.18.1.1"), 30081, scope=Scope.EXTERNAL), lb, kind=FrontendKind.NODE_PORT,
                 backends=local, local_only=True),
        Frontend(FrontendKey(A("198.18.200.1"), 80, scope=Scope.EXTERNAL), lb, kind=FrontendKind.LOAD_BALANCER,
                 backends=local, local_only=True, source_ranges=(ipaddress.IPv4Network("198.18.1.0/24"),)),
        Frontend(FrontendKey(A("198.19.0.10"), 53, Protocol.UDP), dns,
                 backends=tuple(Backend(b.address, 53, Protocol.UDP) for b in eps)),
        no_endpoints(),
        Frontend(FrontendKey(A("198.18.1.1"), 30082, scope=Scope.EXTERNAL), ServicePortName("bench", "empty", "http"),
                 kind=FrontendKind.NODE_PORT),
    ])


@pytest.mark.parametrize("kind", KINDS)
def test_every_feature_loads_and_nodeports_answer(topology, echo, kind):
    # Pods only on the server side: the client counts as outside the cluster, so
    # a Local policy applies to it (a pod would be short-circuited to all endpoints).
    load_baseline(topology.router, kind, every_feature(topology.backends), cluster_cidr="198.18.2.0/24")
    # NodePort on the router's own address, Cluster policy: masqueraded, any backend.
    r = traffic.backend_spread(topology.client, "198.18.1.1", 30080, count=30, duration=30)
    assert r["errors"] == {} and sum(r["backends"].values()) == 30
    # NodePort with a Local policy: only the local endpoint.
    r = traffic.backend_spread(topology.client, "198.18.1.1", 30081, count=10, duration=30)
    assert r["backends"] == {topology.backends[0]: 10}
    # Affinity: one client keeps its backend.
    r = traffic.backend_spread(topology.client, PROBE_IP, 80, count=20, duration=30)
    assert len(r["backends"]) == 1 and sum(r["backends"].values()) == 20
    # A NodePort without endpoints is refused.
    assert connect_error(topology.client, "198.18.1.1", 30082) == "ECONNREFUSED"
