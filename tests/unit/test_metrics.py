"""Agent-side metrics without a kernel: sync and network-programming histograms
with a fake clock, watch statistics, invalid objects, healthCheckNodePorts in the
tracker's snapshots; and /metrics served on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ebpfsvc.metrics import PROGRAMMING_BUCKETS, SYNC_BUCKETS
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

from test_health import FakeAgent, FakeClock, FakeConfig, telemetry


def samples(registry) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(m, name, **labels):
    return m[(name, tuple(sorted(labels.items())))]


def svc(name, *, hcnp=None, etp="Local", type_="LoadBalancer"):
    spec = {"type": type_, "clusterIP": "198.19.0.10", "externalTrafficPolicy": etp,
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}
    if hcnp is not None:
        spec["healthCheckNodePort"] = hcnp
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name},
            "spec": spec}


def eps(name, trigger=None):
    meta = {"namespace": "default", "name": f"{name}-abc", "labels": {"kubernetes.io/service-name": name}}
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
            "addressType": "IPv4", "endpoints": [], "ports": []}


@dataclass
class Stats:
    writes: int


def test_buckets_are_kube_proxys():
    assert SYNC_BUCKETS[0] == 0.001 and SYNC_BUCKETS[-1] == 0.001 * 2 ** 14 and len(SYNC_BUCKETS) == 15
    assert PROGRAMMING_BUCKETS[:3] == (0.25, 0.5, 1) and PROGRAMMING_BUCKETS[-1] == 300
    assert len(PROGRAMMING_BUCKETS) == 2 + 59 + 12 + 7


def test_health_check_node_ports_in_the_tracker():
    tracker = ClusterState()

    def ports():        # what a sync hands to telemetry's healthCheckNodePort servers
        return tracker.snapshot().health_check_node_ports()

    tracker.on_event(Event("Service", EventType.ADDED, svc("web", hcnp=31000)))
    tracker.on_event(Event("Service", EventType.ADDED, svc("cluster", hcnp=31001, etp="Cluster")))
    tracker.on_event(Event("Service", EventType.ADDED, svc("np", hcnp=31002, type_="NodePort")))
    tracker.on_event(Event("Service", EventType.ADDED, svc("bad", hcnp="31003")))
    assert ports() == {("default", "web"): 31000}
    tracker.on_event(Event("Service", EventType.MODIFIED, svc("web", hcnp=31005)))
    assert ports() == {("default", "web"): 31005}
    tracker.on_relist("Service", [svc("api", hcnp=31010)])        # a re-list replaces what we knew
    assert ports() == {("default", "api"): 31010}
    tracker.on_event(Event("Service", EventType.DELETED, svc("api", hcnp=31010)))
    assert ports() == {}
    # Everything still reaches the tracker.
    tracker.on_synced("Service")
    assert "Service" in tracker.synced_kinds


def test_sync_and_programming_latency_histograms():
    clock = FakeClock(1_700_000_000.0)
    agent = FakeAgent(config=FakeConfig(healthz_bind_address=""))
    t = telemetry(agent, clock)
    tracker = ClusterState(clock=clock)          # started at 1_700_000_000 = 2023-11-14T22:13:20Z
    clock.advance(5)
    # Triggered 2.5 s before we receive it (annotation); another without annotation, received now;
    # one triggered before the agent started (not ours to time, like kube-proxy).
    tracker.on_event(Event("EndpointSlice", EventType.ADDED, eps("web", "2023-11-14T22:13:22.5Z")))
    tracker.on_event(Event("Service", EventType.ADDED, svc("web")))
    tracker.on_event(Event("EndpointSlice", EventType.ADDED, eps("old", "2020-01-01T00:00:00Z")))
    clock.advance(0.5)
    t.queued()
    t.sync_started(tracker.snapshot().trigger_times)
    clock.advance(0.5)
    t.sync_done(0.003, Stats(writes=7))
    m = samples(t.metrics.registry)
    # Sync done at 22:13:26: 3.5 s after the annotated trigger, 1.0 s after the unannotated arrival.
    assert v(m, "kubeproxy_network_programming_duration_seconds_count") == 2
    assert v(m, "kubeproxy_network_programming_duration_seconds_sum") == 4.5
    assert v(m, "kubeproxy_network_programming_duration_seconds_bucket", le="1.0") == 1
    assert v(m, "kubeproxy_network_programming_duration_seconds_bucket", le="4.0") == 2
    assert v(m, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
    assert v(m, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="0.004") == 1
    assert v(m, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="0.002") == 0
    assert v(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == clock.t
    assert v(m, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") == clock.t - 0.5
    assert v(m, "ebpfsvc_sync_proxy_rules_map_writes_total") == 7
    # A no-op periodic sync: a duration, no programming latency (nothing was pending).
    t.sync_started(tracker.snapshot().trigger_times)
    t.sync_done(0.0005)
    m = samples(t.metrics.registry)
    assert v(m, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert v(m, "kubeproxy_network_programming_duration_seconds_count") == 2
    t.close()


def test_watch_stats_invalid_objects_and_failures_are_exported():
    agent = FakeAgent(config=FakeConfig(healthz_bind_address=""))
    agent.source.stats = {
        "Service": {"lists": 3, "relists": 2, "restarts": 4, "errors": 5, "events": 40},
        "EndpointSlice": {"lists": 1, "relists": 0, "restarts": 1, "errors": 0, "events": 7},
    }
    agent.invalid_objects = 3
    agent.state = ClusterState()
    agent.runner.failures = 2
    t = telemetry(agent)
    m = samples(t.metrics.registry)
    assert v(m, "ebpfsvc_watch_relists_total", kind="Service") == 2
    assert v(m, "ebpfsvc_watch_restarts_total", kind="Service") == 4
    assert v(m, "ebpfsvc_watch_restarts_total", kind="EndpointSlice") == 1
    assert v(m, "ebpfsvc_watch_errors_total", kind="Service") == 5
    assert v(m, "ebpfsvc_watch_events_total", kind="EndpointSlice") == 7
    assert v(m, "ebpfsvc_invalid_objects_total") == 3
    assert v(m, "ebpfsvc_invalid_objects_current") == 0
    assert v(m, "ebpfsvc_sync_proxy_rules_failures_total") == 2
    t.close()


def test_metrics_endpoint_serves_the_registry_on_the_bind_address():
    agent = FakeAgent(config=FakeConfig(healthz_bind_address="127.0.0.1:0", metrics_bind_address="127.0.0.1:0"))
    t = telemetry(agent)
    t.start()
    try:
        port = t.metrics_server.port
        t.sync_done(0.02)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kubeproxy_sync_proxy_rules_duration_seconds_count 1.0" in text
        hport = t.healthz_server.port
        urllib.request.urlopen(f"http://127.0.0.1:{hport}/healthz", timeout=5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in text
    finally:
        t.close()


def test_kube_proxy_change_counters_and_pending_gauges():
    """kube-proxy's sync_proxy_rules_{service,endpoint}_changes_total count every object received (a
    re-list's too); _pending counts the net changes a sync has not taken yet."""
    agent = FakeAgent(config=FakeConfig(healthz_bind_address=""))
    agent.state = ClusterState()
    t = telemetry(agent)
    tracker = agent.state
    tracker.on_received = t.metrics.changed         # as the agent wires them
    tracker.on_relist("Service", [svc("web"), svc("api")])
    tracker.on_event(Event("EndpointSlice", EventType.ADDED, eps("web")))
    tracker.on_event(Event("Service", EventType.MODIFIED, svc("web", etp="Cluster")))
    m = samples(t.metrics.registry)
    assert v(m, "kubeproxy_sync_proxy_rules_service_changes_total") == 3
    assert v(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert v(m, "kubeproxy_sync_proxy_rules_service_changes_pending") == 2
    assert v(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    agent.state.snapshot()                                     # what a sync takes
    tracker.on_event(Event("EndpointSlice", EventType.DELETED, eps("web")))
    tracker.on_event(Event("EndpointSlice", EventType.ADDED, eps("web")))   # nets to nothing: not pending
    m = samples(t.metrics.registry)
    assert v(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 3
    assert v(m, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert v(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    t.close()


def test_kube_proxy_metric_names_and_process_metrics_are_exported():
    t = telemetry(FakeAgent(config=FakeConfig(healthz_bind_address="")))
    t.sync_done(0.01)
    names = {fam.name for fam in text_string_to_metric_families(generate_latest(t.metrics.registry).decode())}
    # prometheus_client drops _total from counter family names; kube-proxy's full names are below.
    assert {"kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_service_changes", "kubeproxy_sync_proxy_rules_endpoint_changes",
            "kubeproxy_proxy_healthz", "kubeproxy_proxy_livez",
            "process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
            "ebpfsvc_sync_proxy_rules_map_writes"} <= names
    text = generate_latest(t.metrics.registry).decode()
    for line in ("kubeproxy_sync_proxy_rules_service_changes_total 0.0",
                 "kubeproxy_sync_proxy_rules_endpoint_changes_total 0.0",
                 "kubeproxy_sync_proxy_rules_duration_seconds_count 1.0"):
        assert line in text.splitlines()
    t.close()
