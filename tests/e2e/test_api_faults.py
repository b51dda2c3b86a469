"""API faults against the real control plane: the agents keep the data plane and converge after.

Each test has its own lab (real etcd, kube-apiserver and kube-controller-manager, one agent per
node) with a Service over two http-echo pods, and a Traffic thread that opens a new connection to
the Service from a client pod every 0.1 s for the whole test. Then a fault:

- the API server stopped for longer than /healthz's staleness timeout, then started again;
- every agent's watch expired: agents frozen (SIGSTOP) while the API server restarts, objects
  change and etcd is compacted, so on waking up their resourceVersions are gone (410);
- etcd stopped (the API server stays up without storage), then started on the same data dir.

Every test shows: no request fails meanwhile (the maps keep the last state), /healthz stays 200
while the API is away (health.py: losing the API is not unhealthy by itself), and a change made
once the API is back reaches the wire within a bounded wait. Printed (see with `pytest -rP`):
`CONVERGENCE ...`, the times from "API ready again" to "change on the wire", for a Service with a
hand-written EndpointSlice (the agents' time alone) and for a new pod (which waits for
kube-controller-manager's own recovery first); `SOURCE ...`, what the agents' API sources went
through (errors, re-lists, resumed watches).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, apps, names, processes
from ebpfsvc.lab.api import APIError

from .helpers import (bare_pod, cluster_ip, frontend, http_get, service, wait_agents_attached, wait_for,
                      wait_programmed, wait_ready)

pytestmark = pytest.mark.root

CLIENT = "af-client"            # a process-less pod on node-1: a namespace, an IP, a veth
NODES = ("node-1", "node-2")
# Upper bound for "the agents converge": the reflectors' backoff is capped at 30 s (sources/kube.py),
# then a list and a sync; doubled for a shared two-core machine. Never a timing assertion.
CONVERGE_TIMEOUT = 120.0
# Upper bound for kube-controller-manager to put a new pod into a slice after an API outage: its
# client-go reflectors wait a backoff of up to 30 s, which jitter stretches to 60, before reconnecting,
# and wait it again after the restarted API server's 410 before re-listing (measured: up to 77 s).
CONTROLLER_TIMEOUT = 180.0
HEALTHZ_PORT, METRICS_PORT = 10256, 10249      # deploy/daemonset.yaml


# -- the lab's pieces ----------------------------------------------------------------------------


def echo(name: str, node: str) -> dict:
    """An http-echo pod labelled app=af (the Service) and pod=<name> (to select exactly it)."""
    return apps.pod(name, "http-echo", 8080, node=node, labels={"app": "af", "pod": name})


def svc(name: str, **selector: str) -> dict:
    return service(name, [{"port": 80, "targetPort": 8080}], selector=selector)


def start_lab_with_service(lab: Lab) -> str:
    """Service af over af-1 (node-1) and af-2 (node-2), programmed on both nodes; its clusterIP."""
    lab.apply([bare_pod(CLIENT, "node-1"), echo("af-1", "node-1"), echo("af-2", "node-2"), svc("af", app="af")])
    wait_ready(lab, ["af-1", "af-2"])
    wait_agents_attached(lab, [CLIENT])
    wait_programmed(lab, "af", 80, backends=2)
    return cluster_ip(lab, "af")


def http_get_in(netns: str, host: str, port: int, timeout: float = 5.0) -> dict:
    """helpers.http_get from a namespace known by name: asks the API nothing, so it works while the
    API is away (helpers' clients look the pod's namespace up in the API)."""
    sock = nsenter.socket_in(netns)
    sock.settimeout(timeout)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        sock.connect((host, port))
        conn.sock = sock
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status} from {host}:{port}: {body[:200]!r}")
        # RST instead of FIN: no TIME_WAIT left behind by a connection every 0.1 s.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return json.loads(body)
    finally:
        sock.close()


class Traffic(threading.Thread):
    """A new HTTP connection to vip:80 from the client pod every 0.1 s until halted, each recorded as
    (monotonic time, answering pod or the error). Bounded in count and time."""

    def __init__(self, lab: Lab, vip: str, max_seconds: float = 600):
        super().__init__(daemon=True, name="traffic")
        self.netns = lab.pod_netns(CLIENT)     # looked up now: the API may be gone later
        self.vip = vip
        self.results: list[tuple[float, str, bool]] = []       # (when, pod or error, ok)
        self._halt = threading.Event()
        self._deadline = time.monotonic() + max_seconds

    def run(self) -> None:
        for _ in range(20_000):
            if self._halt.is_set() or time.monotonic() > self._deadline:
                return
            try:
                result = (http_get_in(self.netns, self.vip, 80)["pod"], True)
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                result = (repr(exc), False)
            self.results.append((time.monotonic(), *result))
            self._halt.wait(0.1)

    def answers(self, since: float = 0.0) -> list[str]:
        return [who for t, who, ok in list(self.results) if ok and t >= since]

    def failures(self) -> list[tuple[float, str]]:
        return [(t, who) for t, who, ok in list(self.results) if not ok]

    def first_answer_from(self, pod: str, since: float) -> float | None:
        return next((t for t, who, ok in list(self.results) if ok and who == pod and t >= since), None)

    def wait_answers(self, count: int) -> None:
        target = len(self.answers()) + count
        wait_for(lambda: len(self.answers()) >= target or self.failures(), what=f"{count} more answers")

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=30)


@contextmanager
def service_traffic(lab: Lab, vip: str) -> Iterator[Traffic]:
    """Traffic to `vip` for the whole block, 5 answers through before it runs; halted on the way
    out, also on failure (no thread left talking into a lab coming down); then no request may have
    failed: the one promise every fault here keeps."""
    traffic = Traffic(lab, vip)
    traffic.start()
    try:
        traffic.wait_answers(5)
        yield traffic
    finally:
        traffic.halt()
    assert not traffic.failures(), f"requests failed: {traffic.failures()[:5]}"


# -- the agents' own endpoints, asked from inside their node ------------------------------------------


def agent_get(lab: Lab, node: str, port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of the agent's server on the node address (curl in the node's namespace)."""
    address = lab.spec.node(node).address
    out = lab.node_exec(node, ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}",
                               f"http://{address}:{port}{path}"], timeout=15)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def healthz(lab: Lab, node: str) -> tuple[int, dict]:
    code, body = agent_get(lab, node, HEALTHZ_PORT, "/healthz")
    return code, json.loads(body)


WATCH_METRIC = re.compile(r'^ebpfsvc_watch_(\w+)_total\{kind="(\w+)"\} (\S+)$', re.M)


def watch_counters(lab: Lab, node: str) -> dict[tuple[str, str], float]:
    """{(counter, kind): value} of the agent's ebpfsvc_watch_*_total metrics (lists, relists, ...)."""
    code, body = agent_get(lab, node, METRICS_PORT, "/metrics")
    assert code == 200, body[:200]
    return {(counter, kind): float(value) for counter, kind, value in WATCH_METRIC.findall(body)}


def print_source_changes(lab: Lab, before: dict[str, dict], label: str) -> None:
    """What each agent's API source went through since `before` (watch_counters per node)."""
    for node in NODES:
        after = watch_counters(lab, node)
        changes = [f"{counter}[{kind}] +{after[counter, kind] - before[node].get((counter, kind), 0):g}"
                   for counter, kind in sorted(after)
                   if counter != "events" and after[counter, kind] != before[node].get((counter, kind), 0)]
        print(f"SOURCE {label} {node}: {', '.join(changes) or 'nothing'}")


def source_errors(lab: Lab, node: str) -> int:
    """Failed list/watch attempts of the agent's API source, over all kinds (/healthz body)."""
    return sum(kind["errors"] for kind in healthz(lab, node)[1]["source"].values())


def agent_log_since(lab: Lab, node: str, offset: int) -> str:
    return lab.state.log_path(names.agent_record(node)).read_bytes()[offset:].decode(errors="replace")


def agent_log_size(lab: Lab, node: str) -> int:
    return lab.state.log_path(names.agent_record(node)).stat().st_size


# -- the API side ----------------------------------------------------------------------------------


def api_ready(lab: Lab) -> bool:
    try:
        lab.api.request("GET", "/readyz", timeout=5)
        return True
    except APIError:
        return False


def ready_endpoints(lab: Lab, name: str) -> set[str]:
    """Addresses of ready endpoints in the API's EndpointSlices of Service `name`."""
    return {address for s in lab.endpoint_slices(name) for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready") for address in e.get("addresses") or []}


def etcd(lab: Lab, method: str, body: dict) -> dict:
    """One call to etcd's v3 HTTP/JSON gateway (127.0.0.1:2379 inside the cp namespace)."""
    sock = nsenter.socket_in(names.member_netns(lab.prefix, names.CONTROL_PLANE))
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", 2379))
        conn = http.client.HTTPConnection("127.0.0.1", 2379, timeout=10)
        conn.sock = sock
        conn.request("POST", f"/v3/{method}", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, f"etcd {method}: {response.status} {data[:200]!r}"
        return json.loads(data)
    finally:
        sock.close()


def compact_etcd(lab: Lab) -> int:
    """Compact etcd's history up to its current revision (what the API server does every 5 min):
    no watch can resume from an older resourceVersion. Returns that revision."""
    revision = int(etcd(lab, "kv/range", {"key": "AA=="})["header"]["revision"])   # any key: the header
    etcd(lab, "kv/compaction", {"revision": str(revision), "physical": True})
    return revision


# -- while the API is away -------------------------------------------------------------------------------


def hold_outage(lab: Lab, traffic: Traffic, seconds: float) -> dict[str, list[dict]]:
    """For `seconds`: every ~2 s each node's /healthz must answer 200; the bodies seen, per node.
    Traffic keeps running meanwhile (checked by the caller)."""
    bodies: dict[str, list[dict]] = {node: [] for node in NODES}
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds) + 1):
        for node in NODES:
            code, body = healthz(lab, node)
            assert code == 200, f"{node} /healthz {code} while the API is away: {body}"
            bodies[node].append(body)
        if time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    return bodies


# -- convergence -------------------------------------------------------------------------------------


def manual_service(lab: Lab, name: str, pod: str) -> list[dict]:
    """A selectorless Service and a hand-written EndpointSlice naming `pod`: no controller between
    the API and the agents, so the time until it answers is the agents' alone."""
    return [service(name, [{"name": "http", "port": 80}]),
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-manual", "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
             "endpoints": [{"addresses": [lab.pod_ip(pod)], "conditions": {"ready": True}}]}]


def start_and_converge(lab: Lab, traffic: Traffic, component: str, counters: dict[str, dict],
                       label: str) -> dict[str, float]:
    """Start the stopped `component`, wait for /readyz, then converge_after() from that moment;
    prints what each agent's API source went through meanwhile."""
    lab.control_plane("start", component)
    lab.wait_api_ready()
    times = converge_after(lab, traffic, time.monotonic(), label)
    print_source_changes(lab, counters, label)
    return times


def end_outage(lab: Lab, traffic: Traffic, component: str, counters: dict[str, dict], t_stop: float,
               label: str) -> None:
    """Both backends answered while `component` was down (since `t_stop`, from the maps alone); then
    start_and_converge(), and the change made once it is back reaches the wire in bounded time."""
    answered_while_down = traffic.answers(since=t_stop)
    times = start_and_converge(lab, traffic, component, counters, label)
    assert {"af-1", "af-2"} <= set(answered_while_down)
    assert times["wire"] < CONVERGE_TIMEOUT


def converge_after(lab: Lab, traffic: Traffic, t_ready: float, label: str) -> dict[str, float]:
    """Once the API is back: a new Service (selectorless, hand-written slice naming af-1) and a
    third backend af-3 for af (kube-controller-manager's EndpointSlice controller in between).
    Waits (bounded) until both are on the wire; returns seconds from `t_ready`, the API being
    ready again, to: maps (both agents programmed the new Service), wire (it answers), slice (the
    controller manager put af-3 into af's slice, ready), backend (af-3 answers through af)."""
    lab.apply(manual_service(lab, "af-new", "af-1"))
    vip = cluster_ip(lab, "af-new")
    for node in NODES:
        wait_for(lambda: (fe := frontend(lab, node, vip, 80)) is not None and fe.backend_count == 1,
                 CONVERGE_TIMEOUT, 0.05, f"{node}: af-new programmed")
    t_maps = time.monotonic()
    answer = wait_for(lambda: http_get(lab, CLIENT, vip, 80, timeout=2), CONVERGE_TIMEOUT, 0.05, "af-new answers")
    t_wire = time.monotonic()
    assert answer["pod"] == "af-1"

    lab.apply([echo("af-3", "node-1")])
    wait_ready(lab, ["af-3"])
    af3 = lab.pod_ip("af-3")
    wait_for(lambda: af3 in ready_endpoints(lab, "af"), CONTROLLER_TIMEOUT, 0.05, "af-3 in af's slice")
    t_slice = time.monotonic()
    wait_programmed(lab, "af", 80, backends=3, timeout=CONVERGE_TIMEOUT)
    wait_for(lambda: traffic.first_answer_from("af-3", t_ready), CONVERGE_TIMEOUT, 0.1, "af-3 answers through af")
    times = {"maps": t_maps - t_ready, "wire": t_wire - t_ready, "slice": t_slice - t_ready,
             "backend": traffic.first_answer_from("af-3", t_ready) - t_ready}
    print(f"CONVERGENCE {label}: API ready -> new Service on the maps {times['maps']:.2f}s, on the wire "
          f"{times['wire']:.2f}s; new pod in af's slice {times['slice']:.2f}s, answering through af "
          f"{times['backend']:.2f}s (slice -> wire {times['backend'] - times['slice']:.2f}s)")
    return times


# -- the tests ---------------------------------------------------------------------------------------


def test_api_server_restart_mid_watch(lab):
    """kube-apiserver stopped for 65 s (longer than /healthz's staleness timeout, 2 x the 30 s sync
    period) under the agents' open watches, then started again: no request fails, /healthz stays 200
    because the periodic resync goes on with the last state, and a new Service and a new backend made
    once the API is back reach the wire."""
    vip = start_lab_with_service(lab)
    with service_traffic(lab, vip) as traffic:
        errors = {node: source_errors(lab, node) for node in NODES}
        counters = {node: watch_counters(lab, node) for node in NODES}
        synced = {node: healthz(lab, node)[1]["lastUpdated"] for node in NODES}
        t_stop = time.monotonic()
        lab.control_plane("stop", "kube-apiserver")
        assert not api_ready(lab)
        for node in NODES:   # the agents do notice: their source counts failed attempts
            wait_for(lambda: source_errors(lab, node) > errors[node], 30, 0.5, f"{node}: the API source fails")
        bodies = hold_outage(lab, traffic, 65 - (time.monotonic() - t_stop))
        for node in NODES:
            # A resync completed while the API was away: that is what keeps /healthz fresh.
            assert bodies[node][-1]["lastUpdated"] > synced[node], bodies[node][-1]
            assert bodies[node][-1]["state"] == "synced"
        end_outage(lab, traffic, "kube-apiserver", counters, t_stop, "API server restart (65 s outage)")


def test_expired_watch_relists_and_converges(lab):
    """Every agent's watch expires: the agents are frozen (SIGSTOP) while the API server restarts on a
    newer etcd revision, a Service is deleted, another created, a backend added, and etcd is compacted
    to its current revision.
    Woken up, their resourceVersions are gone: each agent gets 410, re-lists, and converges on the
    current state, including the deletion it never got an event for. Traffic flows throughout."""
    vip = start_lab_with_service(lab)
    lab.apply([svc("af-gone", pod="af-2")])
    wait_programmed(lab, "af-gone", 80, backends=1)
    gone_vip = cluster_ip(lab, "af-gone")
    before = {node: watch_counters(lab, node) for node in NODES}
    log_offsets = {node: agent_log_size(lab, node) for node in NODES}
    agents = {node: lab.agent_record(node) for node in NODES}
    frozen = []
    with service_traffic(lab, vip) as traffic:
        for node, rec in agents.items():
            assert processes.alive(rec)
            os.kill(rec.pid, signal.SIGSTOP)       # by the agent's pid record, never by name
            frozen.append(rec)
        try:
            lab.control_plane("stop", "kube-apiserver")
            # A write straight to etcd, after the API server's last one (on its way out it removes
            # itself from the `kubernetes` Service's endpoints, an EndpointSlice event the frozen
            # agents will still read), moves the revision past every resourceVersion they hold. The
            # restarted API server's watch cache begins at the current revision, so it is newer than
            # all of them: every kind's watch expires.
            etcd(lab, "kv/put", {"key": base64.b64encode(b"/af-test/bump").decode(), "value": "MQ=="})
            lab.control_plane("start", "kube-apiserver")
            lab.wait_api_ready()
            lab.delete_object("service", "af-gone")
            lab.apply([svc("af-fresh", pod="af-2"), echo("af-3", "node-2")])
            wait_ready(lab, ["af-3"])
            af3 = lab.pod_ip("af-3")
            wait_for(lambda: af3 in ready_endpoints(lab, "af"), CONTROLLER_TIMEOUT, 0.1, "af-3 in af's slice")
            wait_for(lambda: ready_endpoints(lab, "af-fresh"), CONTROLLER_TIMEOUT, 0.1, "af-fresh's slice")
            revision = compact_etcd(lab)
        finally:
            for rec in frozen:
                os.kill(rec.pid, signal.SIGCONT)
        t_thaw = time.monotonic()
        fresh_vip = cluster_ip(lab, "af-fresh")
        for node in NODES:
            wait_for(lambda: frontend(lab, node, gone_vip, 80) is None, CONVERGE_TIMEOUT, 0.05,
                     f"{node}: af-gone withdrawn (deleted while its agent was not watching)")
            wait_for(lambda: (fe := frontend(lab, node, fresh_vip, 80)) is not None and fe.backend_count == 1,
                     CONVERGE_TIMEOUT, 0.05, f"{node}: af-fresh programmed")
        t_maps = time.monotonic()
        answer = wait_for(lambda: http_get(lab, CLIENT, fresh_vip, 80, timeout=2), CONVERGE_TIMEOUT, 0.05,
                          "af-fresh answers")
        t_wire = time.monotonic()
        wait_programmed(lab, "af", 80, backends=3, timeout=CONVERGE_TIMEOUT)
        wait_for(lambda: traffic.first_answer_from("af-3", t_thaw), CONVERGE_TIMEOUT, 0.1, "af-3 answers")
        t_backend = traffic.first_answer_from("af-3", t_thaw)
    print(f"CONVERGENCE expired watches (etcd compacted at revision {revision}): agents woken -> "
          f"maps {t_maps - t_thaw:.2f}s, wire {t_wire - t_thaw:.2f}s, backend {t_backend - t_thaw:.2f}s")
    assert answer["pod"] == "af-2"
    assert lab.agent_record("node-1") == agents["node-1"] and lab.agent_record("node-2") == agents["node-2"]
    for node in NODES:
        log = agent_log_since(lab, node, log_offsets[node])
        assert re.search(r"(Service|EndpointSlice) reflector: watch: (ERROR event|HTTP) 410", log), log[-3000:]
        print(f"{node}:", *re.findall(r"\S+ reflector: watch: .*410.*", log), sep="\n  ")
        after = watch_counters(lab, node)
        for kind in ("Service", "EndpointSlice"):
            assert after[("relists", kind)] > before[node][("relists", kind)], (node, kind, after)


def test_etcd_restart(lab):
    """etcd stopped for 20 s (the API server stays up without storage, not ready), then started on the
    same data dir: no request fails, /healthz stays 200, and once the API is ready a new Service and a
    new backend reach the wire."""
    vip = start_lab_with_service(lab)
    with service_traffic(lab, vip) as traffic:
        counters = {node: watch_counters(lab, node) for node in NODES}
        t_stop = time.monotonic()
        lab.control_plane("stop", "etcd")
        wait_for(lambda: not api_ready(lab), 30, 0.5, "the API server to turn not ready without etcd")
        hold_outage(lab, traffic, 20 - (time.monotonic() - t_stop))
        end_outage(lab, traffic, "etcd", counters, t_stop, "etcd restart (20 s outage)")
