"""/healthz, /livez and healthCheckNodePort servers across agent states, with a
fake clock and a controllable agent; real HTTP on 127.0.0.1, ephemeral ports."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from ipaddress import IPv4Address as A

import pytest

from ebpfsvc.health import (HealthServer, ProxierHealth, ServiceHealthServers, local_endpoint_counts,
                            parse_bind_address)
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, Scope, ServicePortName
from ebpfsvc.metrics import Telemetry


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
        assert get(srv.port, "/livez")[0] == 200          # stale but alive: kube-proxy's livez
        alive.clear()
        assert get(srv.port, "/livez")[0] == 503
        assert get(srv.port, "/nope")[0] == 404
        assert probes == [("/healthz", 503), ("/livez", 200), ("/healthz", 200), ("/healthz", 503),
                          ("/livez", 200), ("/livez", 503), ("/nope", 404)]
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


# ---- the agent's states, through Telemetry with a controllable agent ----------------------------

@dataclass
class FakeConfig:
    pin_dir: str = "/nonexistent/ebpfsvc-test"
    sync_period: float = 30.0
    healthz_bind_address: str = "127.0.0.1:0"
    metrics_bind_address: str = ""


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


def test_agent_states_starting_synced_api_lost_stale_stopping():
    clock = FakeClock()
    agent = FakeAgent()
    t = Telemetry(agent, clock=clock)
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
        assert get(port, "/livez")[0] == 200
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
