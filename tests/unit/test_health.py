"""/healthz, /livez and healthCheckNodePort servers across agent states, with a
fake clock and a controllable agent; real HTTP on 127.0.0.1, ephemeral ports."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from ipaddress import IPv4Address as A

import pytest

from ebpfsvc.desired import LBDelta
from ebpfsvc.health import (HealthServer, LocalEndpointCounts, ProxierHealth, ServiceHealthServers,
                            local_endpoint_counts, parse_bind_address)
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, Scope, ServicePortName
from ebpfsvc.collectors import AgentReadings
from ebpfsvc.telemetry import Telemetry


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def get(port: int, path: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


# ---- ProxierHealth: kube-proxy's rules -------------------------------------------------------------

def test_a_fault_fails_healthz_with_its_reason_until_cleared():
    """A configuration the node cannot serve (a missing --uplink) is a 503 naming it, not a log
    line behind a healthy node (issue 10)."""
    h = ProxierHealth(timeout=60, clock=FakeClock())
    h.updated()
    h.set_fault("uplinks", "uplink bond0 not found")
    ok, state, reason, body = h.status()
    assert (ok, state, reason) == (False, "fault", "uplink bond0 not found") and body["reason"] == reason
    server = HealthServer(h, alive=lambda: True, host="127.0.0.1", port=0)
    try:
        code, body, _ = get(server.port, "/healthz")
        assert code == 503 and body["reason"] == "uplink bond0 not found"
        assert get(server.port, "/livez")[0] == 200            # the loops run: no restart would help
        h.set_fault("uplinks", None)
        assert get(server.port, "/healthz")[0] == 200
    finally:
        server.close()


def test_healthz_states_with_a_fake_clock():
    clock = FakeClock()
    h = ProxierHealth(timeout=60, clock=clock)
    ok, state, reason, body = h.status()
    assert (ok, state) == (False, "starting") and body["lastUpdated"] == "0001-01-01T00:00:00Z"
    h.queued()                       # changes seen, first sync still running
    clock.advance(59)
    assert h.status()[:2] == (False, "starting")
    h.updated()
    ok, state, _, body = h.status()
    assert (ok, state) == (True, "synced")
    assert body["lastUpdated"] == body["currentTime"] == "2023-11-14T22:14:19.000000Z"
    # A change queued and served in time stays healthy; one left pending past the timeout does not.
    clock.advance(10)
    h.queued()
    clock.advance(49)
    assert h.status()[0] is True
    clock.advance(1)
    ok, state, reason, _ = h.status()
    assert (ok, state) == (False, "stale")
    assert reason == "no sync for 60.0s, an update queued 50.0s ago is not programmed"
    h.updated()
    assert h.status()[0] is True
    # No queued change, but no sync either (the periodic resync stopped): stale after the timeout.
    clock.advance(60)
    ok, state, reason, _ = h.status()
    assert (ok, state, reason) == (False, "stale", "no sync for 60.0s")
    h.updated()
    h.set_stopping()
    assert h.status()[:2] == (False, "stopping")


def test_livez_fails_only_on_stale_updates_as_kube_proxy():
    """kube-proxy v1.37.2's livezHandler answers 503 exactly when its proxier is unhealthy (an update
    waited past the timeout): not while starting, not for the Node, not for a configuration fault."""
    clock = FakeClock()
    h = ProxierHealth(timeout=60, clock=clock)
    srv = HealthServer(h, alive=lambda: True, host="127.0.0.1", port=0)
    try:
        h.queued()
        clock.advance(600)                                   # a slow first sync is not killed
        assert get(srv.port, "/livez")[0] == 200 and h.stale() == ""
        h.updated()
        h.node_changed(parse_node(node_obj(taints=[TO_BE_DELETED])))
        h.set_fault("uplinks", "uplink bond0 not found")
        assert get(srv.port, "/healthz")[0] == 503
        assert get(srv.port, "/livez")[0] == 200             # a restart would change neither
        h.queued()
        clock.advance(60)
        code, body, _ = get(srv.port, "/livez")
        assert (code, body["state"]) == (503, "stale") and "nodeEligible" not in body
        assert body["reason"] == "no sync for 60.0s, an update queued 60.0s ago is not programmed"
        assert get(srv.port, "/healthz")[1]["reason"] == "uplink bond0 not found"
        h.updated()
        assert get(srv.port, "/livez")[0] == 200
    finally:
        srv.close()


def test_bind_address_forms():
    assert parse_bind_address("0.0.0.0:10256", 1) == ("0.0.0.0", 10256)
    assert parse_bind_address(":10249", 1) == ("0.0.0.0", 10249)
    assert parse_bind_address("127.0.0.1", 10249) == ("127.0.0.1", 10249)


def test_health_server_http_answers():
    clock = FakeClock()
    h = ProxierHealth(timeout=60, clock=clock)
    alive = threading.Event()
    alive.set()
    probes = []
    srv = HealthServer(h, alive.is_set, "127.0.0.1", 0, details=lambda: {"source": {"Service": {"errors": 2}}},
                       on_request=lambda p, c: probes.append((p, c)))
    try:
        code, body, headers = get(srv.port, "/healthz")
        assert code == 503 and body["state"] == "starting" and "lastUpdated" in body and "currentTime" in body
        assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
        assert get(srv.port, "/livez")[0] == 200          # alive while starting: no restart needed
        h.updated()
        code, body, _ = get(srv.port, "/healthz")
        assert code == 200 and body["source"] == {"Service": {"errors": 2}}
        clock.advance(61)
        assert get(srv.port, "/healthz")[0] == 503
        code, body, _ = get(srv.port, "/livez")           # stale: kube-proxy v1.37.2's livez fails too
        assert (code, body["state"], body["reason"]) == (503, "stale", "no sync for 61.0s")
        h.updated()                                       # fresh again: the next 503 is the dead loops
        alive.clear()
        assert get(srv.port, "/livez")[0] == 503
        assert get(srv.port, "/nope")[0] == 404
        assert probes == [("/healthz", 503), ("/livez", 200), ("/healthz", 200), ("/healthz", 503),
                          ("/livez", 503), ("/livez", 503), ("/nope", 404)]
    finally:
        srv.close()


# ---- healthCheckNodePort servers ---------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_health_servers_answer_by_local_endpoint_count():
    healthy = threading.Event()
    healthy.set()
    servers = ServiceHealthServers("127.0.0.1", proxy_healthy=healthy.is_set)
    web, api = ("default", "web"), ("prod", "api")
    p1, p2 = _free_port(), _free_port()
    try:
        servers.sync({web: p1, api: p2}, {web: 2})
        code, body, headers = get(p1, "/")
        assert code == 200 and body == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2,
                                        "serviceProxyHealthy": True}
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        code, body, _ = get(p2, "/anything")
        assert code == 503 and body["localEndpoints"] == 0
        # Endpoints move; the proxy itself turns unhealthy; a Service's port changes.
        servers.sync({web: p1, api: p2}, {web: 0, api: 1})
        assert get(p1, "/")[0] == 503 and get(p2, "/")[0] == 200
        healthy.clear()
        code, body, _ = get(p2, "/")
        assert code == 503 and body["serviceProxyHealthy"] is False
        healthy.set()
        p3 = _free_port()
        servers.sync({api: p3}, {api: 1})
        assert servers.ports == {api: p3}
        assert get(p3, "/")[0] == 200
        for closed in (p1, p2):
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{closed}/", timeout=2)
    finally:
        servers.close()


def test_local_endpoint_counts_from_the_applied_state():
    spn = ServicePortName("default", "web", "http")
    spn2 = ServicePortName("default", "web", "https")
    local = Backend(A("198.18.2.1"), 8080, local=True)
    local_term = Backend(A("198.18.2.2"), 8080, local=True, terminating=True)
    remote = Backend(A("198.18.3.1"), 8080)
    state = LBState.of([
        Frontend(FrontendKey(A("198.19.0.10"), 80), spn, backends=(local, local_term, remote)),
        Frontend(FrontendKey(A("198.18.0.2"), 30080, scope=Scope.EXTERNAL), spn, backends=(local, local_term),
                 local_only=True),
        Frontend(FrontendKey(A("198.19.0.10"), 443), spn2, backends=(Backend(A("198.18.2.1"), 8443, local=True),)),
        Frontend(FrontendKey(A("198.19.0.11"), 80), ServicePortName("default", "other"), backends=(remote,)),
    ])
    # The same pod on two ports is one endpoint; terminating ones are not ready.
    assert local_endpoint_counts(state) == {("default", "web"): 1, ("default", "other"): 0}
    # Only the Services asked for (those with a healthCheckNodePort); none asked, none counted.
    assert local_endpoint_counts(state, {("default", "web"): 30500}) == {("default", "web"): 1}
    assert local_endpoint_counts(state, {}) == {}


def test_local_endpoint_counts_kept_by_delta_are_the_walks():
    """LocalEndpointCounts (what telemetry asks after every sync) against local_endpoint_counts, over
    500 random states in a row: frontends come, go, change backends and change Service; the delta
    is right (its base the state counted last), absent, or of another base (then it indexes anew);
    the Services asked for change now and then, and some syncs ask for none (then it is not told
    about that state at all)."""
    rng = random.Random(12)
    services = [ServicePortName("ns", f"s{i}", port) for i in range(6) for port in ("", "b")]
    keys = [FrontendKey(A(f"198.19.0.{i}"), 80 + j) for i in range(1, 9) for j in range(3)]

    def frontend(key):
        backends = {Backend(A(f"198.18.{rng.randrange(3)}.{rng.randrange(1, 6)}"), 8080,
                            local=rng.random() < 0.5, terminating=rng.random() < 0.2,
                            not_ready=rng.random() < 0.1) for _ in range(rng.randrange(4))}
        by_name = {b.name: b for b in backends}
        return Frontend(key, rng.choice(services), backends=tuple(sorted(by_name.values(), key=lambda b: b.name)))

    counter, counted = LocalEndpointCounts(), None
    state = LBState({})
    for step in range(500):
        changed = set(rng.sample(keys, rng.randrange(1, 6)))
        fes = dict(state.frontends)
        for key in changed:
            if key in fes and rng.random() < 0.3:
                del fes[key]
            else:
                fes[key] = frontend(key)
        previous, state = state, LBState(fes)
        roll = rng.random()
        delta = (LBDelta(previous, frozenset(changed)) if roll < 0.8
                 else None if roll < 0.9 else LBDelta(LBState(dict(previous.frontends)), frozenset(changed)))
        if step == 0 or rng.random() < 0.15:        # the Services with a healthCheckNodePort change now and then
            asked = {(s.namespace, s.name): 30000 for s in rng.sample(services, rng.randrange(len(services)))}
        got = counter.counts(state, asked, delta)
        assert got == local_endpoint_counts(state, asked), f"step {step}"
        counted = state if asked else counted
    assert counted is not None


# ---- the agent's states, through Telemetry with a controllable agent ----------------------------

@dataclass
class FakeConfig:
    pin_dir: str = "/nonexistent/ebpfsvc-test"
    sync_period: float = 30.0
    healthz_bind_address: str = "127.0.0.1:0"
    metrics_bind_address: str = ""
    bind_address_hard_fail: bool = False
    node: object = None


class FakeRunner:
    def __init__(self):
        self._thread = threading.Thread(target=threading.Event().wait, daemon=True)
        self.failures = 0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@dataclass
class FakeSource:
    stats: dict = field(default_factory=dict)


@dataclass
class FakeAgent:
    config: FakeConfig = field(default_factory=FakeConfig)
    runner: FakeRunner = field(default_factory=FakeRunner)
    source: FakeSource = field(default_factory=FakeSource)
    last_applied: LBState | None = None
    invalid_objects: int = 0
    state: object = None
    desired: object = None


def telemetry(agent: FakeAgent, clock=None) -> Telemetry:
    """A Telemetry reading the fake agent as the real one hands itself over (agent.Agent)."""
    state = lambda: agent.state  # noqa: E731
    readings = AgentReadings(
        loops_alive=lambda: agent.runner.alive, sync_failures=lambda: agent.runner.failures,
        source_stats=lambda: agent.source.stats, invalid_objects=lambda: agent.invalid_objects,
        problems=lambda: state().problems if state() is not None else [],
        pending_changes=(lambda: state().pending_changes()) if agent.state is not None else None)
    return Telemetry(agent.config, readings, **({"clock": clock} if clock is not None else {}))


def test_agent_states_starting_synced_api_lost_stale_stopping():
    clock = FakeClock()
    agent = FakeAgent()
    t = telemetry(agent, clock)
    t.start()
    port = t.healthz_server.port
    try:
        # Starting: the loops are not running yet; nothing synced.
        code, body, _ = get(port, "/healthz")
        assert (code, body["state"]) == (503, "starting")
        assert get(port, "/livez")[0] == 503
        agent.runner._thread.start()
        assert get(port, "/livez")[0] == 200

        # Synced.
        t.queued()
        t.sync_started()
        t.sync_done(0.01)
        assert get(port, "/healthz")[0] == 200

        # API lost: watches fail, but the periodic resync keeps completing with the last known state.
        agent.source.stats = {"Service": {"synced": True, "errors": 5, "last_error": "watch: API unreachable"}}
        for _ in range(4):
            clock.advance(30)
            t.sync_started()
            t.sync_done(0.001)
        code, body, _ = get(port, "/healthz")
        assert code == 200 and body["source"]["Service"]["lastError"] == "watch: API unreachable"

        # Stale: a change is queued and no sync completes within 2 x sync period.
        t.queued()
        clock.advance(59)
        assert get(port, "/healthz")[0] == 200
        clock.advance(1)
        code, body, _ = get(port, "/healthz")
        assert (code, body["state"]) == (503, "stale")
        assert get(port, "/livez")[0] == 503     # kube-proxy: a stuck sync loop is restarted by the kubelet
        t.sync_started()
        t.sync_done(0.002)
        assert get(port, "/healthz")[0] == 200

        # Stopping: /healthz fails at once, /livez too.
        t.stop()
        code, body, _ = get(port, "/healthz")
        assert (code, body["state"]) == (503, "stopping")
        assert get(port, "/livez")[0] == 503
    finally:
        t.close()


# ---- addresses already taken (kube-proxy still running) ---------------------------------------

import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ebpfsvc import health  # noqa: E402
from ebpfsvc.health import BindError  # noqa: E402


def hold_port() -> socket.socket:
    """A listening socket on a free 127.0.0.1 port, as kube-proxy holds 10256 and 10249."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def eventually(pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_taken_addresses_are_retried_in_the_background_not_fatal(monkeypatch, caplog):
    monkeypatch.setattr(health, "BIND_RETRY_INTERVAL", 0.05)
    healthz, metrics = hold_port(), hold_port()
    hport, mport = healthz.getsockname()[1], metrics.getsockname()[1]
    agent = FakeAgent(config=FakeConfig(healthz_bind_address=f"127.0.0.1:{hport}",
                                        metrics_bind_address=f"127.0.0.1:{mport}"))
    t = telemetry(agent, FakeClock())
    caplog.set_level(logging.INFO, logger="ebpfsvc.health")
    try:
        t.start()                                    # no exception: the agent goes on and programs Services
        assert t.healthz_server.port is None and t.metrics_server.port is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"--healthz-bind-address 127.0.0.1:{hport}: address already in use (is kube-proxy still running?); "
            "retrying every 0.05s in the background, as kube-proxy does",
            f"--metrics-bind-address 127.0.0.1:{mport}: address already in use (is kube-proxy still running?); "
            "retrying every 0.05s in the background, as kube-proxy does"]
        # kube-proxy lets go of its healthz port: ours is served at once, and says metrics is still taken.
        healthz.close()
        eventually(lambda: t.healthz_server.port == hport)
        code, body, _ = get(hport, "/healthz")
        assert code == 503 and body["bindErrors"] == [
            f"--metrics-bind-address 127.0.0.1:{mport}: address already in use (is kube-proxy still running?)"]
        metrics.close()
        eventually(lambda: t.metrics_server.port == mport)
        assert "bindErrors" not in get(hport, "/healthz")[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            assert r.status == 200
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2, "each problem logged once"
    finally:
        t.close()
        healthz.close()
        metrics.close()


def test_bind_address_hard_fail_is_one_clear_error():
    held = hold_port()
    port = held.getsockname()[1]
    agent = FakeAgent(config=FakeConfig(healthz_bind_address=f"127.0.0.1:{port}", bind_address_hard_fail=True))
    t = telemetry(agent, FakeClock())
    try:
        with pytest.raises(BindError) as err:
            t.start()
        assert str(err.value).startswith(f"--healthz-bind-address 127.0.0.1:{port}: address already in use "
                                         "(is kube-proxy still running?); ")
    finally:
        t.close()
        held.close()


def test_the_agent_with_hard_fail_exits_with_one_line(tmp_path):
    """`ebpfsvc agent --bind-address-hard-fail` beside a kube-proxy holding its port: one line, exit 1."""
    repo = Path(__file__).resolve().parents[2]
    held = hold_port()
    port = held.getsockname()[1]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ebpfsvc.cli", "agent", "--node-name=n1", f"--manifests={tmp_path}",
             f"--pin-dir={tmp_path / 'pins'}", f"--healthz-bind-address=127.0.0.1:{port}",
             "--metrics-bind-address=", "--bind-address-hard-fail"],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if " INFO " not in line]   # the start-up log line
    assert lines == [f"ebpfsvc agent: --healthz-bind-address 127.0.0.1:{port}: address already in use "
                     "(is kube-proxy still running?); stop what holds it, choose another address, or run "
                     "without --bind-address-hard-fail to retry in the background as kube-proxy does"], out.stderr
    assert "Traceback" not in out.stderr


def test_a_taken_health_check_node_port_is_one_line_naming_the_service(caplog):
    servers = ServiceHealthServers("127.0.0.1")
    held = hold_port()
    port = held.getsockname()[1]
    web = ("default", "web")
    caplog.set_level(logging.INFO, logger="ebpfsvc.health")
    try:
        for _ in range(3):                               # every sync retries; the problem is logged once
            servers.sync({web: port}, {web: 1})
        assert servers.ports == {}
        assert [r.getMessage() for r in caplog.records] == [
            f"healthCheckNodePort {port} of Service default/web: address already in use (is kube-proxy still "
            "running?); its load balancer health check fails on this node, retried at every sync"]
        assert servers.problems == {"default/web": f"healthCheckNodePort {port} of Service default/web: "
                                                   "address already in use (is kube-proxy still running?)"}
        held.close()
        servers.sync({web: port}, {web: 1})
        assert servers.ports == {web: port} and servers.problems == {}
        assert get(port, "/")[0] == 200
        assert caplog.records[-1].getMessage() == f"healthCheckNodePort {port} of Service default/web: serving now"
    finally:
        servers.close()
        held.close()


# ---- nodeEligible (kube-proxy 1.28+) and a node that serves nothing it should ------------------------

from ebpfsvc.config import NodeConfig  # noqa: E402
from ebpfsvc.desired import DesiredStateBuilder  # noqa: E402
from ebpfsvc.health import serving_problems  # noqa: E402
from ebpfsvc.k8s.fields import Problem  # noqa: E402
from ebpfsvc.k8s.node import parse_node  # noqa: E402
from ebpfsvc.sources.base import Event, EventType  # noqa: E402
from ebpfsvc.tracker import ClusterState  # noqa: E402


def node_obj(name="node-a", *, deleting=False, taints=()):
    meta = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-22T03:00:00Z"
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {"taints": list(taints)}}


TO_BE_DELETED = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1732244400", "effect": "NoSchedule"}


def test_node_eligible_follows_the_node_as_kube_proxy_decides():
    h = ProxierHealth(timeout=60, clock=FakeClock())
    h.updated()
    ok, state, _, body = h.status()
    assert ok and body["nodeEligible"] is True                 # eligible until a Node event says otherwise
    h.node_changed(parse_node(node_obj(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}])))
    assert h.status()[0] is True                               # cordoned is still eligible
    h.node_changed(parse_node(node_obj(taints=[TO_BE_DELETED])))
    ok, state, reason, body = h.status()
    assert (ok, state, body["nodeEligible"]) == (False, "node-ineligible", False)
    assert body["healthy"] is True                             # kube-proxy's body: the proxier's health alone
    assert reason == "tainted ToBeDeletedByClusterAutoscaler (the cluster autoscaler is removing it)"
    assert h.proxier_healthy() is True                         # serviceProxyHealthy ignores the Node
    h.node_changed(parse_node(node_obj()))
    assert h.status()[0] is True and h.status()[3]["nodeEligible"] is True
    h.node_changed(parse_node(node_obj(deleting=True)))
    assert h.status()[2] == "its Node object is being deleted"
    h.node_changed(None)
    assert h.status()[2] == "its Node object is deleted"
    h.set_stopping()
    assert h.status()[1] == "stopping"


def test_healthz_body_carries_node_eligible_and_the_node_events_reach_it():
    agent = FakeAgent(config=FakeConfig(node=NodeConfig(node_name="node-a")))
    t = telemetry(agent, FakeClock())
    tracker = ClusterState(agent.config.node, on_node=t.health.node_changed)    # as the agent wires them
    t.start()
    port = t.healthz_server.port
    try:
        agent.runner._thread.start()
        t.sync_done(0.001)
        code, body, _ = get(port, "/healthz")
        assert code == 200 and body["nodeEligible"] is True
        tracker.on_relist("Node", [node_obj("node-b", taints=[TO_BE_DELETED]), node_obj("node-a")])
        assert get(port, "/healthz")[0] == 200                 # another node's taint is not ours
        tracker.on_event(Event("Node", EventType.MODIFIED, node_obj("node-a", taints=[TO_BE_DELETED])))
        code, body, _ = get(port, "/healthz")
        assert (code, body["nodeEligible"], body["state"]) == (503, False, "node-ineligible")
        code, body, _ = get(port, "/livez")
        assert code == 200 and "nodeEligible" not in body     # kube-proxy's /livez: alive, whatever the Node
        tracker.on_event(Event("Node", EventType.MODIFIED, node_obj("node-a")))
        assert get(port, "/healthz")[0] == 200
        tracker.on_event(Event("Node", EventType.DELETED, node_obj("node-a")))
        assert get(port, "/healthz")[1]["nodeEligible"] is False
    finally:
        t.close()


def test_serving_problems_rules():
    bad = Problem("Service", "default", "kubernetes", "spec.clusterIP", "10.96.0.1 is outside the service CIDR "
                  "198.19.0.0/16")
    assert serving_problems(frontends=0, rejected=[], nodeport_services=0, node_addresses=()) == []
    assert serving_problems(frontends=4, rejected=[bad], nodeport_services=0, node_addresses=()) == []
    assert serving_problems(frontends=0, rejected=[bad, bad], nodeport_services=0, node_addresses=()) == [
        "nothing is served: 2 Service(s) rejected, e.g. Service default/kubernetes: spec.clusterIP: 10.96.0.1 is "
        "outside the service CIDR 198.19.0.0/16"]
    assert serving_problems(frontends=4, rejected=[], nodeport_services=3, node_addresses=()) == [
        "3 Service(s) have a NodePort but this node has no NodePort address (--nodeport-addresses / "
        "--node-address select none of its addresses)"]
    assert serving_problems(frontends=4, rejected=[], nodeport_services=3, node_addresses=(A("198.18.0.2"),)) == []


def service(name, cluster_ip, *, node_port=None):
    spec = {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": cluster_ip,
            "ports": [{"port": 80, "protocol": "TCP", **({"nodePort": node_port} if node_port else {})}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name}, "spec": spec}


def synced_telemetry(node: NodeConfig, services: list[dict]):
    """A Telemetry over a real tracker and desired-state builder, the Services listed and synced once."""
    agent = FakeAgent(config=FakeConfig(node=node), state=ClusterState(node), desired=DesiredStateBuilder(node))
    t = telemetry(agent, FakeClock())
    agent.state.on_relist("Service", services)
    snapshot = agent.state.snapshot()
    agent.last_applied = agent.desired.build(snapshot).state
    t.sync_done(0.001, snapshot=snapshot, node=agent.desired.node, applied=agent.last_applied)
    return t


def test_every_service_rejected_makes_healthz_fail_with_the_reason():
    # The lab's default service CIDR on a cluster whose Services live in 10.96.0.0/12 (issue 10).
    t = synced_telemetry(NodeConfig(node_name="node-a", service_cidr="198.19.0.0/16"),
                         [service("kubernetes", "10.96.0.1"), service("dns", "10.96.0.10")])
    ok, state, reason, body = t.health.status()
    assert (ok, state) == (False, "not-serving")
    assert reason == ("nothing is served: 2 Service(s) rejected, e.g. Service default/dns: spec.clusterIP: "
                      "10.96.0.10 is outside the service CIDR 198.19.0.0/16")
    fine = synced_telemetry(NodeConfig(node_name="node-a", service_cidr="10.96.0.0/12"),
                            [service("kubernetes", "10.96.0.1"), service("dns", "10.96.0.10")])
    assert fine.health.status()[:2] == (True, "synced")


def test_nodeport_services_without_a_nodeport_address_make_healthz_fail():
    services = [service("web", "198.19.0.10", node_port=30080), service("api", "198.19.0.11")]
    t = synced_telemetry(NodeConfig(node_name="node-a"), services)
    ok, state, reason, _ = t.health.status()
    assert (ok, state) == (False, "not-serving")
    assert reason.startswith("1 Service(s) have a NodePort but this node has no NodePort address")
    assert t.health.proxier_healthy() is True      # healthCheckNodePorts still answer by local endpoints
    served = synced_telemetry(NodeConfig(node_name="node-a", node_addresses=("198.18.0.2",)), services)
    assert served.health.status()[:2] == (True, "synced")


def test_health_check_node_ports_only_for_services_this_proxy_serves():
    """kube-proxy v1.37.2 never sees a Service labelled service-proxy-name (even with an empty value)
    or headless, so it opens no healthCheckNodePort for them; neither do we (a Service not in the
    snapshot, e.g. rejected, gets none either). The agent's wiring: tests/e2e/test_oracle.py."""
    from ebpfsvc.health import served_health_check_ports
    from ebpfsvc.k8s.service import parse_service

    node = NodeConfig(node_name="node-a", node_addresses=("198.18.0.2",))
    labels = {"web": {}, "other": {"service.kubernetes.io/service-proxy-name": "other-proxy"},
              "empty": {"service.kubernetes.io/service-proxy-name": ""},
              "headless": {"service.kubernetes.io/headless": ""}}
    services = {}
    for name, svc_labels in labels.items():
        obj = service(name, "198.19.0.20", node_port=30090)
        obj["metadata"]["labels"] = svc_labels
        obj["spec"].update(type="LoadBalancer", externalTrafficPolicy="Local")
        services[("default", name)] = parse_service(obj, node)
    ports = {("default", name): 31000 + i for i, name in enumerate([*labels, "rejected"])}
    assert served_health_check_ports(ports, services, node) == {("default", "web"): 31000}
    servers = ServiceHealthServers("127.0.0.1")
    port = _free_port()
    try:
        servers.sync(served_health_check_ports({("default", "web"): port, ("default", "empty"): _free_port()},
                                               services, node), {})
        assert servers.ports == {("default", "web"): port} and get(port, "/")[0] == 503
    finally:
        servers.close()


def test_health_checks_follow_the_services_across_syncs():
    """LocalEndpointCounts.health_checks (what telemetry hands the servers after each sync) keeps
    the ports served while the snapshot's Services stay the same object, and asks again when a
    Service or the node changes: each sync's answer is the one made from scratch."""
    from ebpfsvc.health import served_health_check_ports

    node = NodeConfig(node_name="node-a", node_addresses=("198.18.0.2",))
    other = NodeConfig(node_name="node-a", node_addresses=("198.18.0.2",), proxy_name="other-proxy")
    state, builder, counter = ClusterState(node), DesiredStateBuilder(node), LocalEndpointCounts()

    def lb(name, hcnp, proxy=None):
        obj = service(name, f"198.19.0.{20 + len(name)}", node_port=30090 + len(name))
        obj["spec"].update(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=hcnp)
        if proxy is not None:
            obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": proxy}
        return obj

    def sync(with_node):
        snap = state.snapshot()
        applied = builder.build(snap)
        ports, counts = counter.health_checks(snap, with_node, applied.state, applied.delta)
        assert ports == served_health_check_ports(snap.health_check_node_ports(), snap.services, with_node)
        assert counts == local_endpoint_counts(applied.state, ports)
        return ports

    state.on_relist("Service", [lb("web", 31000), service("plain", "198.19.0.9")])
    assert sync(node) == {("default", "web"): 31000}
    assert sync(node) == {("default", "web"): 31000}                 # nothing changed
    state.on_event(Event("Service", EventType.MODIFIED, lb("web", 31001)))
    assert sync(node) == {("default", "web"): 31001}
    state.on_event(Event("Service", EventType.ADDED, lb("mine", 31002, proxy="other-proxy")))
    assert sync(node) == {("default", "web"): 31001}                 # another proxy's
    assert sync(other) == {("default", "mine"): 31002}              # ... which this node is
    state.on_event(Event("Service", EventType.DELETED, lb("mine", 31002, proxy="other-proxy")))
    assert sync(other) == {}
