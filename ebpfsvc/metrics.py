"""Prometheus metrics of the node agent, and the glue that feeds metrics and health from it.

Everything is in one CollectorRegistry of our own (no process-global state, so
tests and several agents in one process do not mix). Two kinds of metrics:

- read at scrape time from the live pinned maps (DatapathCollector): traffic per
  service port, frontend and backend, drops by reason, map fill levels (the
  kernel's entry count against max_entries), and drift between the last state
  the agent applied and what the maps hold. Counters are the datapath's per-CPU
  counters summed, so they are exactly the packets and bytes translated;
- observed by the agent as it works (Metrics): kube-proxy's metrics, with its
  names, buckets and meaning, so kube-proxy's dashboards and alerts keep
  working; our own (ebpfsvc_*) where kube-proxy has nothing of the kind: map
  writes, failed syncs, the API source's watch statistics (read at scrape time
  from KubeSource.stats), invalid objects; and the process (prometheus_client's
  process, platform and GC collectors, as kube-proxy exports Go's).

Metric names:

  kubeproxy_sync_proxy_rules_duration_seconds            histogram: one sync
  kubeproxy_network_programming_duration_seconds         histogram: change -> maps serving it
  kubeproxy_sync_proxy_rules_last_timestamp_seconds      gauge: last completed sync
  kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge: last change asking for a sync
  kubeproxy_sync_proxy_rules_{service,endpoint}_changes_total   counter: objects received
  kubeproxy_sync_proxy_rules_{service,endpoint}_changes_pending gauge: net changes not yet synced
  kubeproxy_proxy_healthz_total / kubeproxy_proxy_livez_total {code}
  process_* , python_gc_*, python_info
  ebpfsvc_sync_proxy_rules_map_writes_total             counter
  ebpfsvc_sync_proxy_rules_failures_total               counter
  ebpfsvc_service_packets_total / _bytes_total          {service_port}
  ebpfsvc_frontend_packets_total / _bytes_total         {service_port, frontend, scope, kind}
  ebpfsvc_backend_packets_total / _bytes_total          {backend}
  ebpfsvc_drops_total                                   {reason}
  ebpfsvc_map_entries / ebpfsvc_map_max_entries         {map}
  ebpfsvc_drift_frontends                               gauge (0 = maps equal the applied state)
  ebpfsvc_watch_{lists,relists,restarts,errors,events}_total {kind}
  ebpfsvc_invalid_objects_total / ebpfsvc_invalid_objects
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# kube-proxy's buckets: sync durations exponential from 1 ms; programming latency 0.25 s .. 5 min.
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
PROGRAMMING_BUCKETS = (0.25, 0.5) + tuple(range(1, 60)) + tuple(range(60, 120, 5)) + tuple(range(120, 330, 30))

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class Metrics:
    """What the agent observes as it works (kube-proxy's pkg/proxy/metrics where the meaning is the same)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds: desired state computed and the map "
                                       "difference written.", buckets=SYNC_BUCKETS, registry=r)
        self.programming_latency = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds: from a Service/EndpointSlice change (its "
            "last-change-trigger-time annotation, else when the agent received it) to the maps serving it.",
            buckets=PROGRAMMING_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced.", registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued.", registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes (Services received).", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint changes (EndpointSlices and Endpoints "
                                        "received).", registry=r)
        self.map_writes = Counter("ebpfsvc_sync_proxy_rules_map_writes",
                                  "Map entries written or deleted by syncs.", registry=r)
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status.", ["code"],
                               registry=r)
        self.livez = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status.", ["code"], registry=r)
        # The process, as kube-proxy exports its Go runtime's: CPU, memory, fds, start time; GC; version.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def changed(self, kind: str) -> None:
        """A Service, EndpointSlice or Endpoints object was received (kube-proxy counts every update
        its change trackers see, a re-list's included)."""
        if kind == "Service":
            self.service_changes.inc()
        elif kind in ("EndpointSlice", "Endpoints"):
            self.endpoint_changes.inc()

    def on_probe(self, path: str, code: int) -> None:
        if path == "/healthz":
            self.healthz.labels(str(code)).inc()
        elif path == "/livez":
            self.livez.labels(str(code)).inc()


class DatapathCollector(Collector):
    """Reads the node's pinned maps at every scrape.

    `applied` returns the LBState the agent last wrote (None before the first
    sync), for the drift gauge; drift is computed at most every
    `drift_interval` seconds, since it reads every Maglev table."""

    def __init__(self, pin_dir, applied: Callable[[], Any] | None = None, drift_interval: float = 10.0):
        self.pin_dir = pin_dir
        self.applied = applied
        self.drift_interval = drift_interval
        self._node = None
        self._lock = threading.Lock()
        self._drift: tuple[float, Any, int] | None = None    # (when, state it was computed for, value)

    def _maps(self):
        from ebpfsvc.inspect.node import NodeMaps
        if self._node is None:
            self._node = NodeMaps.open(self.pin_dir)    # lazily: the agent pins its maps at start
        return self._node

    def close(self) -> None:
        with self._lock:
            if self._node is not None:
                self._node.close()
                self._node = None

    def describe(self):
        return []       # read at scrape time; no fixed set to announce at registration

    def collect(self):
        with self._lock:
            try:
                node = self._maps()
            except (OSError, ValueError) as e:
                log.debug("no datapath maps to collect from yet: %s", e)
                return
            yield from self._collect(node)

    def _collect(self, node):
        from ebpfsvc.inspect.views import drift

        names = node.service_names()
        fes = node.frontends(names)
        backends = node.backends()
        fe_traffic = node.traffic_all("frontend", max((f.frontend_id for f in fes), default=0))
        be_traffic = node.traffic_all("backend", max(backends, default=0))
        svc_p = CounterMetricFamily("ebpfsvc_service_packets", "Packets translated for a service port "
                                    "(both directions, all its frontends).", labels=["service_port"])
        svc_b = CounterMetricFamily("ebpfsvc_service_bytes", "Bytes translated for a service port.",
                                    labels=["service_port"])
        fe_p = CounterMetricFamily("ebpfsvc_frontend_packets", "Packets translated for a frontend.",
                                   labels=["service_port", "frontend", "scope", "kind"])
        fe_b = CounterMetricFamily("ebpfsvc_frontend_bytes", "Bytes translated for a frontend.",
                                   labels=["service_port", "frontend", "scope", "kind"])
        per_service: dict[str, list[int]] = {}
        for fe in fes:
            if fe.is_marker:
                continue
            pk, by = fe_traffic.get(fe.frontend_id, (0, 0))
            labels = [fe.service, fe.name, fe.scope, fe.kind]
            fe_p.add_metric(labels, pk)
            fe_b.add_metric(labels, by)
            acc = per_service.setdefault(fe.service, [0, 0])
            acc[0] += pk
            acc[1] += by
        for svc, (pk, by) in sorted(per_service.items()):
            svc_p.add_metric([svc], pk)
            svc_b.add_metric([svc], by)
        yield from (svc_p, svc_b, fe_p, fe_b)

        be_p = CounterMetricFamily("ebpfsvc_backend_packets", "Packets translated to or from a backend.",
                                   labels=["backend"])
        be_b = CounterMetricFamily("ebpfsvc_backend_bytes", "Bytes translated to or from a backend.",
                                   labels=["backend"])
        for ident, b in backends.items():
            pk, by = be_traffic.get(ident, (0, 0))
            be_p.add_metric([b.name], pk)
            be_b.add_metric([b.name], by)
        yield from (be_p, be_b)

        drops = CounterMetricFamily("ebpfsvc_drops", "Packets dropped, rejected or reset by the datapath, "
                                    "by reason.", labels=["reason"])
        for reason, n in node.drops().items():
            drops.add_metric([reason], n)
        yield drops

        used = GaugeMetricFamily("ebpfsvc_map_entries", "Entries in a BPF map now (the kernel's count; "
                                 "lb_maglev: slots owned by frontends).", labels=["map"])
        limit = GaugeMetricFamily("ebpfsvc_map_max_entries", "max_entries of a BPF map.", labels=["map"])
        for name, (n, cap) in sorted(node.fill(fes).items()):
            used.add_metric([name], n)
            limit.add_metric([name], cap)
        yield from (used, limit)

        if self.applied is not None:
            state = self.applied()
            if state is not None:
                now = time.monotonic()
                cached = self._drift
                if cached is None or cached[1] is not state or now - cached[0] >= self.drift_interval:
                    cached = self._drift = (now, state, len(drift(state, node, fes, backends)))
                g = GaugeMetricFamily("ebpfsvc_drift_frontends", "Frontends whose map entries differ from "
                                      "the state the agent last applied (0 = none).")
                g.add_metric([], cached[2])
                yield g


class AgentCollector(Collector):
    """The agent's source statistics and object validation, read at scrape time."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []

    def collect(self):
        stats = getattr(self.agent.source, "stats", None)
        if isinstance(stats, dict):
            for counter, help_text in (("lists", "Successful lists"), ("relists", "Lists after the first (410 "
                                       "Gone, broken watches)"), ("restarts", "Watches resumed without a "
                                       "re-list"), ("errors", "Failed list or watch attempts"),
                                       ("events", "Watch events received")):
                m = CounterMetricFamily(f"ebpfsvc_watch_{counter}", f"{help_text}, per kind.", labels=["kind"])
                for kind, values in sorted(stats.items()):
                    m.add_metric([kind], values.get(counter, 0))
                yield m
        total = CounterMetricFamily("ebpfsvc_invalid_objects", "Objects rejected by validation (the last good "
                                    "version stays in force).")
        total.add_metric([], getattr(self.agent, "invalid_objects", 0))
        yield total
        state = getattr(self.agent, "state", None)
        if state is not None:
            g = GaugeMetricFamily("ebpfsvc_invalid_objects_current", "Objects whose current version is invalid.")
            g.add_metric([], len(state.problems))
            yield g
            services, endpoints = state.pending_changes()
            for what, n in (("service", services), ("endpoint", endpoints)):
                g = GaugeMetricFamily(f"kubeproxy_sync_proxy_rules_{what}_changes_pending",
                                      f"Pending proxy rules {what.capitalize()} changes: objects changed since "
                                      "the last sync began, changes that net to nothing left out.")
                g.add_metric([], n)
                yield g
        runner = getattr(self.agent, "runner", None)
        if runner is not None:
            f = CounterMetricFamily("ebpfsvc_sync_proxy_rules_failures", "Syncs that raised (retried).")
            f.add_metric([], runner.failures)
            yield f


class MetricsServer:
    """/metrics of `registry` on host:port, in a daemon thread (port 0: a free one, see .port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        from prometheus_client import start_http_server
        self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- glue: what the agent calls ------------------------------------------------------------------

def _trigger_time(obj: dict) -> float | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class SourceTap:
    """A Sink in front of ClusterState: passes everything on, and notes what the model does not keep:
    spec.healthCheckNodePort of externalTrafficPolicy=Local Services, when each change was
    triggered (EndpointSlice last-change-trigger-time annotation, else arrival time), and this
    node's own Node object as it changes (`on_node(obj)`, None when deleted: /healthz nodeEligible;
    a re-list without it changes nothing, as kube-proxy keeps the last state it saw)."""

    def __init__(self, sink, clock: Callable[[], float] = time.time, node_name: str | None = None,
                 on_node: Callable[[dict | None], None] | None = None,
                 on_change: Callable[[str], None] | None = None):
        self.sink = sink
        self.clock = clock
        self.node_name = node_name
        self.on_node = on_node
        self.on_change = on_change          # kind of every object received (change counters)
        self._lock = threading.Lock()
        self.health_check_ports: dict[tuple[str, str], int] = {}
        self._pending: list[float] = []
        # Like kube-proxy, changes triggered before we started are not ours to time.
        self._since = clock()

    def __getattr__(self, name):
        return getattr(self.sink, name)

    def _note(self, obj: dict, kind: str, deleted: bool = False, listed: bool = False) -> None:
        if kind == "Node":
            if self.on_node is not None and (obj.get("metadata") or {}).get("name") == self.node_name:
                self.on_node(None if deleted else obj)
            return
        if kind in ("Service", "EndpointSlice", "Endpoints"):
            if self.on_change is not None:
                self.on_change(kind)
            t = _trigger_time(obj) if kind != "Service" else None
            if t is None and not listed:
                t = self.clock()            # no annotation: from when we received the change
            if t is not None and t >= self._since:
                self._pending.append(t)
        if kind != "Service":
            return
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        spec = obj.get("spec") or {}
        port = spec.get("healthCheckNodePort")
        if (not deleted and spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"
                and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            self.health_check_ports[key] = port
        else:
            self.health_check_ports.pop(key, None)

    def on_event(self, event) -> None:
        from ebpfsvc.sources.base import EventType
        with self._lock:
            if isinstance(event.obj, dict):
                self._note(event.obj, event.kind, deleted=event.type is EventType.DELETED)
        self.sink.on_event(event)

    def on_relist(self, kind: str, objects: list) -> None:
        with self._lock:
            if kind == "Service":
                self.health_check_ports.clear()
            for obj in objects:
                if isinstance(obj, dict):
                    self._note(obj, kind, listed=True)
        self.sink.on_relist(kind, objects)

    def on_synced(self, kind: str) -> None:
        self.sink.on_synced(kind)

    def take_triggers(self) -> list[float]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def ports(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.health_check_ports)


class Telemetry:
    """Metrics, /metrics, /healthz, /livez and healthCheckNodePort servers of one agent.

    The agent calls: start() / stop(), sink(state) around its source's sink,
    queued() when a change asks for a sync, sync_started() and sync_done(...)."""

    def __init__(self, agent, *, clock: Callable[[], float] = time.time):
        from ebpfsvc.health import ProxierHealth

        self.agent = agent
        self.clock = clock
        cfg = agent.config
        self.metrics = Metrics()
        self.health = ProxierHealth(timeout=2 * cfg.sync_period, clock=clock, serving=self.serving_problems)
        self.tap: SourceTap | None = None
        self.datapath_collector = DatapathCollector(cfg.pin_dir, applied=lambda: agent.last_applied)
        self.metrics.registry.register(self.datapath_collector)
        self.metrics.registry.register(AgentCollector(agent))
        self.healthz_server = None
        self.metrics_server = None
        self.service_health = None
        self._triggers: list[float] = []
        self._serving_lock = threading.Lock()
        self._nodeports: tuple[Any, Any, int] | None = None   # (services view, node config, NodePort Services)
        self._serving_logged: list[str] = []

    # -- lifecycle
    def start(self) -> None:
        """Bind /healthz and /metrics. A taken address is retried in the background (health.Listener
        says why), or raises health.BindError with --bind-address-hard-fail."""
        from ebpfsvc.health import HealthServer, Listener, ServiceHealthServers

        cfg = self.agent.config
        hard_fail = getattr(cfg, "bind_address_hard_fail", False)
        if getattr(cfg, "healthz_bind_address", ""):
            self.healthz_server = Listener(
                "--healthz-bind-address", cfg.healthz_bind_address, 10256, hard_fail=hard_fail,
                serve=lambda host, port: HealthServer(self.health, self.alive, host, port, details=self.details,
                                                      on_request=self.metrics.on_probe))
            self.service_health = ServiceHealthServers(self.healthz_server.host,
                                                       proxy_healthy=self.health.proxier_healthy)
            log.info("healthz on %s (port %s)", cfg.healthz_bind_address, self.healthz_server.port)
        if getattr(cfg, "metrics_bind_address", ""):
            try:
                self.metrics_server = Listener(
                    "--metrics-bind-address", cfg.metrics_bind_address, 10249, hard_fail=hard_fail,
                    serve=lambda host, port: MetricsServer(self.metrics.registry, host, port))
            except Exception:
                self.close()
                raise
            log.info("metrics on %s (port %s)", cfg.metrics_bind_address, self.metrics_server.port)

    def stop(self) -> None:
        """Fail /healthz at once (load balancers drain the node); close the servers."""
        self.health.set_stopping()

    def close(self) -> None:
        """Close every server (idempotent: the agent may be stopped twice)."""
        for server in (self.healthz_server, self.service_health, self.metrics_server):
            if server is not None:
                server.close()
        self.healthz_server = self.service_health = self.metrics_server = None
        self.datapath_collector.close()

    def alive(self) -> bool:
        return not self.health.stopping and self.agent.runner.alive

    def details(self) -> dict:
        """Operator information in the /healthz body: the API source's state, and addresses the agent
        could not bind (its own servers', healthCheckNodePorts)."""
        out: dict = {}
        stats = getattr(self.agent.source, "stats", None)
        if isinstance(stats, dict):
            out["source"] = {kind: {"synced": v.get("synced"), "errors": v.get("errors"),
                                    "lastError": v.get("last_error")} for kind, v in sorted(stats.items())}
        unbound = [listener.error for listener in (self.healthz_server, self.metrics_server)
                   if listener is not None and listener.error]
        if unbound:
            out["bindErrors"] = unbound
        if self.service_health is not None and self.service_health.problems:
            out["healthCheckNodePortErrors"] = self.service_health.problems
        admission = getattr(self.agent, "admission", None)
        if admission is not None:
            out.update(admission.details())      # Services not programmed, maps under pressure
        return out

    def serving_problems(self) -> list[str]:
        """health.serving_problems for the state the last sync computed and applied; asked at each
        /healthz, so the count of NodePort Services is kept while the Services view and the node
        configuration are the same objects (an endpoint change costs nothing here)."""
        from ebpfsvc.health import nodeport_services, serving_problems

        agent = self.agent
        builder = getattr(agent, "desired", None)
        snapshot = getattr(builder, "snapshot", None)
        applied = agent.last_applied
        if snapshot is None or applied is None:
            return []
        node = builder.node
        state = getattr(agent, "state", None)
        rejected = [p for p in state.problems if p.kind == "Service"] if state is not None else []
        with self._serving_lock:
            cached = self._nodeports
            if cached is None or cached[0] is not snapshot.services or cached[1] is not node:
                cached = self._nodeports = (snapshot.services, node,
                                            nodeport_services(snapshot.services.values(), node))
            problems = serving_problems(frontends=len(applied.frontends), rejected=rejected,
                                        nodeport_services=cached[2], node_addresses=node.node_addresses)
            changed, self._serving_logged = problems != self._serving_logged, problems
        if changed:
            if problems:
                log.warning("/healthz fails: %s", "; ".join(problems))
            else:
                log.info("/healthz: the node serves what it should again")
        return problems

    # -- hooks
    def sink(self, state):
        node = getattr(self.agent.config, "node", None)
        self.tap = SourceTap(state, clock=self.clock, node_name=getattr(node, "node_name", None),
                             on_node=self.health.node_changed, on_change=self.metrics.changed)
        return self.tap

    def queued(self) -> None:
        self.health.queued()
        self.metrics.last_queued.set(self.clock())

    def sync_started(self) -> None:
        # Changes received so far are in the snapshot this sync is about to take.
        if self.tap is not None:
            self._triggers.extend(self.tap.take_triggers())

    def sync_done(self, duration: float, stats=None) -> None:
        """A sync completed (stats: the writer's ApplyStats, None when nothing had to change)."""
        now = self.clock()
        self.metrics.sync_duration.observe(duration)
        self.metrics.last_sync.set(now)
        if stats is not None:
            self.metrics.map_writes.inc(stats.writes)
        for t in self._triggers:
            self.metrics.programming_latency.observe(max(0.0, now - t))
        self._triggers = []
        self.health.updated()
        if self.service_health is not None and self.tap is not None:
            from ebpfsvc.health import local_endpoint_counts
            applied = self.agent.last_applied
            self.service_health.sync(self.tap.ports(), local_endpoint_counts(applied) if applied else {})
